"""Pallas GPU kernels (Triton lowering) for the chunk-local part of the chunked gated
delta rule: what `xla.prepare` computes, and its reverse, one program per
(batch*head, chunk).

Each program reads its chunk of q, k, v, g, beta once, straight from the [B, Tp, H, D]
layout (a strided block, no transpose in XLA), and keeps everything in registers:

    G = cumsum g,  E_ij = exp(G_i - G_j) on the masked pairs
    L = beta K K^T . E (strictly lower),  T = (I + L)^-1
    w = T (beta e^G k),  u = T (beta v),  qg = scale e^G q,
    aqk = scale (Q K^T) . E (causal),  kg = e^(G_last - G) k

T is built in 16 x 16 blocks: each diagonal block by forward substitution (one masked
row update per step, exact in float32), then the blocks below the diagonal by block
forward substitution, T_ab = -T_aa sum_m L_am T_mb, with small dots. Float32 dots run
at Precision.HIGHEST (Triton "ieee"; DEFAULT would be TF32, too coarse for the
inverse); K K^T, Q K^T and the products with T (w, u and their reverse) run in the
inputs' dtype, so bf16 inputs use the tensor cores with float32 accumulation; so do the
backward's products with K- and V-wide operands (float32 gradients rounded to bf16, as
flash-linear-attention does). Outputs are written head-major [BH, Tp, D],
the layout of the recurrence kernels in `gpu.py`.

The backward kernel recomputes G, L, T, w and u for its chunk rather than storing
them, and forms dq, dk, dv, dg, dbeta from the cotangents of w, u, qg, aqk, kg:

    dR = T^T dW    (W = T R, for w and u)
    dL = -T^T (dW W^T + dU U^T)     (on the strictly lower, same-segment pairs)

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
from pallas_kernels.gated_delta_rule.gpu import check_power_of_two
from pallas_kernels.gated_delta_rule.xla import Chunked

# Launch parameters of both kernels. Nothing here loops over memory, so one stage. Four
# warps: on an H200 (BENCHMARKS.md) 8 warps made an illegal memory access at K = V = 128
# and were slower at 64; 2 warps gave the faster forward but a slower backward.
# f32_dot: see F32_DOTS (interpret mode always uses "ieee").
BLOCKS = dict(num_warps=4, num_stages=1, f32_dot="ieee")
SUB = 16  # side of the blocks T is built from (Triton's smallest dot)

_F32 = jnp.float32


# Float32 dot algorithms: "ieee" (Precision.HIGHEST: exact float32 products on the FMA
# units) or "tf32x3" (three TF32 tensor-core products, about float32 accurate).
F32_DOTS = {"ieee": jax.lax.Precision.HIGHEST, "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3}


def _mm(a, b, *, ta=False, tb=False, f32_dot="ieee"):
    """a @ b (a^T, b^T with ta, tb) with float32 accumulation; float32 operands per f32_dot."""
    precision = F32_DOTS[f32_dot] if a.dtype == _F32 else None
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _take(x, start, size):
    """x[start : start + size] of a register vector, by a masked reduction (exact)."""
    n = x.shape[0]
    sel = _iota((size, n), 1) == _iota((size, n), 0) + start
    return jnp.sum(jnp.where(sel, x[None, :], 0.0), axis=1)


def _inv_unit_lower(l_mat):
    """(I + L)^-1 for a strictly lower [s, s] L by forward substitution: row i of
    X = (I + L)^-1 is e_i - sum_{j<i} L_ij X_j, one masked row update per step."""
    s = l_mat.shape[0]
    r, col = _iota((s, s), 0), _iota((s, s), 1)

    def body(i, x):
        l_i = jnp.sum(jnp.where(r == i, l_mat, 0.0), axis=0)  # row i of L, indexed by j
        upd = jnp.sum(l_i[:, None] * x, axis=0)  # sum_j L_ij X_j (rows j >= i of L_i are 0)
        return jnp.where(r == i, x - upd[None, :], x)

    return jax.lax.fori_loop(1, s, body, (r == col).astype(_F32))


class _Chunk:
    """One program's chunk: loads and the chunk-local quantities shared by fwd and bwd."""

    def __init__(self, q_ref, k_ref, v_ref, g_ref, beta_ref, seg_refs, *, c, bs, scale, f32_dot):
        self.mm = functools.partial(_mm, f32_dot=f32_dot)
        # The products with K- or V-wide operands (T [k | v], T^T [dw | du], the backward's
        # dk, dq) run in the inputs' dtype: 16-bit operands on the tensor cores, as the XLA
        # form does; float32 inputs keep float32 dots.
        self.cd = k_ref.dtype
        self.q_ref, self.k_ref, self.v_ref, self.seg_refs = q_ref, k_ref, v_ref, seg_refs
        self.c, self.bs, self.nb, self.scale = c, bs, c // bs, scale
        nb = self.nb
        self.gcum = jnp.cumsum(g_ref[...].astype(_F32))  # [C]
        self.glast = jnp.sum(jnp.where(_iota((c,), 0) == c - 1, self.gcum, 0.0))
        self.gc = [_take(self.gcum, a * bs, bs) for a in range(nb)]
        self.beta = [beta_ref[self._rows(a)].astype(_F32) for a in range(nb)]
        if seg_refs is None:
            self.seg = self.cin = self.cout = [None] * nb
        else:
            seg_ref, cin_ref, cout_ref = seg_refs
            self.seg = [seg_ref[self._rows(a)] for a in range(nb)]
            self.cin = [cin_ref[self._rows(a)] for a in range(nb)]
            self.cout = [cout_ref[self._rows(a)] for a in range(nb)]

    def _rows(self, a):
        return pl.ds(a * self.bs, self.bs)

    def tile(self, ref, a):
        return ref[self._rows(a), :]

    def mask(self, a, b, strict):
        """[bs, bs] bool: pairs (i in block a, j in block b) with j < i (strict) or j <= i, same segment."""
        shape = (self.bs, self.bs)
        if a == b:
            m = _iota(shape, 0) > _iota(shape, 1) if strict else _iota(shape, 0) >= _iota(shape, 1)
        else:
            m = jnp.ones(shape, bool)
        if self.seg[a] is not None:
            m = m & (self.seg[a][:, None] == self.seg[b][None, :])
        return m

    def decay(self, a, b, strict):
        """exp(G_i - G_j) on the masked pairs of blocks (a, b), 0 elsewhere."""
        m = self.mask(a, b, strict)
        diff = self.gc[a][:, None] - self.gc[b][None, :]
        return jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)

    def carry(self, x, a, which):
        return x if self.seg[a] is None else x * (self.cin[a] if which == "in" else self.cout[a])

    def solve(self):
        """K K^T blocks, E blocks, L blocks (a >= b) and T = (I + L)^-1 blocks (a >= b)."""
        nb = self.nb
        k = [self.tile(self.k_ref, a) for a in range(nb)]
        kk, e, lo, t = {}, {}, {}, {}
        for a in range(nb):
            for b in range(a + 1):
                kk[a, b] = self.mm(k[a], k[b], tb=True)
                e[a, b] = self.decay(a, b, strict=True)
                lo[a, b] = self.beta[a][:, None] * kk[a, b] * e[a, b]
        for a in range(nb):
            t[a, a] = _inv_unit_lower(lo[a, a])
            for b in range(a):
                acc = self.mm(lo[a, b], t[b, b])
                for m in range(b + 1, a):
                    acc = acc + self.mm(lo[a, m], t[m, b])
                t[a, b] = -self.mm(t[a, a], acc)
        return k, kk, e, lo, t

    def mm_cd(self, a, b, **kw):
        """self.mm with both operands in the inputs' dtype."""
        return self.mm(a.astype(self.cd), b.astype(self.cd), **kw)

    def t_cd(self, t):
        """T's blocks in the inputs' dtype."""
        return {key: x.astype(self.cd) for key, x in t.items()}

    def rhs_w(self, k, a):
        """Right-hand side of w for block a, beta e^G carry_in k, in the inputs' dtype."""
        rw = self.carry(self.beta[a] * jnp.exp(self.gc[a]), a, "in")[:, None] * k[a].astype(_F32)
        return rw.astype(self.cd)

    def rhs_u(self, a):
        """Right-hand side of u for block a, beta v, in the inputs' dtype."""
        return (self.beta[a][:, None] * self.tile(self.v_ref, a).astype(_F32)).astype(self.cd)


