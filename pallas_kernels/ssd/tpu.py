"""Pallas Mosaic TPU kernel for the chunked SSD core.

Grid (batch, head, chunk); the chunk axis is sequential ("arbitrary") and the [P, N]
state lives in a VMEM scratch buffer between chunk steps, so chunk states never go
to HBM. Mosaic wants the last two dims of every block to be multiples of (8, 128)
or the whole array dim, so the caller's [B, T, G, d] arrays are laid out head-major
([B, G, T, d]: blocks (L, d)), and per-token scalars as rows [.., 1, L] (blocks
(1, L)). The chunk math is chunk_math.chunk_step. The backward is three more runs of this
kernel (ops.py); the GPU path has chunk-parallel kernels instead (gpu.py).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd.chunk_math import chunk_step


def _kernel(*refs, nc, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, a_ref, h0_ref, s_ref, sp_ref, o_ref, hT_ref, state_ref = refs
    else:
        q_ref, k_ref, v_ref, a_ref, h0_ref, o_ref, hT_ref, state_ref = refs
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        state_ref[...] = h0_ref[...].astype(jnp.float32)

    seg = dict(s_row=s_ref[...], sp_row=sp_ref[...]) if has_seg else {}
    o, state = chunk_step(q_ref[...], k_ref[...], v_ref[...], a_ref[...], state_ref[...], **seg)
    state_ref[...] = state
    o_ref[...] = o.astype(o_ref.dtype)

    @pl.when(c == nc - 1)
    def _():
        hT_ref[...] = state


def cost(b, h, tp, n, p, L, itemsize):
    """FLOPs, exp count and bytes of one core call."""
    nc = tp // L
    flops = b * h * nc * (2 * L * L * n + 2 * L * L * p + 4 * L * n * p)
    transcendentals = b * h * nc * (L * L + 3 * L)
    bytes_accessed = b * h * tp * (2 * n + 2 * p) * itemsize + b * h * (tp * 4 + 2 * p * n * 4)
    return pl.CostEstimate(flops=flops, transcendentals=transcendentals,
                           bytes_accessed=bytes_accessed)


@functools.partial(jax.jit, static_argnames=("chunk_size", "interpret"))
def core_pallas_tpu(v, a, k, q, h0, s, sp, *, chunk_size, interpret=False):
    """The core (xla.core) on one chunk-walking kernel: v [B,Tp,Hv,P], a [B,H,Tp] f32,
    k [B,Tp,Gk,N], q [B,Tp,Gq,N] (one dtype), h0 [B,H,P,N] f32, s / sp [B,Tp] f32 segment
    index of each token and of the token before it (or None), time padded to whole chunks.
    Returns (o [B,Tp,H,P] f32, final state [B,H,P,N] f32); the head-major relayout happens here."""
    b, h, tp = a.shape
    p, n = v.shape[-1], k.shape[-1]
    L = chunk_size
    nc = tp // L
    rv, rk, rq = h // v.shape[2], h // k.shape[2], h // q.shape[2]
    head_major = lambda z: jnp.swapaxes(z, 1, 2)  # [B, T, G, d] -> [B, G, T, d]
    has_seg = s is not None
    in_specs = [
        pl.BlockSpec((None, None, L, n), lambda i, j, c: (i, lax.div(j, j.dtype.type(rq)), c, 0)),
        pl.BlockSpec((None, None, L, n), lambda i, j, c: (i, lax.div(j, j.dtype.type(rk)), c, 0)),
        pl.BlockSpec((None, None, L, p), lambda i, j, c: (i, lax.div(j, j.dtype.type(rv)), c, 0)),
        pl.BlockSpec((None, None, None, 1, L), lambda i, j, c: (i, j, c, 0, 0)),
        pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0)),
    ]
    args = [head_major(q), head_major(k), head_major(v), a.reshape(b, h, nc, 1, L), h0]
    if has_seg:
        in_specs += [pl.BlockSpec((None, None, 1, L), lambda i, j, c: (i, c, 0, 0))] * 2
        args += [s.reshape(b, nc, 1, L), sp.reshape(b, nc, 1, L)]
    o, hT = pl.pallas_call(
        functools.partial(_kernel, nc=nc, has_seg=has_seg),
        grid=(b, h, nc),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, L, p), lambda i, j, c: (i, j, c, 0)),
                   pl.BlockSpec((None, None, p, n), lambda i, j, c: (i, j, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, p), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, p, n), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((p, n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=cost(b, h, tp, n, p, L, v.dtype.itemsize),
        interpret=interpret,
        name="ssd_core_tpu",
    )(*args)
    return jnp.swapaxes(o, 1, 2), hT
