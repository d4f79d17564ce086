"""Public gated delta rule op: `chunk_gated_delta_rule(..., impl=...)`.

impl="reference" runs the per-step scan, "xla" the chunked pure-JAX form
(differentiated by autodiff; the CPU path), "pallas" the chunked form with the
inter-chunk recurrence in a Pallas kernel (Triton on GPU, Mosaic on TPU; interpret
mode on CPU), "auto" picks "pallas" on GPU/TPU and "xla" on CPU.

In the Pallas form on GPU, for head dims up to `gpu_chunk_local.MAX_WIDTH`, the whole op
is one custom VJP over the chunk-local kernels of gpu_chunk_local.py and the state walks
of gpu_recurrence.py (`gpu_op.gated_delta_rule`). Otherwise (TPU, wider heads,
`prepare_impl="xla"`) the chunk-local part (w, u, qg, Aqk, kg per chunk) is plain JAX
(`xla.prepare`, differentiated by autodiff except for its triangular solve, whose VJP is
closed form) and the sequential recurrence is a kernel with its own custom VJP
(`_recurrence`; gpu_recurrence.py or tpu_recurrence.py). Neither backward keeps the
per-chunk states from the forward pass: it recomputes them with the forward walk, walks
the chunks backwards, and then forms the remaining gradients for all chunks at once
(`recurrence_grads`: one GPU kernel, or batched XLA products on TPU). Launch parameters
are one `BlockSizes` value (block_sizes.py), a static argument down to every kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import default_interpret
from pallas_kernels.gated_delta_rule import gpu_op, gpu_recurrence, tpu_recurrence
from pallas_kernels.gated_delta_rule.block_sizes import BlockSizes
from pallas_kernels.gated_delta_rule.gpu_chunk_local import MAX_WIDTH
from pallas_kernels.gated_delta_rule.reference import check_inputs, fused_recurrent_gated_delta_rule
from pallas_kernels.gated_delta_rule.xla import chunk_gated_delta_rule_xla, finish, prepare

IMPLS = ("auto", "xla", "pallas", "reference")
_KERNELS = {"gpu": gpu_recurrence, "tpu": tpu_recurrence}


@functools.lru_cache(maxsize=None)
def _recurrence(backend: str, chunk_size: int, interpret: bool, block_sizes: BlockSizes):
    """custom_vjp of (w, u, qg, aqk, kg, decay, h0) -> (o, final state) for one kernel family.

    Arrays are flattened head-major: w, qg, kg [BH, Tp, K]; u [BH, Tp, V];
    aqk [BH, Tp, C]; decay [BH, N]; h0 [BH, K, V] float32.
    """
    kern = _KERNELS[backend]
    c = chunk_size
    kw = dict(chunk_size=c, interpret=interpret, block_sizes=block_sizes)

    @jax.custom_vjp
    def recurrence(w, u, qg, aqk, kg, decay, h0):
        o, ht = kern.recurrence_fwd(w, u, qg, aqk, kg, decay, h0, **kw)
        return o, ht

    def fwd(w, u, qg, aqk, kg, decay, h0):
        return recurrence(w, u, qg, aqk, kg, decay, h0), (w, u, qg, aqk, kg, decay, h0)

    def bwd(res, cts):
        w, u, qg, aqk, kg, decay, h0 = res
        do, dht = cts
        # Recompute the state entering each chunk and v_new rather than storing them. (On GPU
        # the outputs come from a separate kernel, unused here, which jit removes as dead code.)
        _, _, h, v_new = kern.recurrence_fwd(w, u, qg, aqk, kg, decay, h0, save_states=True, **kw)
        do = do.astype(w.dtype)
        dh, dv, dh0 = kern.recurrence_bwd(w, qg, aqk, kg, decay, do, dht.astype(jnp.float32), **kw)
        # o = qg h + aqk v_new ; v_new = u - w h ; h' = decay h + kg^T v_new
        dqg, daqk, dkg, dw, ddecay = kern.recurrence_grads(do, h, v_new, dh, dv, **kw)
        return (
            dw.astype(w.dtype), dv.astype(u.dtype), dqg.astype(qg.dtype), daqk.astype(aqk.dtype),
            dkg.astype(kg.dtype), ddecay.astype(decay.dtype), dh0.astype(h0.dtype),
        )

    recurrence.defvjp(fwd, bwd)
    return recurrence


def chunk_gated_delta_rule_pallas(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
    chunk_size=64, interpret=None, backend=None, prepare_impl=None, block_sizes=None,
):
    """The Pallas form. backend: "gpu" (Triton) or "tpu" (Mosaic); None picks the
    running platform's, and the GPU kernel in interpret mode on CPU. prepare_impl: "pallas"
    (GPU backend only) runs the whole op as one custom VJP over the chunk-local and walk
    kernels (`gpu_op.gated_delta_rule`); "xla" runs the chunk-local part in XLA, then the
    recurrence kernels. None picks "pallas" on the GPU backend for K, V <= MAX_WIDTH, else
    "xla". block_sizes: the kernels' launch parameters (None: the committed `BlockSizes()`)."""
    check_inputs(q, k, v, g, beta, initial_state, segment_ids, chunk_size)
    interpret = default_interpret(interpret)
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    if backend is None:
        backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
    if backend not in _KERNELS:
        raise ValueError(f"backend must be one of {tuple(_KERNELS)}, got {backend!r}")
    if prepare_impl is None:
        wide = max(q.shape[-1], v.shape[-1]) > MAX_WIDTH
        prepare_impl = "pallas" if backend == "gpu" and not wide else "xla"
    if prepare_impl not in ("xla", "pallas") or (prepare_impl == "pallas" and backend != "gpu"):
        raise ValueError(f"prepare_impl must be 'xla', or 'pallas' on the gpu backend; got {prepare_impl!r} ({backend})")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if scale is None:
        scale = dk**-0.5
    if prepare_impl == "pallas":
        o, ht = gpu_op.gated_delta_rule(q, k, v, g, beta, initial_state, scale=scale, segment_ids=segment_ids,
                                        chunk_size=chunk_size, interpret=interpret, block_sizes=block_sizes)
        return o.astype(v.dtype), (ht if output_final_state else None)
    x = prepare(q, k, v, g, beta, scale=scale, segment_ids=segment_ids, chunk_size=chunk_size)
    n = x.decay.shape[-1]
    flat = lambda a: a.reshape((b * h, n * chunk_size, a.shape[-1]))
    h0 = (
        jnp.zeros((b * h, dk, dv), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32).reshape(b * h, dk, dv)
    )
    o, ht = _recurrence(backend, chunk_size, interpret, block_sizes)(
        flat(x.w), flat(x.u), flat(x.qg), flat(x.aqk), flat(x.kg), x.decay.reshape(b * h, n), h0
    )
    o = finish(o.reshape(b, h, n, chunk_size, dv), t, v.dtype)
    return o, (ht.reshape(b, h, dk, dv) if output_final_state else None)


def chunk_gated_delta_rule(
    q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, segment_ids=None,
    chunk_size=64, interpret=None, impl="auto",
):
    """Gated delta rule over a whole sequence (contract: docs/DESIGN.md "Interfaces", docs/ARCHITECTURE.md).

    q, k: [B,T,H,K]; v: [B,T,H,V]; g: [B,T,H] log-decay (<= 0); beta: [B,T,H];
    initial_state: [B,H,K,V]; segment_ids: [B,T] (state restarts where it changes).
    Returns (o [B,T,H,V] in v's dtype, final state [B,H,K,V] float32 or None).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "xla" if (jax.default_backend() == "cpu" and not interpret) else "pallas"
    kwargs = dict(
        scale=scale, initial_state=initial_state, output_final_state=output_final_state, segment_ids=segment_ids
    )
    if impl == "reference":
        check_inputs(q, k, v, g, beta, initial_state, segment_ids, chunk_size)
        return fused_recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    if impl == "xla":
        return chunk_gated_delta_rule_xla(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    return chunk_gated_delta_rule_pallas(q, k, v, g, beta, chunk_size=chunk_size, interpret=interpret, **kwargs)


__all__ = ["chunk_gated_delta_rule", "chunk_gated_delta_rule_pallas"]