def _apply_lower(mm, t, x, nb):
    """(T X) blocks for block-lower T, one at a time (a generator: a caller that stores each
    block as it comes keeps one block's float32 accumulator live, not nb)."""
    return (sum((mm(t[a, b], x[b]) for b in range(1, a + 1)), mm(t[a, 0], x[0])) for a in range(nb))


def _apply_lower_t(mm, t, x, nb):
    """(T^T X) blocks for block-lower T."""
    return [sum((mm(t[m, a], x[m], ta=True) for m in range(a + 1, nb)), mm(t[a, a], x[a], ta=True))
            for a in range(nb)]


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, *refs, c, bs, scale, has_seg, f32_dot):
    seg_refs, refs = (refs[:3], refs[3:]) if has_seg else (None, refs)
    w_ref, u_ref, qg_ref, aqk_ref, kg_ref = refs
    ch = _Chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_refs, c=c, bs=bs, scale=scale, f32_dot=f32_dot)
    nb, mm = ch.nb, ch.mm
    k, _, _, _, t = ch.solve()
    t = ch.t_cd(t)
    # One right-hand side at a time, each block stored once complete: fewer live float32
    # tiles (the kernel spilled registers when w and u were formed together).
    for ref, x in ((w_ref, [ch.rhs_w(k, a) for a in range(nb)]), (u_ref, [ch.rhs_u(a) for a in range(nb)])):
        for a, y in enumerate(_apply_lower(mm, t, x, nb)):
            ref[ch._rows(a), :] = y.astype(ref.dtype)
    for a in range(nb):
        q_a = ch.tile(q_ref, a)
        eg = jnp.exp(ch.gc[a])
        qg_ref[ch._rows(a), :] = (ch.carry(scale * eg, a, "in")[:, None] * q_a.astype(_F32)).astype(qg_ref.dtype)
        kgc = ch.carry(jnp.exp(ch.glast - ch.gc[a]), a, "out")
        kg_ref[ch._rows(a), :] = (kgc[:, None] * k[a].astype(_F32)).astype(kg_ref.dtype)
        for b in range(nb):
            if b > a:
                val = jnp.zeros((bs, bs), _F32)
            else:
                val = scale * mm(q_a, k[b], tb=True) * ch.decay(a, b, strict=False)
            aqk_ref[ch._rows(a), pl.ds(b * bs, bs)] = val.astype(aqk_ref.dtype)


