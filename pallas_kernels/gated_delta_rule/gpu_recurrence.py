"""Pallas GPU kernels (Triton lowering) for the sequential part of the chunked
gated delta rule: the state recurrence across chunks and its reverse.

One program per (batch*head, block of V columns) walks all chunks in order with the
[K, BV] state in registers; columns of V never mix, so splitting V gives more
programs, at the cost of each one re-reading the chunk's K-side tiles. The forward
walk does only what the next state needs (v_new = u - w S, S' = decay S + kg^T v_new)
and stores each chunk's entering state and v_new; the outputs o = qg S + Aqk v_new
come after, in a kernel with one program per chunk. Both walks (forward and reverse)
load the next chunk's tiles while the current chunk's products run. The backward's
gradients that need no walk (dqg, dAqk, dkg, dw, ddecay) come from one parallel
kernel, `recurrence_grads`. The chunk-local
matrices (w, u, qg, Aqk, kg, decay) come from `xla.prepare`; in the fused GPU op
(gpu_op.py) the walk's come from `gpu_chunk_local.wy` and the outputs from
`gpu_chunk_local.output` (`gdn_recurrence_output` is then not used). Inputs here are
flattened head-major: [BH, Tp, D], Tp = N * C. Launch parameters: `BlockSizes`.

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

from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from pallas_kernels.gated_delta_rule.chunk_math import (
    chunk_backward_step, chunk_output, chunk_state_step, dot, recurrence_cost,
)


def output_block(dv, block_sizes):
    """V columns per program of the output kernels: block_sizes.output_block_v, or the
    whole V when it does not divide it."""
    bv = block_sizes.output_block_v
    return bv if dv % bv == 0 else dv


def _compiler_params(num_warps):
    # Each walk loads chunk i+1's tiles into registers before chunk i's products (`_walk`),
    # and no other kernel here loops over memory: Triton's own pipelining is off.
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def _walk(n_chunks, load, step, init, *, reverse=False):
    """Carry `init` through step(i, carry, tiles) over chunks i = 0..n-1 (n-1..0 with
    reverse), where tiles = load(i). The next chunk's tiles are loaded before the current
    chunk's step and carried in registers, so their memory latency hides behind its
    products instead of stalling every chunk of the walk."""
    chunk = (lambda j: n_chunks - 1 - j) if reverse else (lambda j: j)

    def body(j, carry):
        acc, tiles = carry
        upcoming = load(chunk(jnp.minimum(j + 1, n_chunks - 1)))
        return step(chunk(j), acc, tiles), upcoming

    return jax.lax.fori_loop(0, n_chunks, body, (init, load(chunk(0))))[0]


def check_power_of_two(interpret, **dims):
    """Triton's dots need each of `dims` a power of two >= 16 (interpret mode does not)."""
    if interpret:
        return
    for name, d in dims.items():
        if d < 16 or d & (d - 1):
            raise ValueError(f"Pallas GPU kernel needs {name} a power of two >= 16, got {d}")


def walk_block_v(dv, bh, block_sizes):
    """The walks' V block: block_sizes.walk_block_v, else V halved while it stays >= 16
    and the bh * V / block programs stay fewer than block_sizes.walk_programs."""
    bv = block_sizes.walk_block_v
    if bv is None:
        bv = dv
        while bv % 2 == 0 and bv // 2 >= 16 and bh * (dv // bv) < block_sizes.walk_programs:
            bv //= 2
    bv = min(bv, dv)
    if dv % bv:
        raise ValueError(f"V={dv} is not a multiple of the V block {bv}")
    return bv


def _states_kernel(w_ref, u_ref, kg_ref, decay_ref, h0_ref, h_ref, vn_ref, ht_ref, *, n_chunks, c):
    def load(i):
        sl = pl.ds(i * c, c)
        return w_ref[sl, :], u_ref[sl, :], kg_ref[sl, :], decay_ref[i]

    def step(i, s, tiles):
        h_ref[i] = s.astype(h_ref.dtype)
        v_new, s = chunk_state_step(s, *tiles)
        vn_ref[pl.ds(i * c, c), :] = v_new.astype(vn_ref.dtype)
        return s

    s = _walk(n_chunks, load, step, h0_ref[...].astype(jnp.float32))
    ht_ref[...] = s.astype(ht_ref.dtype)


def _out_kernel(qg_ref, aqk_ref, h_ref, vn_ref, o_ref):
    o_ref[...] = chunk_output(h_ref[...], qg_ref[...], aqk_ref[...], vn_ref[...]).astype(o_ref.dtype)


