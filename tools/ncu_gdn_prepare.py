"""Nsight Compute counters of the gated delta rule's chunk-local `gpu_prepare` kernels.

    python3 tools/ncu_gdn_prepare.py [--seqlen 16384 --heads 32 --dk 64 --dv 64]

Runs itself under `ncu` (CUDA's Nsight Compute, on the GPU machine's PATH) with the
profiler off until one warmed-up forward+backward call of `gpu_prepare.prepare`, and
prints one line per kernel: time, registers per thread, grid, achieved occupancy, DRAM
and SM throughput (% of peak) and local-memory load sectors (register spills).
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


def child(args):
    """The profiled process: warm up, then one call between cuProfilerStart/Stop."""
    import jax

    from bench_kernels import gdn_inputs
    from pallas_kernels.gated_delta_rule import gpu_prepare

    q, k, v, g, beta, _ = gdn_inputs(1, args.seqlen, args.heads, args.dk, args.dv)
    prep = lambda *a: gpu_prepare.prepare(*a, scale=args.dk**-0.5, segment_ids=None, chunk_size=64)
    fwd_bwd = jax.jit(lambda *a: jax.vjp(prep, *a)[1](prep(*a)))
    for _ in range(2):
        jax.block_until_ready(fwd_bwd(q, k, v, g, beta))
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    jax.block_until_ready(fwd_bwd(q, k, v, g, beta))
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
    for (_, name), m in kernels.items():
        print(f"{name}: " + ", ".join(f"{k} {m.get(k, '?')}" for k in METRICS.values()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    cmd = ["ncu", "--profile-from-start", "off", "--csv", "--metrics", ",".join(METRICS), "-k", "regex:gdn_prepare",
           sys.executable, os.path.abspath(__file__), "--child", "--seqlen", str(args.seqlen), "--heads",
           str(args.heads), "--dk", str(args.dk), "--dv", str(args.dv)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"ncu failed ({out.returncode}): {out.stderr[-2000:]}")
    print(f"B=1 T={args.seqlen} H={args.heads} K={args.dk} V={args.dv} bf16, chunk 64, one fwd+bwd call:")
    table(out.stdout)


if __name__ == "__main__":
    main()
