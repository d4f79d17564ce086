"""Pallas GPU kernels (Triton lowering) for the chunk-parallel SSD core and its backward.

The core is (o, h_T) = core(v, a, k, q, h0, seg) of xla.core (q = C, k = B, v = dt x,
a = dt A). Every chunk of L tokens is independent once the state entering it is
known, so the work splits into three stages, as in Mamba2's chunked algorithm:

    chunk_states   one program per (batch, head, chunk):  S_c = sum_j w_j v_j k_j^T  [P, N]
    state_pass     a short scan over the chunks:  h_{c+1} = carry_c h_c + S_c
                   (one program per (batch, head, slice of P*N), loops over chunks)
    chunk_outputs  one program per (batch, head, chunk, tile of rows):
                   o = ((q k^T) . E) v + e^{cs} (q h_c^T)

with cs the in-chunk cumulative log-decay, E_ij = exp(cs_i - cs_j) on the causal
same-segment pairs, w = e^{cs_L - cs} (times "token in the chunk's last segment")
and carry_c = e^{cs_L} (zero where a segment starts inside the chunk). cs, the two
per-token weights and the carries are elementwise XLA (ops.py); the kernels get them
as [B, H, Tp] float32 rows.

The chunk (how often a state is written: L) and the tile (how many rows a program
holds in registers: bt = min(L, block_sizes.tile)) are separate, so
a long chunk costs no registers: a program takes one tile of rows and loops over the
tiles of its chunk that it pairs with, one [bt, bt] block of q k^T at a time.

The backward runs the same stages on the cotangents and then one more chunk-parallel
kernel: chunk_states(do, q, e^{cs}) gives each chunk's gradient of its entering state,
state_pass in reverse gives g_c, the gradient of the state leaving chunk c (and dh0),
and chunk_grads forms dv, dk, dq per tile, recomputing E, q k^T and do v^T: as the
output tile it loops over source tiles (dq), as the source tile over output tiles
(dv, dk). One chunk_grads program serves all heads of a B/C group, so dq and dk (= dC,
dB) are summed over the group's heads in registers and written once per group.

The decay gradient is summed per chunk from terms that never cancel across chunks:
da_t is the sum over the (output i, source j) pairs with j < t <= i, which for t at
position tau of chunk c splits into
    pairs inside the chunk      sum_{i >= tau} rowsum(M)_i - colsum(M)_i,  M = (do v^T).(q k^T).E
    sources before the chunk    sum_{i >= tau} q_i . dq_inter_i
    outputs after the chunk     sum_{j < tau} v_j . dv_inter_j
    both outside                carry_c <g_c, h_c>
(M's blocks are formed alike in both loops, so its row and column sums cancel to
float32 rounding). chunk_grads returns the per-token terms; ops.py takes the in-chunk
cumulative sums. A reverse cumsum over the whole sequence of do.o - dv.v (the TPU
path's form) loses the difference of two long sums in bf16.

Matrix products take the inputs' dtype (bf16 on tensor cores, float32 accumulation);
float32 inputs get full float32 products (Triton "ieee"). Decays, cumulative sums and
the scan carry stay float32. The forward hands the entering states to chunk_outputs in
the inputs' dtype; the backward keeps h_c and g_c in float32 and multiplies them as
hi + lo bf16 pairs (_mm_fine), because through da's sums a bf16 state biased dA by 10 %
(rel-RMS, bf16, T = 1000 with a random initial state, chunk 64; 5e-3 with the split).
Triton wants power-of-two blocks with matrix dims >= 16: ops.py pads N and P, and L
must be a power of two >= 16. Launch parameters: `BlockSizes` (block_sizes.py).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.ssd.block_sizes import BlockSizes

_F32 = jnp.float32


def _params(block_sizes, kernel):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=getattr(block_sizes, f"{kernel}_warps"),
                                   num_stages=getattr(block_sizes, f"{kernel}_stages"))


def _mm(a, b, *, ta=False, tb=False):
    """a @ b (a^T, b^T with ta, tb) with float32 accumulation; float32 operands at full precision."""
    precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _mm_fine(a, b, **kw):
    """_mm where one operand is float32 and the other narrower: the float32 one is split into
    hi + lo in the narrow dtype, two tensor-core products with about 16 bits of mantissa."""
    if a.dtype == b.dtype:
        return _mm(a, b, **kw)
    if a.dtype == _F32:
        hi = a.astype(b.dtype)
        return _mm(hi, b, **kw) + _mm((a - hi.astype(_F32)).astype(b.dtype), b, **kw)
    hi = b.astype(a.dtype)
    return _mm(a, hi, **kw) + _mm(a, (b - hi.astype(_F32)).astype(a.dtype), **kw)


def _decay(cs_i, cs_j, s_i, s_j, i, j):
    """[bt, bt] exp(cs_i - cs_j) between row tile i and column tile j of a chunk on the
    causal, same-segment pairs, else 0 (s_i, s_j None without segments)."""
    bt = cs_i.shape[0]
    row = i * bt + lax.broadcasted_iota(jnp.int32, (bt, bt), 0)
    col = j * bt + lax.broadcasted_iota(jnp.int32, (bt, bt), 1)
    mask = col <= row
    if s_i is not None:
        mask = mask & (s_i[:, None] == s_j[None, :])
    return jnp.exp(jnp.where(mask, cs_i[:, None] - cs_j[None, :], -jnp.inf))


def _tile_rows(t, bt):
    return pl.ds(pl.multiple_of(t * bt, bt), bt)


def _tiling(L, tile):
    bt = min(L, tile)
    return bt, L // bt


# Block specs over grids (batch, head, chunk) or (batch, head, chunk, tile); r = heads per group.
def _chunk_spec(L, d, r):
    """Block (L, d) of a [B, Tp, G, d] array: the chunk of this program's head's group."""
    return pl.BlockSpec((None, L, None, d), lambda i, j, c, *_: (i, c, lax.div(j, j.dtype.type(r)), 0))


def _tile_spec(bt, nb, d, r):
    """Block (bt, d) of a [B, Tp, G, d] array: this program's tile."""
    return pl.BlockSpec((None, bt, None, d),
                        lambda i, j, c, t: (i, c * nb + t, lax.div(j, j.dtype.type(r)), 0))


