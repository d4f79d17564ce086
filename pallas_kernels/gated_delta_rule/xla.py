"""Chunked gated delta rule in pure JAX (the CPU path and the kernels' scaffolding).

The sequence is cut into chunks of C tokens. Inside a chunk the delta rule is
solved in closed form (WY / UT representation, as in flash-linear-attention):

    G      = cumsum of g within the chunk               (log of the running decay)
    L_ij   = beta_i (k_i . k_j) exp(G_i - G_j),  j < i  (strictly lower)
    w      = (I + L)^-1 (beta exp(G) k)    u = (I + L)^-1 (beta v)
    v_new  = u - w S                        (what each token writes, given the state S
                                             entering the chunk)
    o      = qg S + Aqk v_new,  qg = scale q exp(G),  Aqk_ij = scale (q_i . k_j) exp(G_i - G_j), j <= i
    S'     = exp(G_last) S + kg^T v_new,   kg = k exp(G_last - G)

`prepare` does everything that is local to a chunk (parallel over chunks; plain
JAX, differentiated by autodiff); the only sequential part is one chunk of the state
recurrence (`chunk_math.chunk_forward_step`), which the Pallas kernels and the
`lax.scan` here run. Segment boundaries are folded into masks: a position sees the
incoming state only if no segment starts between the chunk start and it, pairs
inside a chunk interact only within one segment, and the state decays to zero across
a chunk that contains a segment start.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import chunk_segments, pad_time
from pallas_kernels.gated_delta_rule.chunk_math import Chunked, chunk_forward_step, einsum
from pallas_kernels.gated_delta_rule.reference import check_inputs


def unit_lower_inverse(a):
    """Inverse of unit lower-triangular matrices a [..., C, C], by doubling the size of
    the inverted diagonal blocks: [[X, 0], [A21, Y]]^-1 = [[X^-1, 0], [-Y^-1 A21 X^-1, Y^-1]].

    log2(C) levels of small batched matmuls, exact like a triangular solve. (XLA's CPU
    triangular solve parallelises its batch on the pool it runs in, which deadlocks on
    small machines; batched trsm is slow on GPU.)
    """
    c = a.shape[-1]
    p = 1 << (c - 1).bit_length()
    if p != c:  # pad to a power of two with an identity block
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, p - c), (0, p - c)])
        a = a + jnp.diag(jnp.arange(p) >= c).astype(a.dtype)
    batch = a.shape[:-2]
    inv = jnp.ones(batch + (p, 1, 1), a.dtype)  # inverted diagonal blocks of size s
    s = 1
    while s < p:
        m = p // (2 * s)
        # A's (2i+1, 2i) blocks of size s: [..., m, s, s]
        pairs = jnp.diagonal(a.reshape(batch + (m, 2, s, m, 2, s)), axis1=-6, axis2=-3)
        a21 = jnp.moveaxis(pairs[..., 1, :, 0, :, :], -1, -3)
        x, y = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        z = -einsum("...ij,...jk->...ik", einsum("...ij,...jk->...ik", y, a21), x)
        top = jnp.concatenate([x, jnp.zeros_like(x)], axis=-1)
        inv = jnp.concatenate([top, jnp.concatenate([z, y], axis=-1)], axis=-2)
        s *= 2
    return inv.reshape(batch + (p, p))[..., :c, :c]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def solve_unit_lower(lower, rhs, dtype):
    """(I + L)^-1 R for strictly lower L [..., C, C] and R [..., C, D] (both float32 or
    wider): the inverse exactly (`unit_lower_inverse`), its product with R in `dtype`
    (16-bit operands on the tensor cores), accumulated in float32 or wider.

    The VJP is closed form, two products instead of autodiff through log2(C) levels:
    X = T R with T = (I + L)^-1 gives dR = T^T dX and dL = -dR X^T (strictly lower part).
    """
    return _solve_unit_lower_fwd(lower, rhs, dtype)[0]


def _solve_unit_lower_fwd(lower, rhs, dtype):
    c = lower.shape[-1]
    inv = unit_lower_inverse(jnp.eye(c, dtype=lower.dtype) + lower).astype(dtype)
    x = einsum("...ij,...jd->...id", inv, rhs.astype(dtype))
    return x, (inv, x.astype(dtype))


def _solve_unit_lower_bwd(dtype, res, dx):
    inv, x = res
    acc = jnp.promote_types(dtype, jnp.float32)
    drhs = einsum("...ji,...jd->...id", inv, dx.astype(dtype))
    dlower = -einsum("...id,...jd->...ij", drhs.astype(dtype), x)
    c = inv.shape[-1]
    dlower = jnp.where(jnp.tril(jnp.ones((c, c), bool), -1), dlower, 0.0)
    return dlower.astype(acc), drhs.astype(acc)


solve_unit_lower.defvjp(_solve_unit_lower_fwd, _solve_unit_lower_bwd)


def _to_chunks(x, n, c):
    """[B, Tp, H, ...] -> [B, H, N, C, ...]."""
    b, _, h = x.shape[:3]
    x = x.reshape((b, n, c, h) + x.shape[3:])
    return jnp.moveaxis(x, 3, 1)


def prepare(q, k, v, g, beta, *, scale, segment_ids, chunk_size, operand_dtype=None):
    """Chunk-local part of the algorithm (see module docstring). Pads T inside.

    Returns `Chunked` with w, u, qg, aqk, kg in `operand_dtype` (default: the
    dtype of v, so bf16 inputs give bf16 matrix operands) and decay in float32.
    q, k, v stay in their own dtype up to the products K K^T, Q K^T and T [k | v]
    (16-bit operands, float32 accumulation); the decays, L and its inverse T are
    float32 or wider.
    """
    b, t, h, _ = q.shape
    c = chunk_size
    tp = t + (-t) % c
    n = tp // c
    od = operand_dtype or v.dtype
    cd = jnp.result_type(q, k, v)
    f32 = jnp.promote_types(jnp.result_type(cd, g, beta), jnp.float32)
    # Padding with g = 0, beta = 0, k = v = q = 0 leaves the state unchanged.
    q, k, v = (pad_time(x.astype(cd), c) for x in (q, k, v))
    g, beta = (pad_time(x.astype(f32), c) for x in (g, beta))
    segs = chunk_segments(segment_ids, t, c)

    qc, kc, vc = (_to_chunks(x, n, c) for x in (q, k, v))  # [B,H,N,C,D]
    gc, bc = (_to_chunks(x, n, c) for x in (g, beta))  # [B,H,N,C]
    segc = segs.seg.reshape(-1, n, c)[:, None]  # [B or 1,1,N,C]

    gcum = jnp.cumsum(gc, axis=-1)
    glast = gcum[..., -1:]
    same = segc[..., :, None] == segc[..., None, :]  # [B,1,N,C,C]
    causal = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    diff = gcum[..., :, None] - gcum[..., None, :]
    # exp only where i >= j (and same segment): elsewhere diff may be large and positive.
    decay_ij = jnp.where(causal & same, jnp.exp(jnp.where(causal & same, diff, 0.0)), 0.0)

    carry_in, carry_out = segs.carry_in[:, None].astype(f32), segs.carry_out[:, None].astype(f32)

    kk = einsum("bhnik,bhnjk->bhnij", kc, kc)
    lower = jnp.where(strict, bc[..., :, None] * kk * decay_ij, 0.0)
    rhs = jnp.concatenate(
        [(bc * jnp.exp(gcum) * carry_in)[..., None] * kc, bc[..., None] * vc], axis=-1
    )
    wu = solve_unit_lower(lower, rhs, cd)
    w, u = wu[..., : k.shape[-1]], wu[..., k.shape[-1] :]

    qg = (scale * jnp.exp(gcum) * carry_in)[..., None] * qc
    aqk = scale * einsum("bhnik,bhnjk->bhnij", qc, kc) * decay_ij
    kg = (jnp.exp(glast - gcum) * carry_out)[..., None] * kc
    decay = jnp.exp(glast[..., 0]) * segs.carry_across[:, None].astype(f32)
    return Chunked(
        w.astype(od), u.astype(od), qg.astype(od), aqk.astype(od), kg.astype(od), decay
    )


def finish(o_bhnc, t, dtype):
    """[B, H, N, C, V] -> [B, T, H, V] in dtype (drops the padding)."""
    b, h, n, c, dv = o_bhnc.shape
    o = jnp.moveaxis(o_bhnc, 1, 3).reshape(b, n * c, h, dv)
    return o[:, :t].astype(dtype)


def recurrence_scan(x: Chunked, h0):
    """The inter-chunk recurrence with lax.scan. h0: [B,H,K,V] float32.

    Returns (o [B,H,N,C,V] float32, final state [B,H,K,V] float32).
    """
    step = jax.vmap(jax.vmap(chunk_forward_step))  # over B, H

    def body(s, xs):
        w, u, qg, aqk, kg, decay = xs
        o, _, s = step(s, w, u, qg, aqk, kg, decay[..., None, None])
        return s, o

    n_major = lambda a: jnp.moveaxis(a, 2, 0)
    s, o = jax.lax.scan(body, h0, tuple(map(n_major, x)))
    return jnp.moveaxis(o, 0, 2), s


def chunk_gated_delta_rule_xla(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
    chunk_size=64,
):
    """Chunked form, differentiable by JAX autodiff. Same contract as the public op."""
    check_inputs(q, k, v, g, beta, initial_state, segment_ids, chunk_size)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if scale is None:
        scale = dk**-0.5
    x = prepare(q, k, v, g, beta, scale=scale, segment_ids=segment_ids, chunk_size=chunk_size)
    state_dtype = jnp.promote_types(x.decay.dtype, jnp.result_type(q, k, v))
    h0 = (
        jnp.zeros((b, h, dk, dv), state_dtype)
        if initial_state is None
        else initial_state.astype(jnp.promote_types(state_dtype, initial_state.dtype))
    )
    o, s = recurrence_scan(x, h0)
    return finish(o, t, v.dtype), (s if output_final_state else None)
