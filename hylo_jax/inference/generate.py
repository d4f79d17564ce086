"""Greedy generation with caches: chunked prefill, then one jit-compiled decode loop.

The model is split into (graphdef, state) once; prefill chunks and the whole decode
loop (a `lax.fori_loop` over new tokens) run as compiled functions of the state, so a
generation costs one compile per prompt-chunk shape plus one for the loop. The cache
covers prompt + new tokens; the linear mixers keep their constant-size state in it.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _step(graphdef, state, input_ids, positions, cache):
    model = nnx.merge(graphdef, state)
    return model.step(input_ids, positions, cache)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=3)
def _decode(graphdef, state, first_token, cache, start, num_tokens, eos_ids, pad_id):
    """Greedy loop: feeds `first_token` (at position `start`) and emits num_tokens - 1 more."""
    model = nnx.merge(graphdef, state)
    b = first_token.shape[0]
    out = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(first_token)
    done = jnp.isin(first_token, eos_ids)

    def body(i, carry):
        out, cache, done = carry
        token = out[:, i - 1]
        positions = jnp.full((b, 1), start + i - 1, jnp.int32)
        logits, cache = model.step(token[:, None], positions, cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        done = done | jnp.isin(nxt, eos_ids)
        return out.at[:, i].set(nxt), cache, done

    out, cache, _ = jax.lax.fori_loop(1, num_tokens, body, (out, cache, done))
    return out, cache


def prefill(model, input_ids: jax.Array, cache, *, start: int = 0, chunk_size: int | None = None):
    """Feeds `input_ids` [B, T] at positions start.. in chunks of `chunk_size` tokens
    (all at once when None). -> (logits of the last chunk [B, t, V], cache)."""
    graphdef, state = nnx.split(model)
    b, t = input_ids.shape
    chunk_size = chunk_size or t
    logits = None
    for lo in range(0, t, chunk_size):
        chunk = input_ids[:, lo : lo + chunk_size]
        positions = jnp.broadcast_to(jnp.arange(start + lo, start + lo + chunk.shape[1], dtype=jnp.int32), chunk.shape)
        logits, cache = _step(graphdef, state, chunk, positions, cache)
    return logits, cache


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(v) for v in value)


def generate(
    model,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    prefill_chunk_size: int | None = None,
    cache_dtype=None,
) -> jax.Array:
    """Greedy decoding. input_ids int [B, T] (no padding) -> int32 [B, T + max_new_tokens].

    After a sequence emits an EOS token its remaining slots hold `pad_token_id`
    (default: the first EOS id), as transformers' generate(do_sample=False) pads them.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, time] array, got shape {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids = _as_ids(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    b, t = input_ids.shape
    cache = model.init_cache(b, t + max_new_tokens, cache_dtype)
    logits, cache = prefill(model, input_ids, cache, chunk_size=prefill_chunk_size)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    graphdef, state = nnx.split(model)
    new_tokens, _ = _decode(
        graphdef,
        state,
        first,
        cache,
        jnp.int32(t),
        max_new_tokens,
        jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32),
        jnp.int32(pad_token_id),
    )
    return jnp.concatenate([input_ids, new_tokens], axis=1)
