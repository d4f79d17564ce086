"""Per-step reference for the SSD (Mamba2) recurrence: the ground truth for every test.

One `lax.scan` step per token, straight from the definition

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T        h: [P, N] per head
    y_t = h_t C_t + D x_t

with dt taken after `dt_bias` and the optional softplus. Where `segment_ids`
changes the state restarts from zero (the initial state belongs to the first
segment). Computed in the inputs' precision promoted to at least float32; run it
under `jax_enable_x64` with float64 inputs for an exact-ish reference.

`ssd_step` is the same update for one token, used by the Mamba2 layer to decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def process_dt(dt, dt_bias=None, dt_softplus=False):
    """dt [..., H] -> dt after the optional bias and softplus (shared by every impl)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def check_shapes(x, dt, A, B, C, D=None, initial_state=None, segment_ids=None):
    """Raise a ValueError naming the first argument whose shape breaks the contract."""
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, time, heads, head_dim], got shape {x.shape}")
    b, t, h, p = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be [batch, time, heads] = {(b, t, h)}, got {dt.shape}")
    if A.shape != (h,):
        raise ValueError(f"A must be [heads] = {(h,)}, got {A.shape}")
    if B.ndim != 4 or B.shape[:2] != (b, t):
        raise ValueError(f"B must be [batch, time, groups, state] with batch, time = {(b, t)}, got {B.shape}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {B.shape}, got {C.shape}")
    g = B.shape[2]
    if h % g:
        raise ValueError(f"heads={h} is not a multiple of groups={g}")
    n = B.shape[3]
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be [heads] = {(h,)}, got {D.shape}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be [batch, heads, head_dim, state] = {(b, h, p, n)}, "
                         f"got {initial_state.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [batch, time] = {(b, t)}, got {segment_ids.shape}")


def ssd_step(x, dt, A, B, C, state, *, D=None, dt_bias=None, dt_softplus=False):
    """One token of the recurrence: x [B,H,P], dt [B,H], B/C [B,G,N], state [B,H,P,N].

    Returns (y [B,H,P] in x.dtype, new state [B,H,P,N] in float32 or wider).
    """
    h, g = x.shape[1], B.shape[1]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    dt = process_dt(dt.astype(acc), None if dt_bias is None else dt_bias.astype(acc), dt_softplus)
    Bh = jnp.repeat(B.astype(acc), h // g, axis=1)  # [B,H,N]
    Ch = jnp.repeat(C.astype(acc), h // g, axis=1)
    xf = x.astype(acc)
    decay = jnp.exp(dt * A.astype(acc))[:, :, None, None]
    state = decay * state.astype(acc) + (dt[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
    y = jnp.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.astype(acc)[None, :, None] * xf
    return y.astype(x.dtype), state


def ssd_reference(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
                  output_final_state=False, segment_ids=None):
    """Per-step scan. Returns (y [B,T,H,P] in x.dtype, final state [B,H,P,N] or None)."""
    check_shapes(x, dt, A, B, C, D, initial_state, segment_ids)
    b, t, h, p = x.shape
    n = B.shape[-1]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    state0 = (jnp.zeros((b, h, p, n), acc) if initial_state is None
              else initial_state.astype(acc))
    if segment_ids is None:
        # No restarts: "keep" is always 1.
        keep = jnp.ones((b, t), acc)
    else:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        keep = jnp.concatenate([jnp.ones((b, 1), bool), same], axis=1).astype(acc)

    def step(state, inputs):
        x_t, dt_t, B_t, C_t, keep_t = inputs
        state = state * keep_t[:, None, None, None]
        y_t, state = ssd_step(x_t, dt_t, A, B_t, C_t, state, D=D, dt_bias=dt_bias,
                              dt_softplus=dt_softplus)
        return state, y_t

    swap = lambda a: jnp.swapaxes(a, 0, 1)  # scan over time
    final, y = jax.lax.scan(step, state0, (swap(x), swap(dt), swap(B), swap(C), swap(keep)))
    return swap(y), (final if output_final_state else None)
