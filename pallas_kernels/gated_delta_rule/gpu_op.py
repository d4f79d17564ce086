"""The gated delta rule on GPU as one custom VJP over Pallas kernels (Triton lowering), for
head dims up to `gpu_chunk_local.MAX_WIDTH` (ops.py sends wider heads to xla.prepare and
the walks alone).

    forward   gpu_chunk_local.wy (T, w, u, kg), the state walk
              (gpu_recurrence.recurrence_states), gpu_chunk_local.output: three launches;
              aqk and qg never go through memory. Outside autodiff wy skips T, which only
              the backward reads.
    backward  the walk again, gpu_chunk_local.aqk_qg, the reverse walk and the
              recurrence's parallel gradients (gpu_recurrence.py), then
              gpu_chunk_local.prepare_bwd.

The chunk decays exp(G_last) stay in XLA (one sum per chunk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import gpu_recurrence
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from pallas_kernels.gated_delta_rule.gpu_chunk_local import (
    aqk_qg, kernel_operands, output, prepare_bwd, segment_cotangents, wy,
)

_F32 = jnp.float32


@functools.lru_cache(maxsize=None)
def _op(chunk_size: int, scale: float, interpret: bool, block_sizes: BlockSizes):
    """custom_vjp of (q, k, v, g, beta, decay, h0, segs) -> (o [B, Tp, H, V], final state
    [BH, K, V] float32); arguments padded as by `kernel_operands`, decay [BH, N], h0 [BH, K, V]."""
    kw = dict(chunk_size=chunk_size, interpret=interpret, block_sizes=block_sizes)

    def run(q, k, v, g, beta, decay, h0, segs, keep_t=True):
        t, w, u, kg = wy(k, v, g, beta, segs, out_dtype=v.dtype, keep_t=keep_t, **kw)
        states, v_new, ht = gpu_recurrence.recurrence_states(w, u, kg, decay, h0, **kw)
        o = output(q, k, g, segs, states, v_new, scale=scale, out_dtype=v.dtype, **kw)
        return (o, ht), (t, w, u, kg)

    @jax.custom_vjp
    def op(q, k, v, g, beta, decay, h0, segs):
        return run(q, k, v, g, beta, decay, h0, segs, keep_t=False)[0]  # no gradient: T is not needed

    def fwd(q, k, v, g, beta, decay, h0, segs):
        outs, saved = run(q, k, v, g, beta, decay, h0, segs)
        return outs, (q, k, v, g, beta, decay, h0, segs, *saved)

    def bwd(res, cts):
        q, k, v, g, beta, decay, h0, segs, t, w, u, kg = res
        do, dht = cts
        b, tp, h, dv = do.shape
        do = jnp.moveaxis(do.astype(w.dtype), 2, 1).reshape(b * h, tp, dv)  # head-major
        # The states entering each chunk and v_new again (not kept from the forward), and
        # aqk, qg, which the forward formed inside its output kernel.
        states, v_new, _ = gpu_recurrence.recurrence_states(w, u, kg, decay, h0, **kw)
        aqk, qg = aqk_qg(q, k, g, segs, scale=scale, out_dtype=w.dtype, **kw)
        dstates, dv_new, dh0 = gpu_recurrence.recurrence_bwd(w, qg, aqk, kg, decay, do, dht.astype(_F32), **kw)
        dqg, daqk, dkg, dw, ddecay = gpu_recurrence.recurrence_grads(do, states, v_new, dstates, dv_new, **kw)
        grads = prepare_bwd(q, k, v, g, beta, segs, t, w, u, dw, dv_new, dqg, daqk, dkg, scale=scale, **kw)
        return (*grads, ddecay.astype(decay.dtype), dh0, segment_cotangents(segs))

    op.defvjp(fwd, bwd)
    return op


def gated_delta_rule(q, k, v, g, beta, h0, *, scale, segment_ids, chunk_size, interpret=False,
                     block_sizes=BlockSizes()):
    """The whole op on GPU: q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H],
    h0 [B, H, K, V] float32 or None. Returns o [B, T, H, V] in v's dtype (the kernels'
    operand dtype) and the final state [B, H, K, V] float32."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    q, k, v, g, beta, decay, segs = kernel_operands(q, k, v, g, beta, segment_ids, c)
    h0 = jnp.zeros((b * h, dk, dv), _F32) if h0 is None else h0.astype(_F32).reshape(b * h, dk, dv)
    o, ht = _op(c, float(scale), bool(interpret), block_sizes)(q, k, v, g, beta, decay.reshape(b * h, -1), h0, segs)
    return o[:, :t], ht.reshape(b, h, dk, dv)
