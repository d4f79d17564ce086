"""Registers, spills and shared memory of our Pallas GPU kernels, on a machine without a GPU.

Exports jit(value_and_grad) of the op's Pallas GPU path for CUDA (as the lowering tests
do), keeps the Triton IR of every kernel as Pallas lowers it, compiles each with the
`triton` package's compiler for the given compute capability (9.0: H100/H200) at the
kernel's own num_warps and num_stages, and reports per kernel what the cubin asks for
(`cuobjdump --dump-resource-usage`): registers per thread, the stack (register spills)
and shared memory.

This needs `pip install triton==3.6.0` (its wheel carries ptxas and cuobjdump; no GPU or
driver is used). Pallas lowers with jaxlib's own copy of Triton, and the device machine may
run another jax, so the counts can differ a little from what runs there (BENCHMARKS.md
compares them with Nsight Compute's). Use it to compare versions of a kernel before
spending device time, not as a measurement.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from tools.bench.harness import Column, Report, add_report_arguments

COLUMNS = (Column("kernel", "kernel"), Column("warps", "warps"), Column("stages", "stages"),
           Column("registers", "registers/thread"), Column("stack", "stack (spill) bytes"),
           Column("shared", "shared bytes"))


def lowered_kernels(op, dk, dv, dtype, t=256, heads=2, block_sizes=None):
    """{kernel name: (Triton IR text, num_warps, num_stages)} of jit(value_and_grad) of the op's GPU path."""
    from jax._src.pallas.triton import lowering  # the hook below is Pallas-internal, kept to this tool

    irs = {}
    lower = lowering.lower_jaxpr_to_triton_module

    def keep_ir(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        irs.setdefault(jaxpr.debug_info.func_name, result.module.operation.get_asm())
        return result

    lowering.lower_jaxpr_to_triton_module = keep_ir
    try:
        module = _export(op, dk, dv, dtype, t, heads, block_sizes)
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    # The launch parameters sit in each custom call's backend_config, after the IR bytes.
    params = {name: (int(warps), int(stages)) for name, stages, warps in
              re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', module)}
    missing = sorted(set(irs) - set(params))
    if missing:
        raise SystemExit(f"no launch parameters found in the exported module for {missing}")
    return {name: (ir, *params[name]) for name, ir in sorted(irs.items())}


def _export(op, dk, dv, dtype, t, heads, block_sizes):
    if op == "gdn":
        from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule_pallas

        def loss(q, k, v, g, beta):
            o, s = chunk_gated_delta_rule_pallas(q, k, v, g, beta, output_final_state=True, interpret=False,
                                                 backend="gpu", prepare_impl="pallas", block_sizes=block_sizes)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

        shapes = [(1, t, heads, dk), (1, t, heads, dk), (1, t, heads, dv), (1, t, heads), (1, t, heads)]
    else:
        from pallas_kernels.ssd import ssd_pallas

        def loss(x, dt, a, b, c):
            y, s = ssd_pallas(x, dt, a, b, c, output_final_state=True, interpret=False, backend="gpu",
                              block_sizes=block_sizes)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

        shapes = [(1, t, heads, dv), (1, t, heads), (heads,), (1, t, 1, dk), (1, t, 1, dk)]
    args = [jax.ShapeDtypeStruct(s, dtype if len(s) == 4 else jnp.float32) for s in shapes]
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5))))  # the value keeps the forward's kernels
    return jax.export.export(grad, platforms=("cuda",), disabled_checks=checks)(*args).mlir_module()


def _triton():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError:
        raise SystemExit("`resources` needs the triton package: pip install triton==3.6.0") from None
    return triton, GPUTarget


def resources(ir, num_warps, num_stages, arch):
    """cuobjdump's resource line for the IR compiled by the triton package, and the dynamic shared bytes."""
    triton, GPUTarget = _triton()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir)
        kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in usage.items()}, kernel.metadata.shared


def add_arguments(p):
    p.add_argument("--op", choices=["gdn", "ssd"], default="gdn")
    p.add_argument("--dk", type=int, default=64, help="GDN key head dim K; SSD state dim N")
    p.add_argument("--dv", type=int, default=64, help="GDN value head dim V; SSD head dim P")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--arch", type=int, default=90, help="compute capability, 90 for Hopper")
    p.add_argument("--block-sizes", type=json.loads, default={}, metavar="JSON",
                   help="launch parameters, fields of the op's BlockSizes (see `kernels --help`)")
    add_report_arguments(p)


def run(args):
    _triton()  # fail before the export when the compiler is missing
    if args.op == "gdn":
        from pallas_kernels.gated_delta_rule import BlockSizes
    else:
        from pallas_kernels.ssd import BlockSizes
    kernels = lowered_kernels(args.op, args.dk, args.dv, jnp.dtype(args.dtype), block_sizes=BlockSizes(**args.block_sizes))
    report = Report(COLUMNS, args.json, args.markdown, shape=f"{args.op} K={args.dk} V={args.dv} {args.dtype}",
                    arch=f"sm_{args.arch}")
    for name, (ir, warps, stages) in kernels.items():
        usage, dynamic = resources(ir, warps, stages, args.arch)
        report.row(kernel=name, warps=warps, stages=stages, registers=usage.get("REG"), stack=usage.get("STACK"),
                   shared=usage.get("SHARED", 0) + dynamic)
