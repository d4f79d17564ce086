"""Nsight Compute counters of the GPU kernels of one forward+backward call of the gated delta rule.

--part op (the default) profiles `chunk_gated_delta_rule(impl="pallas")`: every kernel
launch, ours (names gdn_*) and XLA's between them; --part prepare profiles the
chunk-local `gpu_chunk_local.prepare` alone, its kernels only; --part fla profiles
flash-linear-attention's `chunk_gated_delta_rule` (if importable; torch, with its gated
backward's Hopper guard bypassed as `kernels` does) on the same inputs. Runs itself under
`ncu` (CUDA's Nsight Compute, on the GPU machine's PATH) with the profiler off until one
warmed-up call, and reports one row per launch: time, registers per thread, grid,
achieved occupancy, DRAM and SM throughput (% of peak) and local-memory load sectors
(register spills); then the total time, and ours against XLA's. Times under ncu are per
kernel, serialised, at the clocks ncu sets: for where the time goes, not for speed.
"""

from __future__ import annotations

import csv
import ctypes
import shutil
import subprocess
import sys

from tools.bench.harness import REPO, Column, Report, add_report_arguments, require_gpu

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
COLUMNS = (Column("kernel", "kernel"),) + tuple(Column(m, m) for m in METRICS.values())
# Our kernels of the chunk-local preparation (gpu_chunk_local), which --part prepare keeps.
PREPARE_KERNELS = "regex:gdn_(aqk_qg|wy|prepare_bwd)"


def child(args):
    """The profiled process: warm up, then one call between cuProfilerStart/Stop."""
    import jax

    from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, gpu_chunk_local
    from tools.bench.gdn import inputs

    q, k, v, g, beta, _ = inputs(1, args.seqlen, args.heads, args.dk, args.dv)
    if args.part == "fla":
        return child_fla(q, k, v, g, beta)
    if args.part == "prepare":
        fn = lambda *a: gpu_chunk_local.prepare(*a, scale=args.dk**-0.5, segment_ids=None, chunk_size=64)
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

    from tools.bench.gdn import fla_op
    from tools.bench.harness import to_torch

    chunk_o.TRITON_ABOVE_3_7_1 = True  # see gdn.check_fla
    fla_fn = fla_op()
    if fla_fn is None:
        raise SystemExit("fla is not importable")
    args = [to_torch(x, requires_grad=True) for x in (q, k, v, g, beta)]  # as `kernels` times it

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


def table(text, report):
    """ncu's --csv rows (one per kernel and metric) -> one report row per kernel, then the totals."""
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
        report.row(kernel=name, **m)
        value, _, unit = m.get("time", "").partition(" ")
        value = value.replace(",", "")
        if unit in MS_PER and value.replace(".", "", 1).isdigit():
            totals["ours (gdn_*)" if name.startswith("gdn_") else "other"] += float(value) * MS_PER[unit]
    report.add("launches", len(kernels))
    report.add("total_ms", totals)


def add_arguments(p):
    p.add_argument("--part", choices=["op", "prepare", "fla"], default="op",
                   help="op: the whole op, every kernel launch; prepare: the chunk-local kernels alone; "
                        "fla: flash-linear-attention's chunk_gated_delta_rule, every launch")
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--child", action="store_true", help="(internal) the process that ncu profiles")
    add_report_arguments(p)


def run(args):
    if args.child:
        return child(args)
    require_gpu("`ncu`")
    if shutil.which("ncu") is None:
        raise SystemExit("`ncu` needs Nsight Compute's ncu on the PATH (CUDA toolkit)")
    only_ours = ["-k", PREPARE_KERNELS] if args.part == "prepare" else []
    cmd = ["ncu", "--profile-from-start", "off", "--csv", "--print-units", "base", "--metrics", ",".join(METRICS),
           *only_ours, sys.executable, "-m", "tools.bench", "ncu", "--child", "--part", args.part, "--seqlen",
           str(args.seqlen), "--heads", str(args.heads), "--dk", str(args.dk), "--dv", str(args.dv)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"ncu failed ({out.returncode}): {out.stderr[-2000:]}")
    report = Report(COLUMNS, args.json, args.markdown,
                    shape=f"{args.part}: B=1 T={args.seqlen} H={args.heads} K={args.dk} V={args.dv} bf16, chunk 64, "
                          "one fwd+bwd call")
    table(out.stdout, report)