def _row_spec(L):
    """Block (L,) of a [B, H, Tp] float32 row: the chunk."""
    return pl.BlockSpec((None, None, L), lambda i, j, c, *_: (i, j, c))


def _seg_spec(L):
    return pl.BlockSpec((None, L), lambda i, j, c, *_: (i, c))


def _state_spec(p, n):
    """Block (P, N) of a [B, H, nc, P, N] array of per-chunk states."""
    return pl.BlockSpec((None, None, None, p, n), lambda i, j, c, *_: (i, j, c, 0, 0))


# ------------------------------------------------------------------ chunk states
def _states_kernel(v_ref, k_ref, w_ref, out_ref, *, bt, nb, fine):
    def body(t, acc):
        rows = _tile_rows(t, bt)
        v = v_ref[rows, :]
        vw = v.astype(_F32) * w_ref[rows][:, None]
        if fine:
            return acc + _mm_fine(vw, k_ref[rows, :], ta=True)
        return acc + _mm(vw.astype(v.dtype), k_ref[rows, :], ta=True)

    out_ref[...] = lax.fori_loop(0, nb, body, jnp.zeros(out_ref.shape, _F32))


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_sizes", "fine", "interpret"))
def chunk_states(v, k, w, *, chunk_size, block_sizes=BlockSizes(), fine=False, interpret=False):
    """v [B,Tp,Hv,P], k [B,Tp,Gk,N], w [B,H,Tp] f32 -> [B,H,nc,P,N] f32: sum_j w_j v_j k_j^T per chunk.
    fine: w v is not rounded to v's dtype (two products, see _mm_fine)."""
    b, h, tp = w.shape
    p, n = v.shape[-1], k.shape[-1]
    L = chunk_size
    bt, nb = _tiling(L, block_sizes.tile)
    nc = tp // L
    return pl.pallas_call(
        functools.partial(_states_kernel, bt=bt, nb=nb, fine=fine),
        grid=(b, h, nc),
        in_specs=[_chunk_spec(L, p, h // v.shape[2]), _chunk_spec(L, n, h // k.shape[2]), _row_spec(L)],
        out_specs=_state_spec(p, n),
        out_shape=jax.ShapeDtypeStruct((b, h, nc, p, n), _F32),
        compiler_params=_params(block_sizes, "states"),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * h * tp * p * n * (2 if fine else 1), transcendentals=0,
            bytes_accessed=b * h * tp * (p + n) * v.dtype.itemsize + 4 * b * h * (tp + nc * p * n)),
        interpret=interpret,
        name="ssd_chunk_states",
    )(v, k, w)


# -------------------------------------------------------------------- state pass
def _pass_kernel(s_ref, carry_ref, h0_ref, out_ref, final_ref, *, nc, reverse):
    def body(step, state):
        c = nc - 1 - step if reverse else step
        out_ref[c, :] = state.astype(out_ref.dtype)
        return carry_ref[c] * state + s_ref[c, :]

    final_ref[...] = lax.fori_loop(0, nc, body, h0_ref[...])


@functools.partial(jax.jit, static_argnames=("out_dtype", "reverse", "interpret", "block_sizes"))
def state_pass(s, carry, h0, *, out_dtype, reverse=False, interpret=False, block_sizes=BlockSizes()):
    """Scan over chunks: state_{c+1} = carry_c state_c + s_c from h0 (from the last chunk
    down when reverse). s [B,H,nc,P,N] f32, carry [B,H,nc] f32, h0 [B,H,P,N] f32.
    Returns (the state met by each chunk before its own term [B,H,nc,P,N] in out_dtype,
    the state after all chunks [B,H,P,N] f32)."""
    b, h, nc, p, n = s.shape
    d = p * n
    bd = min(block_sizes.pass_block, d)
    out, final = pl.pallas_call(
        functools.partial(_pass_kernel, nc=nc, reverse=reverse),
        grid=(b, h, d // bd),
        in_specs=[pl.BlockSpec((None, None, nc, bd), lambda i, j, m: (i, j, 0, m)),
                  pl.BlockSpec((None, None, nc), lambda i, j, m: (i, j, 0)),
                  pl.BlockSpec((None, None, bd), lambda i, j, m: (i, j, m))],
        out_specs=[pl.BlockSpec((None, None, nc, bd), lambda i, j, m: (i, j, 0, m)),
                   pl.BlockSpec((None, None, bd), lambda i, j, m: (i, j, m))],
        out_shape=[jax.ShapeDtypeStruct((b, h, nc, d), out_dtype),
                   jax.ShapeDtypeStruct((b, h, d), _F32)],
        compiler_params=_params(block_sizes, "pass"),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * h * nc * d, transcendentals=0,
            bytes_accessed=b * h * (nc * d * (4 + jnp.dtype(out_dtype).itemsize) + 8 * d + 4 * nc)),
        interpret=interpret,
        name="ssd_state_pass_rev" if reverse else "ssd_state_pass",
    )(s.reshape(b, h, nc, d), carry, h0.reshape(b, h, d))
    return out.reshape(b, h, nc, p, n), final.reshape(b, h, p, n)


# ----------------------------------------------------------------- chunk outputs
def _outputs_kernel(*refs, bt, has_seg):
    if has_seg:
        q_ref, k_ref, v_ref, cs_ref, ein_ref, h_ref, s_ref, o_ref = refs
    else:
        q_ref, k_ref, v_ref, cs_ref, ein_ref, h_ref, o_ref = refs
    r = pl.program_id(3)
    rows = _tile_rows(r, bt)
    q = q_ref[...]
    cs_r = cs_ref[rows]
    s_r = s_ref[rows] if has_seg else None

    def body(j, o):  # source tile j <= r
        cols = _tile_rows(j, bt)
        decay = _decay(cs_r, cs_ref[cols], s_r, s_ref[cols] if has_seg else None, r, j)
        scores = _mm(q, k_ref[cols, :], tb=True) * decay
        v = v_ref[cols, :]
        return o + _mm(scores.astype(v.dtype), v)

    o = _mm(q, h_ref[...], tb=True) * ein_ref[rows][:, None]
    o_ref[...] = lax.fori_loop(0, r + 1, body, o)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_sizes", "interpret"))
def chunk_outputs(v, k, q, cs, ein, h_in, s, *, chunk_size, block_sizes=BlockSizes(), interpret=False):
    """o [B,Tp,H,P] f32 of every chunk from its entering state h_in [B,H,nc,P,N] (q's dtype).
    cs: in-chunk cumulative log-decay, ein = e^cs (0 outside the entering state's segment),
    both [B,H,Tp] f32; s [B,Tp] f32 segment index or None."""
    b, h, tp = cs.shape
    p, n = v.shape[-1], k.shape[-1]
    L = chunk_size
    bt, nb = _tiling(L, block_sizes.tile)
    in_specs = [_tile_spec(bt, nb, n, h // q.shape[2]), _chunk_spec(L, n, h // k.shape[2]),
                _chunk_spec(L, p, h // v.shape[2]), _row_spec(L), _row_spec(L), _state_spec(p, n)]
    args = [q, k, v, cs, ein, h_in]
    if s is not None:
        in_specs.append(_seg_spec(L))
        args.append(s)
    it = v.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_outputs_kernel, bt=bt, has_seg=s is not None),
        grid=(b, h, tp // L, nb),
        in_specs=in_specs,
        out_specs=_tile_spec(bt, nb, p, 1),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, p), _F32),
        compiler_params=_params(block_sizes, "outputs"),
        cost_estimate=pl.CostEstimate(
            flops=b * h * tp * ((L + bt) * (n + p) + 2 * p * n), transcendentals=b * h * tp * (L + bt) // 2,
            bytes_accessed=b * h * tp * ((2 * n + p) * it + 4 * p + 8) + b * h * tp // bt * p * n * it),
        interpret=interpret,
        name="ssd_chunk_outputs",
    )(*args)


# ------------------------------------------------------------------- chunk grads
def _grads_kernel(*refs, bt, nb, rh, has_seg):
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, cs_ref, ein_ref, eout_ref, h_ref, g_ref, s_ref,
         dv_ref, dk_ref, dq_ref, into_ref, out_of_ref) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, cs_ref, ein_ref, eout_ref, h_ref, g_ref,
         dv_ref, dk_ref, dq_ref, into_ref, out_of_ref) = refs
        s_ref = None
    seg = (lambda t: s_ref[t]) if has_seg else (lambda t: None)
    r = pl.program_id(3)
    rows = _tile_rows(r, bt)
    q_r, k_r, s_r = q_ref[rows, :], k_ref[rows, :], seg(rows)
    L = bt * nb
    chunk_end = lax.broadcasted_iota(jnp.int32, (L,), 0) == L - 1
    tile_end = (lax.broadcasted_iota(jnp.int32, (bt,), 0) == bt - 1) & (r == nb - 1)

    def head(hh, acc):  # one head of this program's group; dq, dk sum over the heads
        dq_group, dk_group = acc
        v_r, do_r, cs_r = v_ref[rows, hh, :], do_ref[rows, hh, :], cs_ref[hh, rows]
        # The [P, N] states are used early and read again later rather than held in
        # registers across the loops.
        h_in = h_ref[hh]
        g_dot_h = jnp.sum(g_ref[hh] * h_in)

        # As the output tile: sources j <= r give dq and the row sums of the pair terms.
        def as_output(j, acc):
            dq, into = acc
            cols = _tile_rows(j, bt)
            k_j = k_ref[cols, :]
            decay = _decay(cs_r, cs_ref[hh, cols], s_r, seg(cols), r, j)
            qk = _mm(q_r, k_j, tb=True)
            dscores = _mm(do_r, v_ref[cols, hh, :], tb=True) * decay
            into = into + jnp.sum(dscores * qk, axis=1)
            return dq + _mm(dscores.astype(k_j.dtype), k_j), into

        dq_inter = _mm_fine(do_r, h_in) * ein_ref[hh, rows][:, None]
        into0 = jnp.sum(q_r.astype(_F32) * dq_inter, axis=1)  # pairs from before the chunk
        dq, into = lax.fori_loop(0, r + 1, as_output, (dq_inter, into0))

        # As the source tile: outputs i >= r give dv, dk and the column sums of the pair terms.
        def as_source(i, acc):
            dv, dk, colsum = acc
            outs = _tile_rows(i, bt)
            q_i, do_i = q_ref[outs, :], do_ref[outs, hh, :]
            decay = _decay(cs_ref[hh, outs], cs_r, seg(outs), s_r, i, r)
            qk = _mm(q_i, k_r, tb=True)
            dscores = _mm(do_i, v_r, tb=True) * decay
            colsum = colsum + jnp.sum(dscores * qk, axis=0)
            dv = dv + _mm((qk * decay).astype(do_i.dtype), do_i, ta=True)
            return dv, dk + _mm(dscores.astype(q_i.dtype), q_i, ta=True), colsum

        eout_r = eout_ref[hh, rows][:, None]
        g_out = g_ref[hh]
        dv_inter = _mm_fine(k_r, g_out, tb=True) * eout_r
        dk_inter = _mm(v_r, g_out.astype(v_r.dtype)) * eout_r
        out_of_ref[hh, :] = jnp.sum(v_r.astype(_F32) * dv_inter, axis=1)  # pairs to after the chunk
        dv, dk, colsum = lax.fori_loop(r, nb, as_source, (dv_inter, dk_inter, jnp.zeros((bt,), _F32)))
        dv_ref[:, hh, :] = dv.astype(dv_ref.dtype)

        # Pairs from before the chunk to after it straddle every token of the chunk: their
        # sum goes on the chunk's last token, which every in-chunk reverse cumsum includes.
        carry = jnp.sum(jnp.where(chunk_end, ein_ref[hh, :], 0.0))
        into_ref[hh, :] = into - colsum + jnp.where(tile_end, carry * g_dot_h, 0.0)
        return dq_group + dq, dk_group + dk

    zeros = jnp.zeros((bt, q_r.shape[1]), _F32)
    dq, dk = lax.fori_loop(0, rh, head, (zeros, zeros))
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block_sizes", "interpret"))
def chunk_grads(v, k, q, do, cs, ein, eout, h_in, g_out, s, *, chunk_size, block_sizes=BlockSizes(), interpret=False):
    """dv [B,Tp,H,P] in v's dtype, dk, dq [B,Tp,G,N] in q's dtype (summed over the heads of
    a group in float32 inside the kernel: one program per (batch, group, chunk, tile) loops
    over its group's heads), and the per-token parts of da (into, out_of [B,H,Tp] f32):
    da = (in-chunk reverse cumsum of into) + (in-chunk exclusive cumsum of out_of).

    v, do [B,Tp,H,P] (one dtype); k, q [B,Tp,G,N]; h_in / g_out [B,H,nc,P,N] f32: the state
    entering each chunk and the loss gradient of the state leaving it; eout = e^{cs_L - cs}
    (0 outside the chunk's last segment); the rest as chunk_outputs."""
    b, h, tp = cs.shape
    p, n = v.shape[-1], k.shape[-1]
    g = k.shape[2]
    if q.shape[2] != g or v.shape[2] != h or do.shape[2] != h:
        raise ValueError(f"chunk_grads wants per-head v, do and one grouping of q, k: "
                         f"{v.shape}, {do.shape}, {q.shape}, {k.shape}")
    rh = h // g
    L = chunk_size
    bt, nb = _tiling(L, block_sizes.tile)
    group_chunk = pl.BlockSpec((None, L, None, n), lambda i, j, c, t: (i, c, j, 0))
    heads_chunk = pl.BlockSpec((None, L, rh, p), lambda i, j, c, t: (i, c, j, 0))
    heads_row = pl.BlockSpec((None, rh, L), lambda i, j, c, t: (i, j, c))
    heads_state = pl.BlockSpec((None, rh, None, p, n), lambda i, j, c, t: (i, j, c, 0, 0))
    in_specs = [group_chunk, group_chunk, heads_chunk, heads_chunk,
                heads_row, heads_row, heads_row, heads_state, heads_state]
    args = [q, k, v, do, cs, ein, eout, h_in, g_out]
    if s is not None:
        in_specs.append(_seg_spec(L))
        args.append(s)
    heads_tile_row = pl.BlockSpec((None, rh, bt), lambda i, j, c, t: (i, j, c * nb + t))
    it = v.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_grads_kernel, bt=bt, nb=nb, rh=rh, has_seg=s is not None),
        grid=(b, g, tp // L, nb),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bt, rh, p), lambda i, j, c, t: (i, c * nb + t, j, 0)),
                   _tile_spec(bt, nb, n, 1), _tile_spec(bt, nb, n, 1), heads_tile_row, heads_tile_row],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, p), v.dtype), jax.ShapeDtypeStruct((b, tp, g, n), k.dtype),
                   jax.ShapeDtypeStruct((b, tp, g, n), q.dtype), jax.ShapeDtypeStruct((b, h, tp), _F32),
                   jax.ShapeDtypeStruct((b, h, tp), _F32)],
        compiler_params=_params(block_sizes, "grads"),
        cost_estimate=pl.CostEstimate(
            flops=b * h * tp * ((L + bt) * (3 * n + 3 * p) + 10 * p * n),
            transcendentals=b * h * tp * (L + bt),
            bytes_accessed=b * tp * (h * 4 * p * it + g * 4 * n * it + h * 20)
            + 8 * b * h * tp // bt * p * n),
        interpret=interpret,
        name="ssd_chunk_grads",
    )(*args)
