"""One chunk of the gated delta rule's state recurrence, as the XLA scan (xla.py) and the
GPU and TPU walk kernels (gpu_recurrence.py, tpu_recurrence.py) all run it.

With the chunk-local operands of `Chunked` (xla.py's module docstring derives them) and
S the [K, V] state entering the chunk:

    v_new  = u - w S                      o  = qg S + Aqk v_new
    S'     = decay S + kg^T v_new

The functions take one (batch, head) and any slice of V columns (columns never mix),
so kernels may split V. Every product has the precision and accumulation of `dot`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Chunked(NamedTuple):
    """Chunk-local operands of the state recurrence, head-major: [B, H, N, C, ...]."""

    w: jax.Array  # [B,H,N,C,K]
    u: jax.Array  # [B,H,N,C,V]
    qg: jax.Array  # [B,H,N,C,K]
    aqk: jax.Array  # [B,H,N,C,C]
    kg: jax.Array  # [B,H,N,C,K]
    decay: jax.Array  # [B,H,N] float32


def dot_kwargs(a, b):
    """Precision and accumulation of every product in this op: float32 operands at full
    precision (no TF32), 16-bit ones on the tensor cores (exact products), accumulated in
    float32 or wider."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return dict(precision=precision, preferred_element_type=jnp.promote_types(jnp.result_type(a, b), jnp.float32))


def dot(a, b):
    """a @ b (kernel bodies call this: a plain dot_general)."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), **dot_kwargs(a, b))


def einsum(spec, a, b):
    """jnp.einsum with the precision and accumulation of `dot_kwargs`."""
    return jnp.einsum(spec, a, b, **dot_kwargs(a, b))


def chunk_state_step(s, w, u, kg, decay):
    """The state part of one chunk of the recurrence, for one (batch, head) and any slice
    of V columns: s [K, BV] float32 entering the chunk; w, kg: [C, K]; u: [C, BV];
    decay: scalar or broadcastable. Returns (v_new [C, BV], s' [K, BV]), float32.
    Columns of V never mix, which lets kernels split V."""
    od = w.dtype
    v_new = u.astype(s.dtype) - dot(w, s.astype(od))
    return v_new, decay * s + dot(kg.T, v_new.astype(od))


def chunk_output(s, qg, aqk, v_new):
    """A chunk's output from the state entering it and its v_new (`chunk_state_step`):
    o = qg s + aqk v_new [C, BV] float32, with s and v_new rounded to qg's dtype."""
    od = qg.dtype
    return dot(qg, s.astype(od)) + dot(aqk, v_new.astype(od))


def chunk_forward_step(s, w, u, qg, aqk, kg, decay):
    """One chunk of the recurrence: (o, v_new, s'), all float32 (see `chunk_state_step`
    and `chunk_output`; qg: [C, K], aqk: [C, C])."""
    v_new, s_next = chunk_state_step(s, w, u, kg, decay)
    return chunk_output(s, qg, aqk, v_new), v_new, s_next


def chunk_backward_step(ds, do, w, qg, aqk, kg, decay):
    """Reverse of `chunk_forward_step` for the state: given dL/dS' (ds, [K, BV] float32)
    and dL/do (do, [C, BV]), return (dv_new [C, BV], dL/dS [K, BV]), float32."""
    od = w.dtype
    do = do.astype(od)
    dv = dot(aqk.T, do) + dot(kg, ds.astype(od))
    ds = decay * ds + dot(qg.T, do) - dot(w.T, dv.astype(od))
    return dv, ds


def recurrence_cost(bh, tp, dk, dv, c, itemsize, *, backward=False, save_states=False):
    """(flops, bytes) of the inter-chunk recurrence (chunk_forward_step / chunk_backward_step
    over all chunks) as the GPU and TPU kernels run it, for their pl.CostEstimate."""
    n = tp // c
    flops = bh * tp * dv * (6 * dk + 2 * c)
    if backward:
        return flops, itemsize * bh * (tp * (3 * dk + c + 2 * dv) + n * dk * dv)
    nbytes = itemsize * bh * tp * (3 * dk + c + 2 * dv) + 8 * bh * dk * dv
    if save_states:
        nbytes += itemsize * bh * (n * dk * dv + tp * dv)
    return flops, nbytes
