"""Pallas GPU kernels (Triton lowering) for the chunk-parallel part of the chunked gated
delta rule: everything local to a chunk (what `xla.prepare` computes), its reverse, and
the op's output from the states. Every kernel runs one program per (batch*head,
chunk[, V block]) and reads its chunk of q, k, v, g, beta straight from the
[B, Tp, H, D] layout (a strided block, no transpose in XLA).

    wy           L = beta K K^T . exp(G_i - G_j) (strictly lower, same segment), G = cumsum g,
                 T = (I + L)^-1,  w = T (beta e^G carry_in k),  u = T (beta v),
                 kg = e^(G_last - G) carry_out k
    output       o = qg S + aqk v_new from the state S entering the chunk and v_new (the
                 walk's), forming aqk and qg here from q, k and g rather than reading them
    aqk_qg       aqk = scale (Q K^T) . exp(G_i - G_j) (causal, same segment),  qg = scale e^G q
                 (the backward's operands; the forward forms them inside `output`)
    prepare_bwd  the reverse of aqk_qg and wy

gpu_op.py runs the whole op from these and the state walks of gpu_recurrence.py.
`prepare` (aqk_qg and wy behind their own VJP, the contract of `xla.prepare`) is the
unit the tests and benchmarks hold against xla.prepare. Launch parameters: `BlockSizes`.

The wy kernel holds L and T as 16 x 16 register tiles, one per block (Triton cannot
slice a register tile, so each block of L is its own K_a K_b^T product of key rows read
from memory). It inverts the diagonal blocks by doubling inside the tile, masking L to
the pairs each level joins (`_inv_unit_lower`), then doubles over blocks,
[[X, 0], [A, Y]]^-1 = [[X^-1, 0], [-Y^-1 A X^-1, Y^-1]]. T is stored in the inputs' dtype,
the operand dtype of the products with it; the inversion's dots are exact for float32
inputs and TF32 for 16-bit ones, whose T is rounded coarser still. L never goes through
memory. The other products run on whole tiles in the inputs' dtype, so bf16 inputs use
the tensor cores with float32 accumulation.

The backward kernel works on whole tiles. It takes T, w and u from the forward, and
forms dq, dk, dv, dg, dbeta from the cotangents of w, u, qg, aqk, kg:

    dR = T^T dW    (W = T R, for w and u)
    dL = -(dR_w w^T + dR_u u^T)     (on the strictly lower, same-segment pairs)

then through L_ij = beta_i (k_i . k_j) E_ij, aqk, qg, kg, and the reverse in-chunk
cumsum for dg. The per-chunk decay exp(G_last) stays in XLA (one sum per chunk).
Segment boundaries enter as in `xla.prepare`: pairs interact only within a segment,
carry_in / carry_out mask the terms that touch the states entering / leaving the chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import chunk_segments, pad_time
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from pallas_kernels.gated_delta_rule.chunk_math import Chunked, chunk_output
from pallas_kernels.gated_delta_rule.gpu_recurrence import check_power_of_two, output_block

SUB = 16  # side of the blocks T is built from (Triton's smallest dot)
# Widest K or V the op sends here by default (ops.py): the kernels hold whole [C, K] and
# [C, V] float32 tiles, which at K = 256 or V = 512 would not fit in registers. Measured
# on GPU up to 128 (BENCHMARKS.md); wider heads use xla.prepare.
MAX_WIDTH = 128

_F32 = jnp.float32


def _mm(a, b, *, ta=False, tb=False, precision=jax.lax.Precision.HIGHEST):
    """a @ b (a^T, b^T with ta, tb) with float32 accumulation. Float32 operands at
    `precision`: HIGHEST (Triton "ieee", exact) unless a caller asks for DEFAULT (TF32)."""
    precision = precision if a.dtype == _F32 else None
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


class _Gates:
    """A chunk's gates and segment masks: G = cumsum g, e^G, G_last, beta, and the pair decays."""

    def __init__(self, g_ref, beta_ref, seg_refs):
        c = g_ref.shape[0]
        self.c = c
        self.gcum = jnp.cumsum(g_ref[...].astype(_F32))
        self.eg = jnp.exp(self.gcum)
        self.glast = jnp.sum(jnp.where(_iota((c,), 0) == c - 1, self.gcum, 0.0))
        self.beta = None if beta_ref is None else beta_ref[...].astype(_F32)
        self.seg_refs = seg_refs

    def pair_decays(self):
        """[C, C] exp(G_i - G_j) on pairs of one segment with j < i (strict) and with j <= i
        (causal), 0 elsewhere: one exp for both."""
        shape = (self.c, self.c)
        r, col = _iota(shape, 0), _iota(shape, 1)
        m = r >= col
        if self.seg_refs is not None:
            seg = self.seg_refs[0][...]
            m = m & (seg[:, None] == seg[None, :])
        diff = self.gcum[:, None] - self.gcum[None, :]
        causal = jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)
        return jnp.where(r > col, causal, 0.0), causal

    def carry_in(self, x):
        """x where a position sees the state entering the chunk, else 0."""
        return x if self.seg_refs is None else x * self.seg_refs[1][...]

    def carry_out(self, x):
        """x where a position reaches the state leaving the chunk, else 0."""
        return x if self.seg_refs is None else x * self.seg_refs[2][...]

    def rhs_w_scale(self):
        """Row scale of w's right-hand side: beta e^G carry_in."""
        return self.carry_in(self.beta * self.eg)

    def kg_scale(self):
        """Row scale of kg: e^(G_last - G) carry_out."""
        return self.carry_out(jnp.exp(self.glast - self.gcum))