def recurrence_states(w, u, kg, decay, h0, *, chunk_size, interpret=False, block_sizes=BlockSizes()):
    """The sequential part: walk the chunks carrying the state.

    w, kg: [BH, Tp, K]; u: [BH, Tp, V]; decay: [BH, N] float32; h0: [BH, K, V] float32.
    Returns the state entering each chunk [BH, N, K, V] and v_new [BH, Tp, V] (both u's
    dtype) and the final state [BH, K, V] float32.
    """
    bh, tp, dk = w.shape
    dv = u.shape[-1]
    c = chunk_size
    n = tp // c
    bv = walk_block_v(dv, bh, block_sizes)
    check_power_of_two(interpret, chunk_size=c, K=dk, V_block=bv)
    od = u.dtype
    row = lambda d: pl.BlockSpec((None, tp, d), lambda i, j: (i, 0, 0))
    col = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((None, dk, bv), lambda i, j: (i, 0, j))
    itemsize = jnp.dtype(od).itemsize
    return pl.pallas_call(
        functools.partial(_states_kernel, n_chunks=n, c=c),
        grid=(bh, dv // bv),
        in_specs=[row(dk), col, row(dk), pl.BlockSpec((None, n), lambda i, j: (i, 0)), state],
        out_specs=[pl.BlockSpec((None, n, dk, bv), lambda i, j: (i, 0, 0, j)), col, state],
        out_shape=[jax.ShapeDtypeStruct((bh, n, dk, dv), od), jax.ShapeDtypeStruct((bh, tp, dv), od),
                   jax.ShapeDtypeStruct((bh, dk, dv), jnp.float32)],
        compiler_params=_compiler_params(block_sizes.walk_warps),
        cost_estimate=pl.CostEstimate(
            flops=4 * bh * tp * dk * dv, transcendentals=0,
            bytes_accessed=itemsize * bh * (tp * (2 * dk + 2 * dv) + n * dk * dv) + 8 * bh * dk * dv,
        ),
        interpret=interpret,
        name="gdn_recurrence_states",
    )(w, u, kg, decay, h0)


def recurrence_fwd(w, u, qg, aqk, kg, decay, h0, *, chunk_size, save_states=False, interpret=False,
                   block_sizes=BlockSizes()):
    """Run the state recurrence over all chunks (`recurrence_states`), then form every
    chunk's output in parallel, one program per (batch*head, chunk, `output_block` columns).

    w, qg, kg: [BH, Tp, K]; u: [BH, Tp, V]; aqk: [BH, Tp, C]; decay: [BH, N] float32;
    h0: [BH, K, V] float32. Returns o [BH, Tp, V] (u's dtype), final state [BH, K, V]
    float32 and, with save_states, the state entering each chunk [BH, N, K, V] and
    v_new [BH, Tp, V] (both u's dtype) for the backward pass.
    """
    h, v_new, ht = recurrence_states(w, u, kg, decay, h0, chunk_size=chunk_size, interpret=interpret,
                                     block_sizes=block_sizes)
    bh, tp, dk = w.shape
    dv = u.shape[-1]
    c = chunk_size
    n = tp // c
    bv = output_block(dv, block_sizes)
    tile = lambda d: pl.BlockSpec((None, c, d), lambda i, j, m: (i, j, 0))
    col = pl.BlockSpec((None, c, bv), lambda i, j, m: (i, j, m))
    itemsize = jnp.dtype(u.dtype).itemsize
    o = pl.pallas_call(
        _out_kernel,
        grid=(bh, n, dv // bv),
        in_specs=[tile(dk), tile(c), pl.BlockSpec((None, None, dk, bv), lambda i, j, m: (i, j, 0, m)), col],
        out_specs=col,
        out_shape=jax.ShapeDtypeStruct((bh, tp, dv), u.dtype),
        compiler_params=_compiler_params(block_sizes.recurrence_output_warps),
        cost_estimate=pl.CostEstimate(
            flops=2 * bh * tp * dv * (dk + c), transcendentals=0,
            bytes_accessed=itemsize * bh * (tp * (dk + c) * (dv // bv) + 2 * tp * dv + n * dk * dv),
        ),
        interpret=interpret,
        name="gdn_recurrence_output",
    )(qg, aqk, h, v_new)
    return (o, ht, h, v_new) if save_states else (o, ht)


def _bwd_kernel(w_ref, qg_ref, aqk_ref, kg_ref, decay_ref, do_ref, dht_ref, dh_ref, dv_ref, dh0_ref, *,
                n_chunks, c):
    def load(i):
        sl = pl.ds(i * c, c)
        return do_ref[sl, :], w_ref[sl, :], qg_ref[sl, :], aqk_ref[sl, :], kg_ref[sl, :], decay_ref[i]

    def step(i, ds, tiles):
        dh_ref[i] = ds.astype(dh_ref.dtype)
        dv, ds = chunk_backward_step(ds, *tiles)
        dv_ref[pl.ds(i * c, c), :] = dv.astype(dv_ref.dtype)
        return ds

    ds = _walk(n_chunks, load, step, dht_ref[...].astype(jnp.float32), reverse=True)
    dh0_ref[...] = ds.astype(dh0_ref.dtype)


def recurrence_bwd(w, qg, aqk, kg, decay, do, dht, *, chunk_size, interpret=False, block_sizes=BlockSizes()):
    """Walk the chunks backwards carrying dL/dS.

    Returns dL/d(state leaving each chunk) and dL/dv_new, [BH, N, K, V] and [BH, Tp, V]
    in w's dtype, and dL/dh0 [BH, K, V] float32.
    """
    bh, tp, dk = w.shape
    dv_dim = do.shape[-1]
    c = chunk_size
    n = tp // c
    bv = walk_block_v(dv_dim, bh, block_sizes)
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
            jax.ShapeDtypeStruct((bh, tp, dv_dim), od),
            jax.ShapeDtypeStruct((bh, dk, dv_dim), jnp.float32),
        ],
        compiler_params=_compiler_params(block_sizes.walk_warps),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=bytes_accessed),
        interpret=interpret,
        name="gdn_recurrence_bwd",
    )(w, qg, aqk, kg, decay, do, dht)


def _grads_kernel(do_ref, vn_ref, dvn_ref, h_ref, dh_ref, dqg_ref, daqk_ref, dkg_ref, dw_ref, dec_ref, *, bv):
    nv = do_ref.shape[1] // bv
    cols = lambda j: (slice(None), pl.ds(j * bv, bv))

    def body(j, acc):
        do, vn, dvn = do_ref[cols(j)], vn_ref[cols(j)], dvn_ref[cols(j)]
        h, dh = h_ref[cols(j)], dh_ref[cols(j)]
        dqg, dkg, dw, dec = acc
        return (dqg + dot(do, h.T), dkg + dot(vn, dh.T), dw - dot(dvn, h.T),
                dec + jnp.sum(h.astype(jnp.float32) * dh.astype(jnp.float32), axis=1))

    c, bk = dqg_ref.shape
    zeros = jnp.zeros((c, bk), jnp.float32)
    dqg, dkg, dw, dec = jax.lax.fori_loop(0, nv, body, (zeros, zeros, zeros, jnp.zeros((bk,), jnp.float32)))
    dqg_ref[...] = dqg.astype(dqg_ref.dtype)
    dkg_ref[...] = dkg.astype(dkg_ref.dtype)
    dw_ref[...] = dw.astype(dw_ref.dtype)
    dec_ref[...] = dec

    @pl.when(pl.program_id(2) == 0)
    def _():
        daqk = jax.lax.fori_loop(
            0, nv, lambda j, acc: acc + dot(do_ref[cols(j)], vn_ref[cols(j)].T), jnp.zeros((c, c), jnp.float32)
        )
        daqk_ref[...] = daqk.astype(daqk_ref.dtype)


def recurrence_grads(do, h, v_new, dh, dv, *, chunk_size, interpret=False, block_sizes=BlockSizes()):
    """The recurrence's gradients other than those of the walk, every chunk in parallel:
    with o = qg S + aqk v_new, v_new = u - w S, S' = decay S + kg^T v_new per chunk,

        dqg = do S^T, daqk = do v_new^T, dkg = v_new dS'^T, dw = -dv_new S^T, ddecay = sum(S . dS').

    do, v_new, dv (= dL/dv_new): [BH, Tp, V]; h, dh (S and dL/dS' per chunk): [BH, N, K, V],
    all one dtype. Returns dqg, dkg, dw [BH, Tp, K], daqk [BH, Tp, C] in that dtype and
    ddecay [BH, N] float32. One program per (batch*head, chunk, block_sizes.grads_block_k
    rows of K); V is summed over in blocks of `output_block` columns inside."""
    bh, n, dk, dv_dim = h.shape
    c = chunk_size
    tp = n * c
    od = h.dtype
    bk = min(dk, block_sizes.grads_block_k)
    bv = output_block(dv_dim, block_sizes)
    rows = pl.BlockSpec((None, c, dv_dim), lambda i, j, m: (i, j, 0))
    state = pl.BlockSpec((None, None, bk, dv_dim), lambda i, j, m: (i, j, m, 0))
    kcol = pl.BlockSpec((None, c, bk), lambda i, j, m: (i, j, m))
    itemsize = jnp.dtype(od).itemsize
    dqg, daqk, dkg, dw, dec = pl.pallas_call(
        functools.partial(_grads_kernel, bv=bv),
        grid=(bh, n, dk // bk),
        in_specs=[rows, rows, rows, state, state],
        out_specs=[kcol, pl.BlockSpec((None, c, c), lambda i, j, m: (i, j, 0)), kcol, kcol,
                   pl.BlockSpec((None, None, bk), lambda i, j, m: (i, j, m))],
        out_shape=[jax.ShapeDtypeStruct((bh, tp, dk), od), jax.ShapeDtypeStruct((bh, tp, c), od)]
        + [jax.ShapeDtypeStruct((bh, tp, dk), od)] * 2 + [jax.ShapeDtypeStruct((bh, n, dk), jnp.float32)],
        compiler_params=_compiler_params(block_sizes.grads_warps),
        cost_estimate=pl.CostEstimate(
            flops=2 * bh * tp * dv_dim * (3 * dk + c), transcendentals=0,
            bytes_accessed=itemsize * bh * (3 * tp * dv_dim * (dk // bk) + 2 * n * dk * dv_dim + tp * (3 * dk + c)),
        ),
        interpret=interpret,
        name="gdn_recurrence_grads",
    )(do, v_new, dv, h, dh)
    return dqg, daqk, dkg, dw, jnp.sum(dec, axis=-1)
