"""Import speed and peak host memory of `hylo_jax.load_model` on a Llama-3.2-1B-shaped checkpoint.

Builds a random Llama with Llama-3.2-1B's shapes (16 layers, hidden 2048, 32/8 heads,
vocab 128256, tied embeddings, llama3 RoPE) with transformers in bfloat16, saves it
as safetensors (once; reused from --workdir), then imports it in a fresh process and
reports wall time and peak RSS next to the size on disk. Prints a markdown table row.

  .venv/bin/python tools/bench_import.py [--dtype bfloat16] [--workdir /tmp/hylo_bench_import]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

LLAMA_32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
)

# Runs in a fresh interpreter so that its peak RSS is the import's alone.
_CHILD = """
import json, sys, time
import jax, jax.numpy as jnp
from hylo_jax import load_model

def hwm_kib():  # peak RSS of this process image (VmHWM; ru_maxrss survives exec on Linux)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

base_kib = hwm_kib()
t0 = time.perf_counter()
model = load_model(sys.argv[1], dtype=jnp.dtype(sys.argv[2]), progress=False)
jax.block_until_ready(jax.tree.leaves(model))
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_kib": hwm_kib(), "baseline_rss_kib": base_kib}))
"""


def make_checkpoint(directory: str) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(**LLAMA_32_1B)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)


def dir_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors")
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", help="target dtype of the imported parameters")
    parser.add_argument("--workdir", default="/tmp/hylo_bench_import", help="where the random checkpoint is kept")
    args = parser.parse_args()

    ckpt = os.path.join(args.workdir, "llama-3.2-1b-shaped-random")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        make_checkpoint(ckpt)
        print(f"created {ckpt} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, ckpt, args.dtype], cwd=repo, capture_output=True, text=True, check=False
    )
    if child.returncode:
        sys.exit(f"import failed:\n{child.stderr}")
    result = json.loads(child.stdout.strip().splitlines()[-1])

    disk = dir_bytes(ckpt)
    gib = 1024**3
    peak = result["peak_rss_kib"] * 1024
    base = result["baseline_rss_kib"] * 1024
    print("| checkpoint | on disk | target dtype | wall time | peak RSS | peak RSS / disk | RSS before load |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| Llama-3.2-1B-shaped random, bf16 safetensors | {disk / gib:.2f} GiB | {args.dtype} | "
        f"{result['wall_s']:.1f} s | {peak / gib:.2f} GiB | {peak / disk:.2f} | {base / gib:.2f} GiB |"
    )
    print(
        f"host: {cpu_name()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
