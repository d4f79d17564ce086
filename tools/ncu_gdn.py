"""Nsight Compute counters of the GPU kernels of one forward+backward call of the gated delta rule.

    python3 tools/ncu_gdn.py [--part op|prepare|fla] [--seqlen 16384 --heads 32 --dk 64 --dv 64]

--part op (the default) profiles `chunk_gated_delta_rule(impl="pallas")`: every kernel
launch, ours (names gdn_*) and XLA's between them; --part prepare profiles the
chunk-local `gpu_prepare.prepare` alone, its kernels only; --part fla profiles
flash-linear-attention's `chunk_gated_delta_rule` (if importable; torch, with its gated
backward's Hopper guard bypassed as in bench_kernels.py) on the same inputs. Runs itself under `ncu`
(CUDA's Nsight Compute, on the GPU machine's PATH) with the profiler off until one
warmed-up call, and prints one line per launch: time, registers per thread, grid,
achieved occupancy, DRAM and SM throughput (% of peak) and local-memory load sectors
(register spills); then the total time, and ours against XLA's. Times under ncu are
per kernel, serialised, at the clocks ncu sets: for where the time goes, not for speed.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METRICS = {
    "gpu__time_duration.sum": "time",
    "launch__registers_per_thread": "regs",
    "launch__grid_size": "grid",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM %",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM %",
    "l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum": "local ld sectors",
}


MS_PER = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}


def child(args):
    """The profiled process: warm up, then one call between cuProfilerStart/Stop."""
    import jax

    from bench_kernels import gdn_inputs
    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, gpu_prepare

    q, k, v, g, beta, _ = gdn_inputs(1, args.seqlen, args.heads, args.dk, args.dv)
    if args.part == "fla":
        return child_fla(q, k, v, g, beta)
    if args.part == "prepare":
        fn = lambda *a: gpu_prepare.prepare(*a, scale=args.dk**-0.5, segment_ids=None, chunk_size=64)
    else:
        fn = lambda *a: chunk_gated_delta_rule(*a, output_final_state=True, chunk_size=64, impl="pallas")
    fwd_bwd = jax.jit(lambda *a: jax.vjp(fn, *a)[1](fn(*a)))
    for _ in range(2):
        jax.block_until_ready(fwd_bwd(q, k, v, g, beta))
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    jax.block_until_ready(fwd_bwd(q, k, v, g, beta))
    cuda.cuProfilerStop()


def child_fla(q, k, v, g, beta):
    """child() for fla's chunk_gated_delta_rule (torch), same inputs and cotangent."""
    import fla.ops.common.chunk_o as chunk_o
    import torch
    from bench_kernels import _fla, _to_torch

    chunk_o.TRITON_ABOVE_3_7_1 = True  # see bench_kernels.check_fla_gradients
    fla_fn = _fla()
    if fla_fn is None:
        raise SystemExit("fla is not importable")
    args = [_to_torch(x, requires_grad=True) for x in (q, k, v, g, beta)]  # as bench_kernels times it

    def fwd_bwd():
        o, _ = fla_fn(*args, output_final_state=True)
        o.backward(o.detach())

    for _ in range(2):
        fwd_bwd()
    torch.cuda.synchronize()
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    fwd_bwd()
    torch.cuda.synchronize()
    cuda.cuProfilerStop()


def table(text):
    """ncu's --csv rows (one per kernel and metric) -> one printed line per kernel."""
    rows = list(csv.reader(line for line in text.splitlines() if line.startswith('"')))
    if not rows:
        raise SystemExit("ncu printed no kernel rows")
    col = {name: i for i, name in enumerate(rows[0])}
    kernels = {}
    for r in rows[1:]:
        m = kernels.setdefault((r[col["ID"]], r[col["Kernel Name"]]), {})
        m[METRICS[r[col["Metric Name"]]]] = f'{r[col["Metric Value"]]} {r[col["Metric Unit"]]}'.strip()
    totals = {"ours (gdn_*)": 0.0, "other": 0.0}
    for (_, name), m in kernels.items():
        print(f"{name}: " + ", ".join(f"{k} {m.get(k, '?')}" for k in METRICS.values()))
        value, _, unit = m.get("time", "").partition(" ")
        value = value.replace(",", "")
        if unit in MS_PER and value.replace(".", "", 1).isdigit():
            totals["ours (gdn_*)" if name.startswith("gdn_") else "other"] += float(value) * MS_PER[unit]
    print(f"{len(kernels)} launches, " + ", ".join(f"{k} {v:.3f} ms" for k, v in totals.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["op", "prepare", "fla"], default="op",
                   help="op: the whole op, every kernel launch; prepare: the gpu_prepare kernels alone; "
                        "fla: flash-linear-attention's chunk_gated_delta_rule, every launch")
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    only_ours = ["-k", "regex:gdn_prepare"] if args.part == "prepare" else []
    cmd = ["ncu", "--profile-from-start", "off", "--csv", "--print-units", "base", "--metrics", ",".join(METRICS),
           *only_ours, sys.executable, os.path.abspath(__file__), "--child", "--part", args.part, "--seqlen",
           str(args.seqlen), "--heads", str(args.heads), "--dk", str(args.dk), "--dv", str(args.dv)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"ncu failed ({out.returncode}): {out.stderr[-2000:]}")
    print(f"{args.part}: B=1 T={args.seqlen} H={args.heads} K={args.dk} V={args.dv} bf16, chunk 64, one fwd+bwd call:")
    table(out.stdout)


if __name__ == "__main__":
    main()
