"""Long prefill, teacher and student side by side: cache bytes, peak memory, speed.

For each model and each length of `--lengths` (up to 1M tokens and beyond) it reports
the cache bytes, XLA's compiled memory analysis of the last prefill step (lowered
from abstract shapes, so nothing is allocated and lengths that do not fit this
machine are still reported; `hylo_jax.inference.memory`) next to the arithmetic
estimate, and for the lengths of `--time_lengths` (which must fit) the measured
prefill time per token and decode tokens/s after the prefill.

  python -m tools.bench.prefill                       # default SmolLM2 teacher and student
  python -m tools.bench.prefill --student outputs/hylo_smollm2 --lengths 4096,131072 \
      --time_lengths 32768 --chunk 4096 --dtype bfloat16

The default student is the default conversion's layout (8 MLA + 22 GDN, MLA sizes of
configs/convert.py) with the MLA layers at the "hylo" preset positions (the layers
"auto" picks change no byte count); without a checkpoint its timed runs use random
weights (speed does not depend on the values). Timings exclude compilation (each
timed run is the second of two). The peak of a step is arguments + outputs - donated
aliases + temporaries.
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default="", help='teacher checkpoint ("" = the default SmolLM2-135M-Instruct GGUF)')
    parser.add_argument("--student", default="", help='hylo_jax student dir ("" = the default layout, random weights)')
    parser.add_argument("--lengths", default="4096,32768,131072,1048576", help="lengths (tokens) for the memory table")
    parser.add_argument("--time_lengths", default="512,2048", help="lengths that are run and timed ('' = none)")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens per compiled step)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode_tokens", type=int, default=16, help="decode steps timed after each timed prefill")
    parser.add_argument("--dtype", default="float32", help="compute and weight dtype")
    parser.add_argument("--cache_dtype", default="", help='cache dtype ("" = dtype)')
    parser.add_argument("--no_compile", action="store_true", help="arithmetic only (no XLA memory analysis)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def default_student_config(teacher_config):
    from hylo_jax.config_files import load_config
    from hylo_jax.convert.upcycle import student_config_from_settings

    settings = load_config("convert").student
    settings.mla_layers = "hylo"
    return student_config_from_settings(teacher_config, settings)


def _configs(args):
    from hylo_jax.config import ModelConfig
    from hylo_jax.convert.hub import resolve
    from hylo_jax.loading import open_source

    teacher_src = resolve(args.teacher or None)
    teacher = ModelConfig.from_hf_config(open_source(teacher_src)[0])
    if args.student:
        student_src = resolve(args.student)
        student = ModelConfig.from_hf_config(open_source(student_src)[0])
        return {"teacher": (teacher, teacher_src.path), "student": (student, student_src.path)}
    return {"teacher": (teacher, teacher_src.path), "student": (default_student_config(teacher), None)}


def _timed(model, batch: int, length: int, chunk: int, decode_tokens: int, cache_dtype) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from hylo_jax.inference import generation as gen

    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, length)), jnp.int32)
    res = {}
    for _ in range(2):  # the first run compiles
        cache = model.init_cache(batch, length + decode_tokens, cache_dtype)
        t0 = time.perf_counter()
        logits, cache = gen.prefill(model, ids, cache, chunk_size=chunk)
        jax.block_until_ready(logits)
        res["prefill_s"] = time.perf_counter() - t0
        if decode_tokens:
            graphdef, state = nnx.split(model)
            token = jnp.argmax(logits, -1).astype(jnp.int32)
            t0 = time.perf_counter()
            out, cache, _ = gen._decode_block(
                graphdef, state, token, cache, jnp.int32(1), jnp.int32(length), jnp.zeros((batch,), bool),
                jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0), jnp.asarray([-1], jnp.int32), jnp.int32(0),
                num_steps=decode_tokens, sampler=gen.Sampler(True, 0, False),
            )
            jax.block_until_ready(out)
            res["decode_tokens_per_s"] = batch * decode_tokens / (time.perf_counter() - t0)
    res["prefill_us_per_token"] = 1e6 * res["prefill_s"] / (batch * length)
    return res


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hylo_jax.inference import memory
    from hylo_jax.loading import load_model
    from hylo_jax.models import CausalLM

    dtype = jnp.dtype(args.dtype)
    cache_dtype = jnp.dtype(args.cache_dtype) if args.cache_dtype else dtype
    results = {
        "device": jax.devices()[0].device_kind, "platform": platform.processor() or platform.machine(),
        "batch": args.batch, "chunk": args.chunk, "dtype": dtype.name, "cache_dtype": cache_dtype.name, "models": {},
    }
    for label, (config, path) in _configs(args).items():
        abstract = memory.abstract_model(config, dtype=dtype)
        rows = {}
        for length in sorted(set(_ints(args.lengths)) | set(_ints(args.time_lengths))):
            row = {"estimate": memory.estimate_prefill_memory(
                config, args.batch, length, args.chunk, dtype=dtype, cache_dtype=cache_dtype).as_dict()}
            if not args.no_compile:
                try:
                    row["compiled"] = memory.compiled_prefill_memory(
                        abstract, args.batch, length, args.chunk, cache_dtype).as_dict()
                except Exception as e:  # noqa: BLE001 - reported, the arithmetic still stands
                    row["compiled_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows[str(length)] = row
            print(f"{label} {length}: {_fmt_row(row)}", flush=True)
        time_lengths = _ints(args.time_lengths)
        if time_lengths:
            model = (load_model(path, dtype=dtype, progress=False) if path
                     else CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype))
            for length in time_lengths:
                timing = _timed(model, args.batch, length, args.chunk, args.decode_tokens, cache_dtype)
                rows.setdefault(str(length), {})["time"] = timing
                print(f"{label} {length}: {timing}", flush=True)
            del model
        results["models"][label] = {"layer_types": ",".join(sorted(set(config.layer_types))),
                                    "weights_from": path or "random init", "lengths": rows}
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def _gib(n) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def _fmt_row(row) -> str:
    c = row.get("compiled") or {}
    return f"cache {_gib(row['estimate']['cache'])} GiB, peak compiled {_gib(c.get('peak'))} / estimate {_gib(row['estimate']['peak'])} GiB"


def table(results: dict) -> str:
    """Markdown: one row per length, teacher and student side by side."""
    labels = list(results["models"])
    lengths = sorted({int(n) for m in results["models"].values() for n in m["lengths"]})
    head = ["tokens"]
    for label in labels:
        head += [f"{label} cache GiB", f"{label} peak GiB (XLA)", f"{label} peak GiB (arith.)",
                 f"{label} prefill µs/token", f"{label} decode tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in lengths:
        cells = [f"{n:,}"]
        for label in labels:
            row = results["models"][label]["lengths"].get(str(n), {})
            est, comp, t = row.get("estimate", {}), row.get("compiled", {}), row.get("time", {})
            cells += [_gib(est.get("cache")), _gib(comp.get("peak")), _gib(est.get("peak")),
                      f"{t['prefill_us_per_token']:.0f}" if t else "",
                      f"{t['decode_tokens_per_s']:.1f}" if t.get("decode_tokens_per_s") else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args())
