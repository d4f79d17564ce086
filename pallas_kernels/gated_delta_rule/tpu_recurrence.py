"""Pallas TPU (Mosaic) kernels for the sequential part of the chunked gated delta rule.

Same contract as `gpu_recurrence.py` (state recurrence across chunks and its reverse), laid out
for Mosaic: the chunk axis is the last, "arbitrary" grid dimension, so each step
gets one chunk's tiles in VMEM (a whole sequence would not fit) and the [K, BV]
float32 state lives in a VMEM scratch buffer between steps. Block shapes are legal
Mosaic tiles: (C, K), (C, BV), (C, C) with C a multiple of 8 and K, BV, C the full
trailing dims or multiples of 128; the per-chunk decay rides in a (1, 1) block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from pallas_kernels.gated_delta_rule.chunk_math import chunk_backward_step, chunk_forward_step, einsum, recurrence_cost


def _block_v(dv, block_sizes):
    bv = min(block_sizes.tpu_block_v, dv)
    if dv % bv or (bv != dv and bv % 128):
        raise ValueError(f"V={dv}: the V block {bv} must divide V and be V itself or a multiple of 128")
    return bv


def _interpret(interpret):
    return pltpu.InterpretParams() if interpret else False


def _fwd_kernel(w_ref, u_ref, qg_ref, aqk_ref, kg_ref, decay_ref, h0_ref, o_ref, ht_ref, *rest, n_chunks,
                save):
    save_refs, s_ref = rest[:-1], rest[-1]
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        s_ref[...] = h0_ref[...].astype(jnp.float32)

    s = s_ref[...]
    if save:
        save_refs[0][...] = s.astype(save_refs[0].dtype)
    o, v_new, s = chunk_forward_step(
        s, w_ref[...], u_ref[...], qg_ref[...], aqk_ref[...], kg_ref[...], decay_ref[...]
    )
    o_ref[...] = o.astype(o_ref.dtype)
    if save:
        save_refs[1][...] = v_new.astype(save_refs[1].dtype)
    s_ref[...] = s

    @pl.when(i == n_chunks - 1)
    def _():
        ht_ref[...] = s.astype(ht_ref.dtype)


def recurrence_fwd(w, u, qg, aqk, kg, decay, h0, *, chunk_size, save_states=False, interpret=False,
                   block_sizes=BlockSizes()):
    """See gpu_recurrence.recurrence_fwd (same arguments and results)."""
    bh, tp, dk = w.shape
    dv = u.shape[-1]
    c = chunk_size
    n = tp // c
    bv = _block_v(dv, block_sizes)
    od = u.dtype
    row = lambda d: pl.BlockSpec((None, c, d), lambda b, j, i: (b, i, 0))
    col = pl.BlockSpec((None, c, bv), lambda b, j, i: (b, i, j))
    state = pl.BlockSpec((None, dk, bv), lambda b, j, i: (b, 0, j))
    decay_spec = pl.BlockSpec((None, None, 1, 1), lambda b, j, i: (b, i, 0, 0))
    out_specs = [col, state]
    out_shape = [jax.ShapeDtypeStruct((bh, tp, dv), od), jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)]
    if save_states:
        out_specs += [pl.BlockSpec((None, None, dk, bv), lambda b, j, i: (b, i, 0, j)), col]
        out_shape += [jax.ShapeDtypeStruct((bh, n, dk, dv), od), jax.ShapeDtypeStruct((bh, tp, dv), od)]
    itemsize = jnp.dtype(od).itemsize
    flops, bytes_accessed = recurrence_cost(bh, tp, dk, dv, c, itemsize, save_states=save_states)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, n_chunks=n, save=save_states),
        grid=(bh, dv // bv, n),
        in_specs=[row(dk), col, row(dk), row(c), row(dk), decay_spec, state],
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((dk, bv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=_interpret(interpret),
        name="gdn_recurrence_fwd",
    )(w, u, qg, aqk, kg, decay.reshape(bh, n, 1, 1), h0)


def _bwd_kernel(w_ref, qg_ref, aqk_ref, kg_ref, decay_ref, do_ref, dht_ref, dh_ref, dv_ref, dh0_ref, ds_ref, *,
                n_chunks):
    i = pl.program_id(2)  # step i handles chunk n_chunks - 1 - i

    @pl.when(i == 0)
    def _():
        ds_ref[...] = dht_ref[...].astype(jnp.float32)

    ds = ds_ref[...]
    dh_ref[...] = ds.astype(dh_ref.dtype)
    dv, ds = chunk_backward_step(
        ds, do_ref[...], w_ref[...], qg_ref[...], aqk_ref[...], kg_ref[...], decay_ref[...]
    )
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_ref[...] = ds

    @pl.when(i == n_chunks - 1)
    def _():
        dh0_ref[...] = ds.astype(dh0_ref.dtype)


def recurrence_bwd(w, qg, aqk, kg, decay, do, dht, *, chunk_size, interpret=False, block_sizes=BlockSizes()):
    """See gpu_recurrence.recurrence_bwd (same arguments and results)."""
    bh, tp, dk = w.shape
    dv_dim = do.shape[-1]
    c = chunk_size
    n = tp // c
    bv = _block_v(dv_dim, block_sizes)
    od = w.dtype
    rev = lambda i: n - 1 - i
    row = lambda d: pl.BlockSpec((None, c, d), lambda b, j, i: (b, rev(i), 0))
    col = pl.BlockSpec((None, c, bv), lambda b, j, i: (b, rev(i), j))
    state = pl.BlockSpec((None, dk, bv), lambda b, j, i: (b, 0, j))
    decay_spec = pl.BlockSpec((None, None, 1, 1), lambda b, j, i: (b, rev(i), 0, 0))
    itemsize = jnp.dtype(od).itemsize
    flops, bytes_accessed = recurrence_cost(bh, tp, dk, dv_dim, c, itemsize, backward=True)
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n_chunks=n),
        grid=(bh, dv_dim // bv, n),
        in_specs=[row(dk), row(dk), row(c), row(dk), decay_spec, col, state],
        out_specs=[pl.BlockSpec((None, None, dk, bv), lambda b, j, i: (b, rev(i), 0, j)), col, state],
        out_shape=[
            jax.ShapeDtypeStruct((bh, n, dk, dv_dim), od),
            jax.ShapeDtypeStruct((bh, tp, dv_dim), od),
            jax.ShapeDtypeStruct((bh, dk, dv_dim), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((dk, bv), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=_interpret(interpret),
        name="gdn_recurrence_bwd",
    )(w, qg, aqk, kg, decay.reshape(bh, n, 1, 1), do, dht)


def recurrence_grads(do, h, v_new, dh, dv, *, chunk_size, interpret=False, block_sizes=BlockSizes()):
    """Same contract as `gpu_recurrence.recurrence_grads`, as batched XLA products over all chunks."""
    del interpret, block_sizes
    bh, n, dk, _ = h.shape
    c = chunk_size
    chunks = lambda x: x.reshape(bh, n, c, x.shape[-1])
    do_c, vn_c, dv_c = chunks(do), chunks(v_new), chunks(dv)
    flat = lambda x: x.reshape(bh, n * c, x.shape[-1]).astype(h.dtype)
    return (
        flat(einsum("bncv,bnkv->bnck", do_c, h)),
        flat(einsum("bnic,bnjc->bnij", do_c, vn_c)),
        flat(einsum("bncv,bnkv->bnck", vn_c, dh)),
        flat(-einsum("bncv,bnkv->bnck", dv_c, h)),
        einsum("bnkv,bnkv->bn", h, dh),
    )
