"""Memory of a chunked prefill: exact byte counts, XLA's compiled analysis, an estimate.

A prefill step (`generation.prefill_chunk`) holds the weights, the whole cache (KV
slots for the full length in attention and MLA layers, constant states in Mamba2 and
GDN layers; donated, so updated in place) and one chunk's activations. The largest
activation is an attention layer's scores for one block of queries against every
cache slot, [B, H, min(chunk, query block), length] in float32; layers run one after
another, so only one layer's scores are live.

- `compiled_prefill_memory` asks XLA: the step is lowered from abstract shapes
  (`nnx.eval_shape`, `jax.eval_shape`), compiled, and `memory_analysis()` read; no
  weight or cache is allocated, so it reports lengths that do not fit this machine.
- `estimate_prefill_memory` is the arithmetic: exact weight and cache bytes plus the
  score block and the chunk's hidden activations. Evaluation uses it to skip a length
  that cannot fit, without compiling.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.layers.attention import DEFAULT_CHUNK_SIZE


def tree_bytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def abstract_model(config, *, dtype=jnp.float32, param_dtype=None):
    from hylo_jax.models.decoder import CausalLM

    return nnx.eval_shape(
        lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype or dtype)
    )


def abstract_cache(model, batch: int, length: int, cache_dtype=None):
    return jax.eval_shape(lambda: model.init_cache(batch, length, cache_dtype))


@dataclasses.dataclass(frozen=True)
class PrefillMemory:
    weights: int  # bytes
    cache: int
    activations: int  # temporaries of one step (compiled: XLA's temp allocation)
    peak: int  # what the step needs at once

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compiled_prefill_memory(model, batch: int, length: int, chunk: int, cache_dtype=None) -> PrefillMemory:
    """XLA's memory analysis of the last prefill step of a `length`-token prompt fed
    `chunk` tokens at a time (the cache holds `length` slots). `model` may be abstract."""
    from hylo_jax.inference.generation import prefill_chunk

    chunk = min(chunk, length)
    graphdef, state = nnx.split(model)
    cache = abstract_cache(model, batch, length, cache_dtype)
    ids = jax.ShapeDtypeStruct((batch, chunk), jnp.int32)
    start = jax.ShapeDtypeStruct((), jnp.int32)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    stats = prefill_chunk.lower(graphdef, state, ids, start, cache).compile().memory_analysis()
    if stats is None:
        raise RuntimeError(f"XLA gives no memory analysis on {jax.devices()[0].platform}")
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
    return PrefillMemory(tree_bytes(state), tree_bytes(cache), int(stats.temp_size_in_bytes), int(peak))


def estimate_prefill_memory(config, batch: int, length: int, chunk: int, *, dtype=jnp.float32, param_dtype=None,
                            cache_dtype=None) -> PrefillMemory:
    """The arithmetic for the same step (see the module docstring)."""
    model = abstract_model(config, dtype=dtype, param_dtype=param_dtype)
    weights = tree_bytes(nnx.state(model))
    cache = tree_bytes(abstract_cache(model, batch, length, cache_dtype or dtype))
    chunk = min(chunk, length)
    itemsize = jnp.dtype(dtype).itemsize
    kinds = set(config.layer_types)
    scores = 0
    if kinds & {"attention", "mla"}:
        # scores, masked scores and probabilities (float32) of one query block against every slot
        scores = 3 * batch * config.num_attention_heads * min(chunk, DEFAULT_CHUNK_SIZE) * length * 4
    # The residual stream, the MLP's three projections and the mixers' q/k/v/o.
    width = 4 * config.hidden_size + 3 * config.intermediate_size + 4 * config.num_attention_heads * config.head_dim
    hidden = batch * chunk * width * itemsize
    activations = scores + hidden
    return PrefillMemory(weights, cache, activations, weights + cache + activations)


def available_bytes(device=None) -> int | None:
    """Memory a computation may use on `device` (None: the first device): the
    accelerator's limit, or the host's available RAM for CPU; None if unknown."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