def _bwd_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, *refs, c, bs, scale, has_seg, f32_dot):
    seg_refs, refs = (refs[:3], refs[3:]) if has_seg else (None, refs)
    dw_ref, du_ref, dqg_ref, daqk_ref, dkg_ref, dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref = refs
    ch = _Chunk(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_refs, c=c, bs=bs, scale=scale, f32_dot=f32_dot)
    nb, mm = ch.nb, ch.mm
    k, kk, e, lo, t = ch.solve()
    cd, am = ch.cd, ch.mm_cd
    tc = ch.t_cd(t)
    w = [x.astype(cd) for x in _apply_lower(mm, tc, [ch.rhs_w(k, a) for a in range(nb)], nb)]
    u = [x.astype(cd) for x in _apply_lower(mm, tc, [ch.rhs_u(a) for a in range(nb)], nb)]
    dw = [ch.tile(dw_ref, a).astype(cd) for a in range(nb)]
    du = [ch.tile(du_ref, a).astype(cd) for a in range(nb)]
    drw, dru = _apply_lower_t(mm, tc, dw, nb), _apply_lower_t(mm, tc, du, nb)
    k32 = [x.astype(_F32) for x in k]
    q = [ch.tile(q_ref, a) for a in range(nb)]
    q32 = [x.astype(_F32) for x in q]
    v32 = [ch.tile(v_ref, a).astype(_F32) for a in range(nb)]
    dq = [jnp.zeros_like(x) for x in q32]
    dk = [jnp.zeros_like(x) for x in k32]
    dgc = [jnp.zeros((bs,), _F32) for _ in range(nb)]
    dbeta = [jnp.zeros((bs,), _F32) for _ in range(nb)]
    dglast = jnp.zeros((), _F32)
    rowsum = lambda x: jnp.sum(x, axis=1)

    # dL = -T^T (dW W^T + dU U^T), block (a, b) for a >= b.
    gram = {(m, b): mm(dw[m], w[b], tb=True) + mm(du[m], u[b], tb=True) for m in range(nb) for b in range(m + 1)}
    for a in range(nb):
        for b in range(a + 1):
            dl = -sum((mm(t[m, a], gram[m, b], ta=True) for m in range(a + 1, nb)), mm(t[a, a], gram[a, b], ta=True))
            # L_ij = beta_i (k_i . k_j) E_ij
            be = dl * e[a, b]
            dkk = ch.beta[a][:, None] * be
            dbeta[a] += rowsum(be * kk[a, b])
            y = dl * lo[a, b]
            dgc[a] += rowsum(y)
            dgc[b] -= jnp.sum(y, axis=0)
            dk[a] += am(dkk, k[b])
            dk[b] += am(dkk, k[a], ta=True)
            # aqk_ij = scale (q_i . k_j) E_ij on the causal pairs
            p = scale * daqk_ref[ch._rows(a), pl.ds(b * bs, bs)].astype(_F32) * ch.decay(a, b, strict=False)
            dq[a] += am(p, k[b])
            dk[b] += am(p, q[a], ta=True)
            x = p * mm(q[a], k[b], tb=True)
            dgc[a] += rowsum(x)
            dgc[b] -= jnp.sum(x, axis=0)
    for a in range(nb):
        eg = jnp.exp(ch.gc[a])
        # w's right-hand side: beta e^G carry_in k
        s = rowsum(drw[a] * k32[a])
        cw = ch.carry(ch.beta[a] * eg, a, "in")
        dk[a] += cw[:, None] * drw[a]
        dbeta[a] += ch.carry(s * eg, a, "in")
        dgc[a] += s * cw
        # u's right-hand side: beta v
        dv_ref[ch._rows(a), :] = (ch.beta[a][:, None] * dru[a]).astype(dv_ref.dtype)
        dbeta[a] += rowsum(dru[a] * v32[a])
        # qg = scale e^G carry_in q
        dqg = ch.tile(dqg_ref, a).astype(_F32)
        cq = ch.carry(scale * eg, a, "in")
        dq[a] += cq[:, None] * dqg
        dgc[a] += cq * rowsum(dqg * q32[a])
        # kg = e^(G_last - G) carry_out k
        dkg = ch.tile(dkg_ref, a).astype(_F32)
        ck = ch.carry(jnp.exp(ch.glast - ch.gc[a]), a, "out")
        dk[a] += ck[:, None] * dkg
        r = ck * rowsum(dkg * k32[a])
        dgc[a] -= r
        dglast += jnp.sum(r)
    # G = cumsum(g): dg_j = sum_{i >= j} dG_i, and G_last = sum(g) adds dG_last everywhere.
    after = dglast
    for a in reversed(range(nb)):
        tot = jnp.sum(dgc[a])
        dg = tot - jnp.cumsum(dgc[a]) + dgc[a] + after
        after = after + tot
        dg_ref[ch._rows(a)] = dg.astype(dg_ref.dtype)
        dbeta_ref[ch._rows(a)] = dbeta[a].astype(dbeta_ref.dtype)
        dq_ref[ch._rows(a), :] = dq[a].astype(dq_ref.dtype)
        dk_ref[ch._rows(a), :] = dk[a].astype(dk_ref.dtype)


