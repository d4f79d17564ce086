"""Import speed and peak host memory of `hylo_jax.load_model` on a Llama-3.2-1B-shaped checkpoint.

Builds a random Llama with Llama-3.2-1B's shapes (16 layers, hidden 2048, 32/8 heads,
vocab 128256, tied embeddings, llama3 RoPE) with transformers in bfloat16, saves it as
safetensors (once; reused from --workdir), then imports it in a fresh process and
reports wall time and peak RSS (VmHWM) next to the size on disk. `--layers 1` makes a
small checkpoint that only tries the plumbing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tools.bench.harness import REPO, Column, Report, add_report_arguments

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
GIB = 1024**3
COLUMNS = (Column("checkpoint", "checkpoint"), Column("disk_gib", "on disk (GiB)", "{:.2f}"),
           Column("dtype", "target dtype"), Column("wall_s", "wall time (s)", "{:.1f}"),
           Column("peak_gib", "peak RSS (GiB)", "{:.2f}"), Column("peak_over_disk", "peak RSS / disk", "{:.2f}"),
           Column("baseline_gib", "RSS before load (GiB)", "{:.2f}"))

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


def make_checkpoint(directory: str, layers: int) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(**{**LLAMA_32_1B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)


def dir_bytes(directory: str) -> int:
    return sum(
        os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors")
    )


def add_arguments(p):
    p.add_argument("--dtype", default="bfloat16", help="target dtype of the imported parameters")
    p.add_argument("--workdir", default="/tmp/hylo_bench_import", help="where the random checkpoint is kept")
    p.add_argument("--layers", type=int, default=LLAMA_32_1B["num_hidden_layers"],
                   help="decoder layers of the checkpoint (Llama-3.2-1B: 16)")
    add_report_arguments(p)


def run(args):
    name = "llama-3.2-1b-shaped-random" + ("" if args.layers == 16 else f"-{args.layers}-layers")
    ckpt = os.path.join(args.workdir, name)
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        t0 = time.perf_counter()
        make_checkpoint(ckpt, args.layers)
        print(f"created {ckpt} in {time.perf_counter() - t0:.1f} s", flush=True)
    report = Report(COLUMNS, args.json, args.markdown)
    child = subprocess.run([sys.executable, "-c", _CHILD, ckpt, args.dtype], cwd=REPO, capture_output=True,
                           text=True, check=False)
    if child.returncode:
        raise SystemExit(f"import failed:\n{child.stderr}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    disk = dir_bytes(ckpt)
    peak = result["peak_rss_kib"] * 1024
    report.row(checkpoint=f"Llama-3.2-1B-shaped random ({args.layers} layers), bf16 safetensors", disk_gib=disk / GIB,
               dtype=args.dtype, wall_s=result["wall_s"], peak_gib=peak / GIB, peak_over_disk=peak / disk,
               baseline_gib=result["baseline_rss_kib"] * 1024 / GIB)
