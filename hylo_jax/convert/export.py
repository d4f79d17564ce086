"""Export a CausalLM as a Hugging Face directory (also the hylo_jax checkpoint format).

Writes config.json (hybrid fields under "hylo"), generation_config.json, safetensors
(sharded with an index above `max_shard_bytes`) and the tokenizer files. Tensors go
through the same mapping table as import, in reverse, one at a time. Everything is
written into a hidden temporary directory next to the target and renamed into place
at the end, so an error never leaves a partial output directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from hylo_jax.convert import mapping
from hylo_jax.convert.hub import load_tokenizer, resolve
from hylo_jax.convert.safetensors_io import DEFAULT_MAX_SHARD_BYTES, TensorSpec, numpy_dtype, write_checkpoint

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def export_model(
    model,
    output_dir: str | os.PathLike,
    *,
    tokenizer_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> str:
    """Writes `model` to `output_dir`; returns its absolute path.

    tokenizer_from: the model the tokenizer (and generation config) comes from: an HF
      dir (files copied unchanged) or a .gguf (tokenizer rebuilt by transformers).
    dtype: storage dtype ("float32", "bfloat16", ...); default: config.torch_dtype,
      so a bfloat16 checkpoint loaded in float32 exports bit-identical bfloat16.
    """
    out = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(out) and not (overwrite and os.path.isdir(out)) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output directory {out} exists and is not empty (pass overwrite=True to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        _write(model, tmp, tokenizer_from=tokenizer_from, dtype=dtype, max_shard_bytes=max_shard_bytes)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write(model, directory: str, *, tokenizer_from, dtype, max_shard_bytes: int) -> None:
    config = model.config
    dtype = numpy_dtype(dtype or config.torch_dtype)
    table = mapping.param_table(config)
    params = {mapping.path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    mapping.check_against_model(table, params)

    def hf_shape(entry: mapping.Entry) -> tuple[int, ...]:
        shape = params[entry.nnx].get_value().shape
        return entry.transform.to_hf(np.broadcast_to(np.zeros((), np.float32), shape)).shape

    def produce(name: str) -> np.ndarray:
        entry = table[name]
        value = np.asarray(jax.device_get(params[entry.nnx].get_value()))
        return np.ascontiguousarray(entry.transform.to_hf(value)).astype(dtype, copy=False)

    specs = [TensorSpec(e.hf, dtype, hf_shape(e)) for e in table.values()]
    write_checkpoint(directory, specs, produce, max_shard_bytes=max_shard_bytes)

    hf_config = config.to_hf_config()
    hf_config["torch_dtype"] = dtype.name
    _write_json(os.path.join(directory, "config.json"), hf_config)
    _write_tokenizer_and_generation_config(directory, config, tokenizer_from)


def _write_tokenizer_and_generation_config(directory: str, config, tokenizer_from) -> None:
    source = resolve(tokenizer_from) if tokenizer_from is not None else None
    if source is not None and source.kind == "hf":
        for name in TOKENIZER_FILES + ("generation_config.json",):
            src = os.path.join(source.path, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(directory, name))
    elif source is not None:
        load_tokenizer(source).save_pretrained(directory)
    if not os.path.isfile(os.path.join(directory, "generation_config.json")):
        hf = config.to_hf_config()
        generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf[k] is not None}
        _write_json(os.path.join(directory, "generation_config.json"), generation)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
