"""Pallas GPU kernel (Triton lowering) for the chunked SSD core.

One program per (batch, head, block of the value dim P). It walks the chunks of its
sequence in order, keeping the [bp, N] state in registers, so chunk states never
touch device memory; inputs are read once and outputs written once. The chunk math
is chunk_math.chunk_step, shared with the TPU kernel.

Triton lowering is used because it is the mature Pallas GPU path for this pattern
(dynamic slices of a resident sequence inside a loop); Mosaic GPU is JAX's default
for new kernels, and a port is future work. Shapes: T is padded to a multiple of the
chunk by the caller (ops.py); N and P must be powers of two >= 16 (Triton's
block and matrix-unit rules), which ops.py arranges by zero padding.

Speed (see BENCHMARKS.md "Kernels: SSD"): latency-bound at small batch, because each
program is a chain of small dependent matrix products, and the state path runs in true
float32 (chunk_math explains why); mamba_ssm's chunk-parallel Triton kernels are faster.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd.chunk_math import chunk_step


def _kernel(*refs, L, nc, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, a_ref, h0_ref, s_ref, sp_ref, o_ref, hT_ref = refs
    else:
        q_ref, k_ref, v_ref, a_ref, h0_ref, o_ref, hT_ref = refs

    def body(c, state):
        rows = pl.ds(pl.multiple_of(c * L, L), L)
        seg = {}
        if has_seg:
            seg = dict(s_row=s_ref[rows][None, :], sp_row=sp_ref[rows][None, :])
        o, state = chunk_step(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                              a_ref[rows][None, :], state, **seg)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return state

    hT_ref[...] = jax.lax.fori_loop(0, nc, body, h0_ref[...].astype(jnp.float32))


def cost(b, h, tp, n, p, L, bp, itemsize):
    """FLOPs, exp count and bytes of one core call (scores recomputed per P block)."""
    nc = tp // L
    per_chunk = 2 * L * L * n * (p // bp) + 2 * L * L * p + 4 * L * n * p
    flops = b * h * nc * per_chunk
    transcendentals = b * h * nc * (p // bp) * (L * L + 3 * L)
    bytes_accessed = b * h * tp * (2 * n + 2 * p) * itemsize + b * h * (tp * 4 + 2 * p * n * 4)
    return pl.CostEstimate(flops=flops, transcendentals=transcendentals,
                           bytes_accessed=bytes_accessed)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_p", "num_warps", "num_stages",
                                             "interpret"))
def core_pallas_gpu(v, a, k, q, h0, s, sp, *, chunk_size, block_p=32, num_warps=4,
                    num_stages=2, interpret=False):
    """v [B,Tp,Hv,P], a [B,H,Tp] f32, k [B,Tp,Gk,N], q [B,Tp,Gq,N], h0 [B,H,P,N] f32,
    s / sp [B,Tp] f32 or None. Tp % chunk_size == 0. Returns (o [B,Tp,H,P] f32, hT f32)."""
    from jax.experimental.pallas import triton as pltriton

    b, h, tp = a.shape
    p, n = v.shape[-1], k.shape[-1]
    L = chunk_size
    bp = min(block_p, p)
    rv, rk, rq = h // v.shape[2], h // k.shape[2], h // q.shape[2]
    has_seg = s is not None
    in_specs = [
        pl.BlockSpec((None, tp, None, n), lambda i, j, m: (i, 0, lax.div(j, j.dtype.type(rq)), 0)),
        pl.BlockSpec((None, tp, None, n), lambda i, j, m: (i, 0, lax.div(j, j.dtype.type(rk)), 0)),
        pl.BlockSpec((None, tp, None, bp), lambda i, j, m: (i, 0, lax.div(j, j.dtype.type(rv)), m)),
        pl.BlockSpec((None, None, tp), lambda i, j, m: (i, j, 0)),
        pl.BlockSpec((None, None, bp, n), lambda i, j, m: (i, j, m, 0)),
    ]
    args = [q, k, v, a, h0]
    if has_seg:
        in_specs += [pl.BlockSpec((None, tp), lambda i, j, m: (i, 0))] * 2
        args += [s, sp]
    out_specs = [pl.BlockSpec((None, tp, None, bp), lambda i, j, m: (i, 0, j, m)),
                 pl.BlockSpec((None, None, bp, n), lambda i, j, m: (i, j, m, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, tp, h, p), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)]
    o, hT = pl.pallas_call(
        functools.partial(_kernel, L=L, nc=tp // L, has_seg=has_seg),
        grid=(b, h, p // bp),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=cost(b, h, tp, n, p, L, bp, v.dtype.itemsize),
        interpret=interpret,
        name="ssd_core_gpu",
    )(*args)
    return o, hT
