"""Per-step gated delta rule: the ground truth every other form is tested against.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

`gated_delta_rule_step` is one token of it (the decode path of the GDN layer);
`fused_recurrent_gated_delta_rule` runs it over time with `lax.scan`. Arithmetic is
float32 (float64 when the inputs are float64, which the tests use as ground truth).
`check_inputs` is the shape contract that the public op checks for every form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import segment_index


def check_inputs(q, k, v, g, beta, initial_state, segment_ids, chunk_size):
    """Raise a ValueError that names the offending argument."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B,T,H,K]; got q {q.shape}, k {k.shape}")
    b, t, h, dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [B,T,H,V] = [{b},{t},{h},V]; got {v.shape}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (b, t, h):
            raise ValueError(f"{name} must be [B,T,H] = {(b, t, h)}; got {x.shape}")
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B,H,K,V] = {(b, h, dk, v.shape[-1])}; got {initial_state.shape}"
        )
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B,T] = {(b, t)}; got {segment_ids.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if t == 0:
        raise ValueError("sequence length T must be at least 1")


def _compute_dtype(*xs):
    return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One token. q, k: [B,H,K]; v: [B,H,V]; g, beta: [B,H]; state: [B,H,K,V].

    Returns (o [B,H,V] in v's dtype, new state [B,H,K,V] in float32 or wider).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    dt = _compute_dtype(q, k, v, g, beta, state)
    q, k, v, g, beta, s = (x.astype(dt) for x in (q, k, v, g, beta, state))
    s = s * jnp.exp(g)[..., None, None]
    # Delta rule: replace what the state recalls for k_t by v_t, at rate beta_t.
    recalled = jnp.einsum("bhk,bhkv->bhv", k, s)
    s = s + jnp.einsum("bhk,bhv->bhkv", k, beta[..., None] * (v - recalled))
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, s)
    return o.astype(v.dtype), s


def fused_recurrent_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None
):
    """Token-by-token scan; same signature and result as `chunk_gated_delta_rule`."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    dt = _compute_dtype(q, k, v, g, beta)
    if initial_state is None:
        s0 = jnp.zeros((b, h, dk, dv), dt)
    else:
        s0 = initial_state.astype(jnp.promote_types(dt, initial_state.dtype))
    if segment_ids is None:
        reset = jnp.zeros((b, t), bool)
    else:
        idx = segment_index(segment_ids)
        reset = jnp.concatenate([jnp.zeros((b, 1), bool), idx[:, 1:] != idx[:, :-1]], axis=1)

    def step(s, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], jnp.zeros_like(s), s)
        o_t, s = gated_delta_rule_step(q_t, k_t, v_t, g_t, beta_t, s, scale)
        return s, o_t

    time_major = lambda x: jnp.moveaxis(x, 1, 0)
    s, o = jax.lax.scan(step, s0, tuple(map(time_major, (q, k, v, g, beta, reset))))
    return jnp.moveaxis(o, 0, 1), (s if output_final_state else None)