def _split(refs, has_seg):
    return (refs[:3], refs[3:]) if has_seg else (None, refs)


def _scale_rows(x, s, dtype):
    """s[:, None] * x in float32, cast to dtype."""
    return (s[:, None] * x.astype(_F32)).astype(dtype)


def _aqk_qg_kernel(q_ref, k_ref, g_ref, *refs, scale, has_seg):
    seg_refs, (aqk_ref, qg_ref) = _split(refs, has_seg)
    gt = _Gates(g_ref, None, seg_refs)
    aqk, qg = _aqk_qg_tiles(gt, q_ref[...], k_ref[...], scale, aqk_ref.dtype)
    aqk_ref[...] = aqk
    qg_ref[...] = qg.astype(qg_ref.dtype)


def _aqk_qg_tiles(gt, q, k, scale, dtype):
    """aqk = scale (Q K^T) . exp(G_i - G_j) (causal, same segment) and qg = scale e^G
    carry_in q of one chunk, in dtype."""
    _, causal = gt.pair_decays()
    aqk = (scale * _mm(q, k, tb=True) * causal).astype(dtype)
    return aqk, _scale_rows(q, gt.carry_in(scale * gt.eg), dtype)


def _output_kernel(q_ref, k_ref, g_ref, *refs, scale, has_seg):
    """o = qg S + aqk v_new of one chunk and block of V columns, with aqk and qg formed
    here from q, k and the gates rather than read from memory."""
    seg_refs, (h_ref, vn_ref, o_ref) = _split(refs, has_seg)
    gt = _Gates(g_ref, None, seg_refs)
    aqk, qg = _aqk_qg_tiles(gt, q_ref[...], k_ref[...], scale, vn_ref.dtype)
    o_ref[...] = chunk_output(h_ref[...], qg, aqk, vn_ref[...]).astype(o_ref.dtype)


