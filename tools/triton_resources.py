"""Registers, spills and shared memory of our Pallas GPU kernels, on a machine without a GPU.

    python tools/triton_resources.py [--op gdn|ssd] [--dk 64 --dv 64] [--dtype bfloat16] [--arch 90]

Exports jit(value_and_grad) of the op's Pallas GPU path for CUDA (as the lowering tests do), keeps the
Triton IR of every kernel as Pallas lowers it, compiles each with the `triton` package's
compiler for the given compute capability (9.0: H100/H200) at the kernel's own num_warps and
num_stages, and prints per kernel what the cubin asks for (`cuobjdump --dump-resource-usage`):
registers per thread, the stack (register spills) and shared memory.

This needs `pip install triton==3.6.0` (its wheel carries ptxas and cuobjdump; no GPU or
driver is used). Pallas lowers with jaxlib's own copy of Triton, and the device machine may
run another jax, so the counts can differ a little from what runs there: on 2026-11-27
gdn_prepare_bwd came out at 255 registers with spills both here and under Nsight Compute on
an H200, gdn_prepare_local at 170 here against 161 there, and two kernels since merged into
gdn_prepare_wy, gdn_prepare_wu at 70 in both and gdn_prepare_solve at 168 against 146.
Use it to compare versions of a kernel before spending device time, not as a measurement.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def lowered_kernels(op, dk, dv, dtype, t=256, heads=2):
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
        module = _export(op, dk, dv, dtype, t, heads)
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    # The launch parameters sit in each custom call's backend_config, after the IR bytes.
    params = {name: (int(warps), int(stages)) for name, stages, warps in
              re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', module)}
    missing = sorted(set(irs) - set(params))
    if missing:
        raise SystemExit(f"no launch parameters found in the exported module for {missing}")
    return {name: (ir, *params[name]) for name, ir in sorted(irs.items())}


def _export(op, dk, dv, dtype, t, heads):
    if op == "gdn":
        from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule_pallas

        def loss(q, k, v, g, beta):
            o, s = chunk_gated_delta_rule_pallas(q, k, v, g, beta, output_final_state=True, interpret=False,
                                                 backend="gpu", prepare_impl="pallas")
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

        shapes = [(1, t, heads, dk), (1, t, heads, dk), (1, t, heads, dv), (1, t, heads), (1, t, heads)]
    else:
        from pallas_kernels.ssd import ssd

        def loss(x, dt, a, b, c):
            y, s = ssd(x, dt, a, b, c, output_final_state=True, impl="pallas", interpret=False)
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

        shapes = [(1, t, heads, dv), (1, t, heads), (heads,), (1, t, 1, dk), (1, t, 1, dk)]
    args = [jax.ShapeDtypeStruct(s, dtype if len(s) == 4 else jnp.float32) for s in shapes]
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(5))))  # the value keeps the forward's kernels
    return jax.export.export(grad, platforms=("cuda",), disabled_checks=checks)(*args).mlir_module()


def resources(ir, num_warps, num_stages, arch):
    """cuobjdump's resource line for the IR compiled by the triton package, and the dynamic shared bytes."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise SystemExit("this tool needs the triton package: pip install triton==3.6.0") from e
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=["gdn", "ssd"], default="gdn")
    p.add_argument("--dk", type=int, default=64, help="GDN key head dim K; SSD state dim N")
    p.add_argument("--dv", type=int, default=64, help="GDN value head dim V; SSD head dim P")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--arch", type=int, default=90, help="compute capability, 90 for Hopper")
    args = p.parse_args()
    kernels = lowered_kernels(args.op, args.dk, args.dv, jnp.dtype(args.dtype))
    print(f"{args.op} K={args.dk} V={args.dv} {args.dtype}, sm_{args.arch}: registers/thread, spill stack bytes, "
          "shared memory bytes (static + dynamic)")
    for name, (ir, warps, stages) in kernels.items():
        usage, dynamic = resources(ir, warps, stages, args.arch)
        print(f"{name:28s} warps {warps} stages {stages}: {usage.get('REG', '?'):>3} registers, "
              f"stack {usage.get('STACK', '?')}, shared {usage.get('SHARED', 0) + dynamic}")


if __name__ == "__main__":
    main()