def _specs(b, h, c, dk, dv, has_seg):
    """In specs of q, k, v, g, beta [B, Tp, H, ...] (and seg, carry_in, carry_out [B, Tp])
    for the grid (B*H, N)."""
    tok = lambda d: pl.BlockSpec((None, c, None, d), lambda i, j: (i // h, j, i % h, 0))
    gate = pl.BlockSpec((None, c, None), lambda i, j: (i // h, j, i % h))
    specs = [tok(dk), tok(dk), tok(dv), gate, gate]
    if has_seg:
        specs += [pl.BlockSpec((None, c), lambda i, j: (i // h, j))] * 3
    return specs


def _chunked_specs(c, dk, dv):
    """Specs of w, u, qg, aqk, kg, head-major [BH, Tp, K|V|C], for the grid (B*H, N):
    the forward's outputs and the backward's cotangents."""
    spec = lambda d: pl.BlockSpec((None, c, d), lambda i, j: (i, j, 0))
    return [spec(dk), spec(dv), spec(dk), spec(c), spec(dk)]


def _f32_dot(f32_dot, interpret):
    f32_dot = f32_dot or BLOCKS["f32_dot"]
    if f32_dot not in F32_DOTS:
        raise ValueError(f"f32_dot must be one of {tuple(F32_DOTS)}, got {f32_dot!r}")
    return "ieee" if interpret else f32_dot


def _sub(c):
    """Block side for T: SUB, or the whole chunk when SUB does not divide it (interpret mode only)."""
    return SUB if c % SUB == 0 else c


def _compiler_params():
    return plgpu.CompilerParams(num_warps=BLOCKS["num_warps"], num_stages=BLOCKS["num_stages"])


def prepare_fwd(q, k, v, g, beta, segs, *, chunk_size, scale, out_dtype, interpret=False, f32_dot=None):
    """q, k: [B, Tp, H, K], v: [B, Tp, H, V] (one dtype); g, beta: [B, Tp, H] float32;
    segs: None or (segment index int32, carry_in float32, carry_out float32), each [B, Tp].
    Returns w, u, qg, aqk, kg head-major [BH, Tp, K|V|C] in out_dtype."""
    b, tp, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    check_power_of_two(interpret, chunk_size=c, K=dk, V=dv)
    has_seg = segs is not None
    shape = lambda d: jax.ShapeDtypeStruct((b * h, tp, d), out_dtype)
    bht = b * h * tp
    flops = 2 * bht * (2 * c * dk + c * (dk + dv) // 2 + 2 * SUB * SUB)
    nbytes = bht * (q.dtype.itemsize * (2 * dk + dv) + 8 + jnp.dtype(out_dtype).itemsize * (3 * dk + dv + c))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, c=c, bs=_sub(c), scale=scale, has_seg=has_seg,
                          f32_dot=_f32_dot(f32_dot, interpret)),
        grid=(b * h, tp // c),
        in_specs=_specs(b, h, c, dk, dv, has_seg),
        out_specs=_chunked_specs(c, dk, dv),
        out_shape=[shape(dk), shape(dv), shape(dk), shape(c), shape(dk)],
        compiler_params=_compiler_params(),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=bht * (c + 2), bytes_accessed=nbytes),
        interpret=interpret,
        name="gdn_prepare_fwd",
    )(q, k, v, g, beta, *(segs or ()))


def prepare_bwd(q, k, v, g, beta, segs, dw, du, dqg, daqk, dkg, *, chunk_size, scale, interpret=False,
                f32_dot=None):
    """Reverse of `prepare_fwd`: cotangents of w, u, qg, aqk, kg ([BH, Tp, ...]) to
    dq, dk, dv ([B, Tp, H, ...], q's dtype) and dg, dbeta ([B, Tp, H] float32)."""
    b, tp, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    check_power_of_two(interpret, chunk_size=c, K=dk, V=dv)
    has_seg = segs is not None
    in_specs = _specs(b, h, c, dk, dv, has_seg) + _chunked_specs(c, dk, dv)
    out_specs = _specs(b, h, c, dk, dv, False)
    out_shape = [jax.ShapeDtypeStruct(x.shape, q.dtype) for x in (q, k, v)]
    out_shape += [jax.ShapeDtypeStruct(g.shape, _F32)] * 2
    bht = b * h * tp
    flops = 2 * bht * (6 * c * dk + 2 * c * (dk + dv) + 2 * SUB * SUB)
    nbytes = bht * (2 * q.dtype.itemsize * (2 * dk + dv) + 16 + dw.dtype.itemsize * (3 * dk + dv + c))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, c=c, bs=_sub(c), scale=scale, has_seg=has_seg,
                          f32_dot=_f32_dot(f32_dot, interpret)),
        grid=(b * h, tp // c),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=bht * (c + 2), bytes_accessed=nbytes),
        interpret=interpret,
        name="gdn_prepare_bwd",
    )(q, k, v, g, beta, *(segs or ()), dw, du, dqg, daqk, dkg)


@functools.lru_cache(maxsize=None)
def _prepare_op(chunk_size: int, scale: float, out_dtype, interpret: bool, f32_dot):
    """custom_vjp of (q, k, v, g, beta, segs) -> (w, u, qg, aqk, kg), arguments as in
    `prepare_fwd`; segs (integer index and masks) get no gradient."""
    kw = dict(chunk_size=chunk_size, scale=scale, interpret=interpret, f32_dot=f32_dot)

    @jax.custom_vjp
    def op(q, k, v, g, beta, segs):
        return tuple(prepare_fwd(q, k, v, g, beta, segs, out_dtype=out_dtype, **kw))

    def fwd(q, k, v, g, beta, segs):
        return op(q, k, v, g, beta, segs), (q, k, v, g, beta, segs)

    def bwd(res, cts):
        q, k, v, g, beta, segs = res
        dq, dk, dv, dg, dbeta = prepare_bwd(q, k, v, g, beta, segs, *cts, **kw)
        dsegs = None if segs is None else tuple(jnp.zeros_like(x) if x.dtype == _F32 else None for x in segs)
        return dq, dk, dv, dg, dbeta, dsegs

    op.defvjp(fwd, bwd)
    return op


def prepare(q, k, v, g, beta, *, scale, segment_ids, chunk_size, operand_dtype=None, interpret=False,
            f32_dot=None):
    """Same contract and result as `xla.prepare` (pads T inside), differentiable in
    q, k, v, g, beta through the kernels above. f32_dot: None (BLOCKS), "ieee" or "tf32x3"."""
    b, t, h, dk = q.shape
    c = chunk_size
    tp = t + (-t) % c
    n = tp // c
    od = jnp.dtype(operand_dtype or v.dtype)
    cd = jnp.result_type(q, k, v)
    if cd not in (jnp.bfloat16, jnp.float16, jnp.float32):
        cd = jnp.dtype(_F32)
    q, k, v = (pad_time(x.astype(cd), c) for x in (q, k, v))
    g, beta = (pad_time(x.astype(_F32), c) for x in (g, beta))
    gsum = jnp.sum(g.reshape(b, n, c, h), axis=2)  # [B, N, H]
    if segment_ids is None:
        segs = None
        decay = jnp.exp(gsum)
    else:
        cs = chunk_segments(segment_ids, t, c)
        segs = (cs.seg, cs.carry_in.reshape(b, tp), cs.carry_out.reshape(b, tp))
        decay = jnp.exp(gsum) * cs.carry_across[..., None]
    outs = _prepare_op(c, float(scale), od, bool(interpret), f32_dot)(q, k, v, g, beta, segs)
    chunks = lambda x: x.reshape(b, h, n, c, x.shape[-1])
    return Chunked(*(chunks(x) for x in outs), jnp.moveaxis(decay, 2, 1))
