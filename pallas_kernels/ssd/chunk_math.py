"""One chunk of the SSD core as it runs inside the Mosaic TPU kernel (tpu.py).

Only 2-D arrays, iota masks, masked sums and matrix products appear, because those
lower on Mosaic TPU. Row vectors [1, L] come in; the column form [L, 1] of a
cumulative sum is a masked row sum, and a row taken back from a column is a masked
column sum over the diagonal (no transposes of vectors).
The formulas are those of xla.core for one chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _precision(a):
    # float32 operands get true float32 products (not TF32): the backward's decay gradient
    # is a difference of sums that only cancels correctly if both passes round alike.
    return jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def _dot_nt(a, b):
    """a [M, K] @ b[N, K]^T -> [M, N] in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                               preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [K, M]^T @ b [K, N] -> [M, N] in float32."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(a),
                               preferred_element_type=jnp.float32)


def chunk_step(q, k, v, a_row, state, s_row=None, sp_row=None):
    """Advance the core by one chunk.

    q [L, N], k [L, N], v [L, P] (one dtype), a_row [1, L] log-decays (f32),
    state [P, N] f32 entering the chunk; optional s_row / sp_row [1, L] f32: the
    monotone segment index of each token and of the token before it.
    Returns (o [L, P] f32, new state [P, N] f32).
    """
    L = q.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (L, L), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (L, L), 1)
    causal = col <= row
    cs_col = jnp.sum(jnp.where(causal, a_row, 0.0), axis=1, keepdims=True)  # [L, 1] inclusive
    cs_row = jnp.sum(jnp.where(row == col, cs_col, 0.0), axis=0, keepdims=True)  # [1, L]
    total = jnp.sum(a_row, axis=1, keepdims=True)  # [1, 1]
    mask = causal
    if s_row is not None:
        s_col = jnp.sum(jnp.where(row == col, s_row, 0.0), axis=1, keepdims=True)  # [L, 1]
        mask = mask & (s_col == s_row)
        s_in = jnp.min(sp_row, axis=1, keepdims=True)  # segment of the incoming state
        s_last = jnp.max(s_row, axis=1, keepdims=True)  # segment of the outgoing state
        in_col = (s_col == s_in).astype(jnp.float32)
        out_col = (s_col == s_last).astype(jnp.float32)
        stay = (s_last == s_in).astype(jnp.float32)
    decay = jnp.exp(jnp.where(mask, cs_col - cs_row, -jnp.inf))  # [L, L]
    scores = _dot_nt(q, k) * decay
    o = jnp.dot(scores.astype(v.dtype), v, precision=_precision(v), preferred_element_type=jnp.float32)
    q_in = jnp.exp(cs_col)
    w = jnp.exp(total - cs_col)
    carry = jnp.exp(total)
    if s_row is not None:
        q_in, w, carry = q_in * in_col, w * out_col, carry * stay
    o = o + _dot_nt(q.astype(jnp.float32), state) * q_in
    # The state path stays in float32 whatever the input dtype (see _precision).
    state = carry * state + _dot_tn(v.astype(jnp.float32) * w, k.astype(jnp.float32))
    return o, state
