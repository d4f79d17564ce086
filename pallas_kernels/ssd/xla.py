"""Chunked SSD (Mamba2 "state space duality") in pure JAX: the CPU path and the spec
that the Pallas kernels follow.

The sequence is cut into chunks of L tokens. Inside a chunk the output is a masked
quadratic form (like causal attention with a decay mask); across chunks a small scan
carries the [P, N] state. With a_t = dt_t A the per-token log-decay and cs its
cumulative sum inside the chunk:

    o_i   = sum_{j<=i, same segment} exp(cs_i - cs_j) (q_i . k_j) v_j      intra-chunk
          + [i in the incoming state's segment] exp(cs_i) h_in q_i           inter-chunk
    h_out = [no restart in chunk] exp(cs_L) h_in
          + sum_{j in the last segment} exp(cs_L - cs_j) v_j k_j^T

For the SSD itself q = C, k = B, v = dt x. The same "core" with other roles of
q, k, v serves the backward pass of the Pallas path (see ops.py).

`core` takes a monotone segment index (pallas_kernels._common.segment_index) so that
"same segment" is an equality; the exp is taken only where the mask allows, so large
positive exponents never appear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import pad_segments, pad_time, segment_index
from pallas_kernels.ssd.reference import check_shapes, process_dt


def _repeat_heads(a, h):
    """[B, T, G, d] -> [B, T, H, d] (head i uses group i // (H // G))."""
    g = a.shape[2]
    if h % g:
        raise ValueError(f"heads={h} is not a multiple of groups={g}")
    return a if g == h else jnp.repeat(a, h // g, axis=2)


def core(v, a, k, q, h0, seg, chunk_size):
    """Chunked linear recurrence with per-head scalar decay.

    v [B,T,Hv,P], a [B,T,H] (log-decay, f32), k [B,T,Gk,N], q [B,T,Gq,N] with each of
    Hv, Gk, Gq dividing H; h0 [B,H,P,N] or None; seg [B,T] monotone segment index or None.
    Returns (o [B,T,H,P] float32 or wider, final state [B,H,P,N]).
    """
    b, t, h = a.shape
    p, n = v.shape[-1], k.shape[-1]
    L = chunk_size
    acc = jnp.promote_types(jnp.promote_types(v.dtype, q.dtype), jnp.float32)
    nc = -(-t // L)
    tp = nc * L
    v, k, q = (_repeat_heads(pad_time(z, L), h) for z in (v, k, q))
    a = pad_time(a.astype(acc), L)
    chunked = lambda z: z.reshape(b, nc, L, *z.shape[2:])
    v, k, q, a = chunked(v), chunked(k), chunked(q), chunked(a)

    cs = jnp.cumsum(a, axis=2)  # [b, c, l, h]
    cs_last = cs[:, :, -1]  # [b, c, h]
    causal = jnp.tril(jnp.ones((L, L), bool))
    if seg is None:
        mask = jnp.broadcast_to(causal, (b, nc, 1, L, L))
        in_mask = out_mask = jnp.ones((b, nc, L, 1), acc)
        stay = jnp.ones((b, nc, 1), acc)
    else:
        s = chunked(pad_segments(seg, L))  # [b, c, l]
        s_prev = jnp.concatenate([s[:, :1, :1], s[:, :-1, -1:]], axis=1)  # index entering chunk
        mask = (causal & (s[..., :, None] == s[..., None, :]))[:, :, None]
        in_mask = (s == s_prev)[..., None].astype(acc)
        out_mask = (s == s[..., -1:])[..., None].astype(acc)
        stay = in_mask[:, :, -1]

    # Intra-chunk quadratic term.
    diff = cs.transpose(0, 1, 3, 2)[..., :, None] - cs.transpose(0, 1, 3, 2)[..., None, :]
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))  # [b, c, h, l, s]
    scores = jnp.einsum("bclhn,bcshn->bchls", q, k, preferred_element_type=acc) * decay
    o = jnp.einsum("bchls,bcshp->bclhp", scores.astype(v.dtype), v, preferred_element_type=acc)

    # State contributed by each chunk alone, then the scan across chunks.
    w = jnp.exp(cs_last[:, :, None] - cs) * out_mask  # [b, c, l, h]
    chunk_states = jnp.einsum("bclhp,bclhn->bchpn", (v * w[..., None]).astype(k.dtype), k,
                              preferred_element_type=acc)
    carry_decay = jnp.exp(cs_last) * stay  # [b, c, h]

    def step(state, inputs):
        s_c, g_c = inputs
        return g_c[:, :, None, None] * state + s_c, state

    h0 = jnp.zeros((b, h, p, n), acc) if h0 is None else h0.astype(acc)
    final, h_in = jax.lax.scan(step, h0, (jnp.moveaxis(chunk_states, 1, 0),
                                          jnp.moveaxis(carry_decay, 1, 0)))
    h_in = jnp.moveaxis(h_in, 0, 1)  # [b, c, h, p, n]: state entering each chunk
    o = o + jnp.einsum("bclhn,bchpn->bclhp", q.astype(acc), h_in) * (jnp.exp(cs) * in_mask)[..., None]
    return o.reshape(b, tp, h, p)[:, :t], final


def ssd_xla(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
            output_final_state=False, segment_ids=None, chunk_size=64):
    """Chunked SSD in jnp, differentiable by plain autodiff. Same contract as `ssd`."""
    check_shapes(x, dt, A, B, C, D, initial_state, segment_ids)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dt = process_dt(dt.astype(acc), None if dt_bias is None else dt_bias.astype(acc), dt_softplus)
    u = (x.astype(acc) * dt[..., None]).astype(x.dtype)
    a = dt * A.astype(acc)[None, None, :]
    seg = None if segment_ids is None else segment_index(segment_ids)
    o, final = core(u, a, B, C, initial_state, seg, chunk_size)
    if D is not None:
        o = o + D.astype(acc)[None, None, :, None] * x.astype(acc)
    return o.astype(x.dtype), (final if output_final_state else None)
