"""Pallas GPU kernels (Triton lowering) for the sequential part of the chunked
gated delta rule: the state recurrence across chunks and its reverse.

One program per (batch*head, block of V columns) walks all chunks in order with the
[K, BV] state in registers; columns of V never mix, so splitting V gives more
programs, at the cost of each one re-reading the chunk's K-side tiles. The chunk-local
matrices (w, u, qg, Aqk, kg, decay) come from `gpu_prepare` (or `xla.prepare`). Inputs here are flattened head-major: [BH, Tp, D], Tp = N * C.

Why Triton lowering rather than Mosaic GPU: the body is a short loop of small dots
on register tiles, which Triton schedules well and which runs unchanged in
interpret mode; Mosaic GPU would need explicit warpgroup/TMA plumbing for the same
loop. C, K and the V block must be powers of two and at least 16 (Triton's dot).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule.xla import chunk_backward_step, chunk_forward_step, recurrence_cost


# Launch parameters: the fastest fwd+bwd of the 8 combinations that
# `tools/bench_kernels.py --tune` swept on an H100 (BENCHMARKS.md). A V block of 32
# gives B*H*V/32 programs (64 at batch 1 with 32 heads of 64, still under the 132
# SMs); two stages let Triton prefetch the next chunk's tiles during the dots.
BLOCKS = dict(block_v=32, num_warps=4, num_stages=2)


def check_power_of_two(interpret, **dims):
    """Triton's dots need each of `dims` a power of two >= 16 (interpret mode does not)."""
    if interpret:
        return
    for name, d in dims.items():
        if d < 16 or d & (d - 1):
            raise ValueError(f"Pallas GPU kernel needs {name} a power of two >= 16, got {d}")


def _block_v(dv, block_v):
    bv = min(block_v or BLOCKS["block_v"], dv)
    if dv % bv:
        raise ValueError(f"V={dv} is not a multiple of the V block {bv}")
    return bv


def _fwd_kernel(w_ref, u_ref, qg_ref, aqk_ref, kg_ref, decay_ref, h0_ref, o_ref, ht_ref, *save_refs,
                n_chunks, c):
    def body(i, s):
        sl = pl.ds(i * c, c)
        if save_refs:
            save_refs[0][i] = s.astype(save_refs[0].dtype)
        o, v_new, s = chunk_forward_step(
            s, w_ref[sl, :], u_ref[sl, :], qg_ref[sl, :], aqk_ref[sl, :], kg_ref[sl, :], decay_ref[i]
        )
        o_ref[sl, :] = o.astype(o_ref.dtype)
        if save_refs:
            save_refs[1][sl, :] = v_new.astype(save_refs[1].dtype)
        return s

    s = jax.lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(jnp.float32))
    ht_ref[...] = s.astype(ht_ref.dtype)


def recurrence_fwd(w, u, qg, aqk, kg, decay, h0, *, chunk_size, save_states=False, interpret=False,
                   block_v=None, num_warps=None, num_stages=None):
    """Run the state recurrence over all chunks.

    w, qg, kg: [BH, Tp, K]; u: [BH, Tp, V]; aqk: [BH, Tp, C]; decay: [BH, N] float32;
    h0: [BH, K, V] float32. Returns o [BH, Tp, V] (u's dtype), final state [BH, K, V]
    float32 and, with save_states, the state entering each chunk [BH, N, K, V] and
    v_new [BH, Tp, V] (both u's dtype) for the backward pass.
    """
    bh, tp, dk = w.shape
    dv = u.shape[-1]
    c = chunk_size
    n = tp // c
    bv = _block_v(dv, block_v)
    check_power_of_two(interpret, chunk_size=c, K=dk, V_block=bv)
    od = u.dtype
    row = lambda d: pl.BlockSpec((None, tp, d), lambda i, j: (i, 0, 0))
    col = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j))
    out_specs = [col, state]
    out_shape = [jax.ShapeDtypeStruct((bh, tp, dv), od), jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)]
    if save_states:
        out_specs += [pl.BlockSpec((None, n, dk, bv), lambda i, j: (i, 0, 0, j)), col]
        out_shape += [jax.ShapeDtypeStruct((bh, n, dk, dv), od), jax.ShapeDtypeStruct((bh, tp, dv), od)]
    itemsize = jnp.dtype(od).itemsize
    flops, bytes_accessed = recurrence_cost(bh, tp, dk, dv, c, itemsize, save_states=save_states)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, n_chunks=n, c=c),
        grid=(bh, dv // bv),
        in_specs=[row(dk), col, row(dk), row(c), row(dk), pl.BlockSpec((None, n), lambda i, j: (i, 0)), state],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or BLOCKS["num_warps"], num_stages=num_stages or BLOCKS["num_stages"]
        ),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="gdn_chunk_fwd",
    )(w, u, qg, aqk, kg, decay, h0)


def _bwd_kernel(w_ref, qg_ref, aqk_ref, kg_ref, decay_ref, do_ref, dht_ref, dh_ref, dv_ref, dh0_ref, *,
                n_chunks, c):
    def body(j, ds):
        i = n_chunks - 1 - j
        sl = pl.ds(i * c, c)
        dh_ref[i] = ds.astype(dh_ref.dtype)
        dv, ds = chunk_backward_step(
            ds, do_ref[sl, :], w_ref[sl, :], qg_ref[sl, :], aqk_ref[sl, :], kg_ref[sl, :], decay_ref[i]
        )
        dv_ref[sl, :] = dv.astype(dv_ref.dtype)
        return ds

    ds = jax.lax.fori_loop(0, n_chunks, body, dht_ref[...].astype(jnp.float32))
    dh0_ref[...] = ds.astype(dh0_ref.dtype)


def recurrence_bwd(w, qg, aqk, kg, decay, do, dht, *, chunk_size, interpret=False, block_v=None, num_warps=None,
                   num_stages=None):
    """Walk the chunks backwards carrying dL/dS.

    Returns dL/d(state leaving each chunk) [BH, N, K, V] (w's dtype), dL/dv_new
    [BH, Tp, V] float32 and dL/dh0 [BH, K, V] float32.
    """
    bh, tp, dk = w.shape
    dv_dim = do.shape[-1]
    c = chunk_size
    n = tp // c
    bv = _block_v(dv_dim, block_v)
    check_power_of_two(interpret, chunk_size=c, K=dk, V_block=bv)
    od = w.dtype
    row = lambda d: pl.BlockSpec((None, tp, d), lambda i, j: (i, 0, 0))
    col = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j))
    itemsize = jnp.dtype(od).itemsize
    flops, bytes_accessed = recurrence_cost(bh, tp, dk, dv_dim, c, itemsize, backward=True)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n_chunks=n, c=c),
        grid=(bh, dv_dim // bv),
        in_specs=[row(dk), row(dk), row(c), row(dk), pl.BlockSpec((None, n), lambda i, j: (i, 0)), col, state],
        out_specs=[pl.BlockSpec((None, n, dk, bv), lambda i, j: (i, 0, 0, j)), col, state],
        out_shape=[
            jax.ShapeDtypeStruct((bh, n, dk, dv_dim), od),
            jax.ShapeDtypeStruct((bh, tp, dv_dim), jnp.float32),
            jax.ShapeDtypeStruct((bh, dk, dv_dim), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or BLOCKS["num_warps"], num_stages=num_stages or BLOCKS["num_stages"]
        ),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="gdn_chunk_bwd",
    )(w, qg, aqk, kg, decay, do, dht)