def _inv_unit_lower(l_mat, mm):
    """(I + L)^-1 for a strictly lower [s, s] L (s a power of two) by doubling inside the
    tile: with T the inverse of I + L's diagonal h x h blocks, the 2h x 2h blocks' inverse
    is T - T N T, N = L on the (lower half, upper half) pairs of each 2h block, 0 elsewhere.
    No slicing, no row extraction: log2(s) levels of two dots (`mm`) on the whole tile."""
    s = l_mat.shape[0]
    r, col = _iota((s, s), 0), _iota((s, s), 1)
    t = (r == col).astype(_F32) - jnp.where((r % 2 == 1) & (col == r - 1), l_mat, 0.0)  # h = 1: T N T = N
    h = 2
    while h < s:
        n = jnp.where(((r // h) % 2 == 1) & (col // h == r // h - 1), l_mat, 0.0)
        t = t - mm(t, mm(n, t))
        h *= 2
    return t


def _wy_kernel(k_ref, v_ref, g_ref, beta_ref, *refs, bs, has_seg, keep_t):
    """L, T = (I + L)^-1, w and u of one chunk in bs-row blocks, each block a register
    tile of its own (Triton cannot slice one): the blocks of L from K K^T of key blocks
    read straight from k_ref, the diagonal blocks of T by `_inv_unit_lower`, the rest by
    doubling over blocks, [[X, 0], [A, Y]]^-1 = [[X^-1, 0], [-Y^-1 A X^-1, Y^-1]], then w
    and u from T's blocks, and kg. The inversion's dots are exact float32 for float32
    inputs, TF32 for 16-bit ones (their rounding is below that of T in that dtype)."""
    seg_refs, outs = _split(refs, has_seg)
    t_ref, (w_ref, u_ref, kg_ref) = (outs[0], outs[1:]) if keep_t else (None, outs)
    cd = k_ref.dtype  # T's dtype: the operand dtype of its products
    nb = k_ref.shape[0] // bs
    rows = lambda a: pl.ds(a * bs, bs)
    precision = jax.lax.Precision.HIGHEST if cd == _F32 else jax.lax.Precision.DEFAULT
    mm = functools.partial(_mm, precision=precision)
    r, col = _iota((bs, bs), 0), _iota((bs, bs), 1)
    gcum, beta, k, seg = [], [], [], []
    total = 0.0  # G at the end of the blocks so far
    for a in range(nb):
        g = g_ref[rows(a)].astype(_F32)
        gcum.append(total + jnp.cumsum(g))
        total = total + jnp.sum(g)
        beta.append(beta_ref[rows(a)].astype(_F32))
        k.append(k_ref[rows(a), :])
        if has_seg:
            seg.append(seg_refs[0][rows(a)])
    lower = {}  # L_ab = beta_a (K_a K_b^T) . exp(G_a - G_b) on the strictly lower, same-segment pairs
    for a in range(nb):
        for b in range(a + 1):
            m = (r > col) if a == b else None
            if has_seg:
                same = seg[a][:, None] == seg[b][None, :]
                m = same if m is None else m & same
            diff = gcum[a][:, None] - gcum[b][None, :]  # <= 0 on pairs of later rows
            decay = jnp.exp(diff) if m is None else jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)
            lower[a, b] = beta[a][:, None] * _mm(k[a], k[b], tb=True) * decay
    t = {(a, a): _inv_unit_lower(lower[a, a], mm) for a in range(nb)}
    h = 1
    while h < nb:
        for start in range(0, nb, 2 * h):
            top, bot = range(start, min(start + h, nb)), range(start + h, min(start + 2 * h, nb))
            ax = {(i, j): sum(mm(lower[i, m], t[m, j]) for m in top if m >= j) for i in bot for j in top}
            for i in bot:
                for j in top:
                    t[i, j] = -sum(mm(t[i, m], ax[m, j]) for m in bot if m <= i)
        h *= 2
    t = {key: x.astype(cd) for key, x in t.items()}
    if keep_t:
        for a in range(nb):
            for b in range(nb):
                t_ref[rows(a), rows(b)] = t[a, b] if b <= a else jnp.zeros((bs, bs), cd)
    # Right-hand sides beta e^G carry_in k and beta v, and kg, from key rows read again
    # rather than held since L.
    rw, ru = [], []
    for a in range(nb):
        scale_w = beta[a] * jnp.exp(gcum[a])
        if has_seg:
            scale_w = scale_w * seg_refs[1][rows(a)]
        k_a = k_ref[rows(a), :]
        rw.append(_scale_rows(k_a, scale_w, cd))
        scale_kg = jnp.exp(total - gcum[a])  # e^(G_last - G) carry_out
        if has_seg:
            scale_kg = scale_kg * seg_refs[2][rows(a)]
        kg_ref[rows(a), :] = _scale_rows(k_a, scale_kg, kg_ref.dtype)
        ru.append(_scale_rows(v_ref[rows(a), :], beta[a], cd))
        w_ref[rows(a), :] = sum(_mm(t[a, b], rw[b]) for b in range(a + 1)).astype(w_ref.dtype)
        u_ref[rows(a), :] = sum(_mm(t[a, b], ru[b]) for b in range(a + 1)).astype(u_ref.dtype)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, *refs, scale, has_seg):
    seg_refs, refs = _split(refs, has_seg)
    t_ref, w_ref, u_ref, dw_ref, du_ref, dqg_ref, daqk_ref, dkg_ref = refs[:8]
    dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref = refs[8:]
    gt = _Gates(g_ref, beta_ref, seg_refs)
    t, k = t_ref[...], k_ref[...]
    cd = t.dtype  # operand dtype of the K- and V-wide products: the inputs'
    k32 = k.astype(_F32)
    rowsum = lambda x: jnp.sum(x, axis=1)
    colsum = lambda x: jnp.sum(x, axis=0)

    # w = T R_w, u = T R_u  ->  dR = T^T dW ;  dL = -(dR_w w^T + dR_u u^T) on the strict pairs.
    # One of dR_u, dR_w live at a time (the kernel is short of registers).
    # R_u = beta v
    dru = _mm(t, du_ref[...].astype(cd), ta=True)
    dl = -_mm(dru.astype(cd), u_ref[...].astype(cd), tb=True)
    dv_ref[...] = (gt.beta[:, None] * dru).astype(dv_ref.dtype)
    dbeta = rowsum(dru * v_ref[...].astype(_F32))
    # R_w = beta e^G carry_in k
    drw = _mm(t, dw_ref[...].astype(cd), ta=True)
    dl -= _mm(drw.astype(cd), w_ref[...].astype(cd), tb=True)
    cw = gt.rhs_w_scale()
    s = rowsum(drw * k32)
    dk = cw[:, None] * drw
    dbeta += gt.carry_in(s * gt.eg)
    dgc = s * cw
    # L_ij = beta_i (k_i . k_j) E_ij (E is 0 off the strict same-segment pairs, so is dL . E)
    strict, causal = gt.pair_decays()
    be = dl * strict
    kk = _mm(k, k, tb=True)
    dbeta += rowsum(be * kk)
    y = gt.beta[:, None] * be * kk  # dL . L
    dgc += rowsum(y) - colsum(y)
    dkk = (gt.beta[:, None] * be).astype(cd)
    dk += _mm(dkk, k) + _mm(dkk, k, ta=True)
    # aqk_ij = scale (q_i . k_j) E_ij on the causal pairs
    q = q_ref[...]
    p = scale * daqk_ref[...].astype(_F32) * causal
    x = p * _mm(q, k, tb=True)
    dgc += rowsum(x) - colsum(x)
    p = p.astype(cd)
    dk += _mm(p, q, ta=True)
    # qg = scale e^G carry_in q
    dqg = dqg_ref[...].astype(_F32)
    cq = gt.carry_in(scale * gt.eg)
    dgc += cq * rowsum(dqg * q.astype(_F32))
    dq_ref[...] = (_mm(p, k) + cq[:, None] * dqg).astype(dq_ref.dtype)
    # kg = e^(G_last - G) carry_out k
    dkg = dkg_ref[...].astype(_F32)
    ck = gt.kg_scale()
    dk += ck[:, None] * dkg
    r = ck * rowsum(dkg * k32)
    dgc -= r
    # G = cumsum(g): dg_j = sum_{i >= j} dG_i, and G_last = sum(g) adds dG_last = sum(r) everywhere.
    dg_ref[...] = (jnp.sum(dgc) - jnp.cumsum(dgc) + dgc + jnp.sum(r)).astype(dg_ref.dtype)
    dbeta_ref[...] = dbeta.astype(dbeta_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


def _token_specs(b, h, c, dims, has_seg):
    """Specs of [B, Tp, H, d] arrays (d in dims; None: a [B, Tp, H] gate) and, with has_seg,
    of seg, carry_in, carry_out [B, Tp], for a grid (B*H, N, ...)."""
    tok = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j, *_: (i // h, j, i % h, 0))
    gate = pl.BlockSpec((None, c, None), lambda i, j, *_: (i // h, j, i % h))
    specs = [gate if d is None else tok(d) for d in dims]
    if has_seg:
        specs += [pl.BlockSpec((None, c), lambda i, j, *_: (i // h, j))] * 3
    return specs


def _chunk_specs(c, dims):
    """Specs of head-major [BH, Tp, d] arrays, d in dims, for the grid (B*H, N)."""
    return [pl.BlockSpec((None, c, d), lambda i, j: (i, j, 0)) for d in dims]


def _call(kernel, name, num_warps, grid, in_specs, out_specs, out_shape, flops, nbytes, transcendentals, interpret):
    # Nothing here loops over memory: one pipeline stage.
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=transcendentals, bytes_accessed=nbytes),
        interpret=interpret,
        name=name,
    )


def _sub(c):
    """Block side for T: SUB, or the whole chunk when SUB does not divide it (interpret mode only)."""
    return SUB if c % SUB == 0 else c


def _gate_bytes(b, h, tp, has_seg, gates=2):
    """Bytes read of `gates` float32 [B, Tp, H] gates (g, beta) and the segment masks."""
    return b * h * tp * 4 * gates + (12 * b * tp if has_seg else 0)


def aqk_qg(q, k, g, segs, *, chunk_size, scale, out_dtype, interpret=False, block_sizes=BlockSizes()):
    """q, k: [B, Tp, H, K]; g: [B, Tp, H] float32; segs: None or (segment index int32,
    carry_in float32, carry_out float32), each [B, Tp]. Returns aqk [BH, Tp, C] and
    qg [BH, Tp, K], head-major, in out_dtype."""
    b, tp, h, dk = q.shape
    c = chunk_size
    check_power_of_two(interpret, chunk_size=c, K=dk)
    has_seg = segs is not None
    bht, isz, osz = b * h * tp, q.dtype.itemsize, jnp.dtype(out_dtype).itemsize
    return _call(
        functools.partial(_aqk_qg_kernel, scale=scale, has_seg=has_seg), "gdn_aqk_qg", block_sizes.aqk_qg_warps,
        (b * h, tp // c),
        _token_specs(b, h, c, (dk, dk, None), has_seg), _chunk_specs(c, (c, dk)),
        [jax.ShapeDtypeStruct((b * h, tp, d), out_dtype) for d in (c, dk)],
        flops=2 * bht * c * dk, nbytes=_gate_bytes(b, h, tp, has_seg, 1) + bht * (2 * isz * dk + osz * (c + dk)),
        transcendentals=bht * (c + 1), interpret=interpret,
    )(q, k, g, *(segs or ()))


def wy(k, v, g, beta, segs, *, chunk_size, out_dtype, keep_t=True, interpret=False, block_sizes=BlockSizes()):
    """k: [B, Tp, H, K], v: [B, Tp, H, V] (one dtype); g and beta [B, Tp, H] float32; segs
    as in `aqk_qg`. Returns
    T = (I + L)^-1 per chunk [BH, Tp, C] in k's dtype (for the backward; None without
    keep_t, which saves its writes), and w, kg [BH, Tp, K] and u [BH, Tp, V], head-major,
    in out_dtype."""
    b, tp, h, dk = k.shape
    dv = v.shape[-1]
    c = chunk_size
    check_power_of_two(interpret, chunk_size=c, K=dk, V=dv)
    has_seg = segs is not None
    shape = lambda d, dt=out_dtype: jax.ShapeDtypeStruct((b * h, tp, d), dt)
    bht, isz, osz = b * h * tp, k.dtype.itemsize, jnp.dtype(out_dtype).itemsize
    bs = _sub(c)
    dims = (c, dk, dv, dk) if keep_t else (dk, dv, dk)
    outs = _call(
        functools.partial(_wy_kernel, bs=bs, has_seg=has_seg, keep_t=keep_t), "gdn_wy", block_sizes.wy_warps,
        (b * h, tp // c),
        _token_specs(b, h, c, (dk, dv, None, None), has_seg), _chunk_specs(c, dims),
        [shape(c, k.dtype)] * keep_t + [shape(dk), shape(dv), shape(dk)],
        flops=bht * (2 * c * dk + c * (c + bs) + 2 * c * (dk + dv)),
        nbytes=_gate_bytes(b, h, tp, has_seg) + bht * (isz * (dk + dv + c * keep_t) + osz * (2 * dk + dv)),
        transcendentals=bht * (c + 2), interpret=interpret,
    )(k, v, g, beta, *(segs or ()))
    return outs if keep_t else (None, *outs)


def output(q, k, g, segs, states, v_new, *, chunk_size, scale, out_dtype, interpret=False, block_sizes=BlockSizes()):
    """The op's output o = qg S + aqk v_new per chunk, with qg and aqk formed in the kernel
    from q, k [B, Tp, H, K] and g [B, Tp, H] (segs as in `aqk_qg`) instead of read from
    memory. states: the state entering each chunk [BH, N, K, V]; v_new: [BH, Tp, V] (one
    dtype, the products' operands). Returns o [B, Tp, H, V] in out_dtype, one program per
    (batch*head, chunk, block of V columns)."""
    b, tp, h, dk = q.shape
    dv = v_new.shape[-1]
    c = chunk_size
    bv = output_block(dv, block_sizes)
    check_power_of_two(interpret, chunk_size=c, K=dk, V_block=bv)
    has_seg = segs is not None
    in_specs = _token_specs(b, h, c, (dk, dk, None), has_seg) + [
        pl.BlockSpec((None, None, dk, bv), lambda i, j, m: (i, j, 0, m)),
        pl.BlockSpec((None, c, bv), lambda i, j, m: (i, j, m)),
    ]
    bht, isz = b * h * tp, v_new.dtype.itemsize
    return _call(
        functools.partial(_output_kernel, scale=scale, has_seg=has_seg), "gdn_output", block_sizes.output_warps,
        (b * h, tp // c, dv // bv),
        in_specs, pl.BlockSpec((None, c, None, bv), lambda i, j, m: (i // h, j, i % h, m)),
        jax.ShapeDtypeStruct((b, tp, h, dv), out_dtype),
        flops=2 * bht * (c * dk * dv // bv + dv * (dk + c)),
        nbytes=_gate_bytes(b, h, tp, has_seg, 1) + bht * (2 * q.dtype.itemsize * dk * dv // bv + isz * (dk + 1) * dv
                                                        + jnp.dtype(out_dtype).itemsize * dv),
        transcendentals=bht * (c + 1) * dv // bv, interpret=interpret,
    )(q, k, g, *(segs or ()), states, v_new)


def prepare_bwd(q, k, v, g, beta, segs, t, w, u, dw, du, dqg, daqk, dkg, *, chunk_size, scale, interpret=False,
                block_sizes=BlockSizes()):
    """Reverse of `aqk_qg` and `wy` given wy's T, w and u: cotangents of w, u, qg, aqk, kg
    ([BH, Tp, ...]) to dq, dk, dv ([B, Tp, H, ...], q's dtype) and dg, dbeta ([B, Tp, H] float32)."""
    b, tp, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    check_power_of_two(interpret, chunk_size=c, K=dk, V=dv)
    has_seg = segs is not None
    in_specs = _token_specs(b, h, c, (dk, dk, dv, None, None), has_seg)
    in_specs += _chunk_specs(c, (c, dk, dv, dk, dv, dk, c, dk))
    out_shape = [jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v)]
    out_shape += [jax.ShapeDtypeStruct(g.shape, _F32)] * 2
    bht, isz = b * h * tp, q.dtype.itemsize
    flops = 2 * bht * c * (5 * dk + 3 * dv)
    nbytes = bht * (2 * isz * (2 * dk + dv) + 16 + isz * c + dw.dtype.itemsize * (5 * dk + 3 * dv + c))
    return _call(
        functools.partial(_bwd_kernel, scale=scale, has_seg=has_seg), "gdn_prepare_bwd",
        block_sizes.prepare_bwd_warps_at(max(dk, dv)), (b * h, tp // c), in_specs,
        _token_specs(b, h, c, (dk, dk, dv, None, None), False), out_shape,
        flops=flops, nbytes=nbytes, transcendentals=bht * (c + 2), interpret=interpret,
    )(q, k, v, g, beta, *(segs or ()), t, w, u, dw, du, dqg, daqk, dkg)


def segment_cotangents(segs):
    """Cotangents of segs (the integer index and the masks get none)."""
    return None if segs is None else tuple(jnp.zeros_like(x) if x.dtype == _F32 else None for x in segs)


@functools.lru_cache(maxsize=None)
def _prepare_op(chunk_size: int, scale: float, out_dtype, interpret: bool, block_sizes: BlockSizes):
    """custom_vjp of (q, k, v, g, beta, segs) -> (w, u, qg, aqk, kg), arguments as in
    `aqk_qg` and `wy`."""
    kw = dict(chunk_size=chunk_size, interpret=interpret, block_sizes=block_sizes)

    def run(q, k, v, g, beta, segs):
        aqk, qg = aqk_qg(q, k, g, segs, scale=scale, out_dtype=out_dtype, **kw)
        t, w, u, kg = wy(k, v, g, beta, segs, out_dtype=out_dtype, **kw)
        return (w, u, qg, aqk, kg), t

    @jax.custom_vjp
    def op(q, k, v, g, beta, segs):
        return run(q, k, v, g, beta, segs)[0]

    def fwd(q, k, v, g, beta, segs):
        outs, t = run(q, k, v, g, beta, segs)
        return outs, (q, k, v, g, beta, segs, t, outs[0], outs[1])

    def bwd(res, cts):
        return (*prepare_bwd(*res, *cts, scale=scale, **kw), segment_cotangents(res[5]))

    op.defvjp(fwd, bwd)
    return op


def kernel_operands(q, k, v, g, beta, segment_ids, c):
    """Inputs padded to a multiple of c in the kernels' dtypes, the chunk decays
    exp(G_last) [B, H, N] (0 across a segment start) and the segment masks."""
    b, t, h, _ = q.shape
    tp = t + (-t) % c
    cd = jnp.result_type(q, k, v)
    if cd not in (jnp.bfloat16, jnp.float16, jnp.float32):
        cd = jnp.dtype(_F32)
    q, k, v = (pad_time(x.astype(cd), c) for x in (q, k, v))
    g, beta = (pad_time(x.astype(_F32), c) for x in (g, beta))
    decay = jnp.exp(jnp.sum(g.reshape(b, tp // c, c, h), axis=2))  # [B, N, H]
    segs = None
    if segment_ids is not None:
        cs = chunk_segments(segment_ids, t, c)
        segs = (cs.seg, cs.carry_in.reshape(b, tp), cs.carry_out.reshape(b, tp))
        decay = decay * cs.carry_across[..., None]
    return q, k, v, g, beta, jnp.moveaxis(decay, 2, 1), segs


def prepare(q, k, v, g, beta, *, scale, segment_ids, chunk_size, operand_dtype=None, interpret=False,
            block_sizes=BlockSizes()):
    """Same contract and result as `xla.prepare` (pads T inside), differentiable in
    q, k, v, g, beta through the kernels above. (The op itself runs them through
    `gpu_op.gated_delta_rule`; this is their unit, tested and timed against xla.prepare.)"""
    b, t, h, _ = q.shape
    c = chunk_size
    od = jnp.dtype(operand_dtype or v.dtype)
    q, k, v, g, beta, decay, segs = kernel_operands(q, k, v, g, beta, segment_ids, c)
    n = decay.shape[-1]
    outs = _prepare_op(c, float(scale), od, bool(interpret), block_sizes)(q, k, v, g, beta, segs)
    return Chunked(*(x.reshape(b, h, n, c, x.shape[-1]) for x in outs), decay)
