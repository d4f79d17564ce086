"""Public SSD (Mamba2) API: `ssd(...)` with impl "auto" | "xla" | "pallas" | "reference".

The Pallas path wraps the core recurrence (o, h_T) = core(v, a, k, q, h0) — with
q = C, k = B, v = dt x, a = dt A — in a custom_vjp. Everything outside the core (dt
bias, softplus, dt x, dt A, D x) is plain JAX and differentiated by autodiff.

GPU (gpu.py): chunk-parallel kernels. Forward: chunk states, a scan over chunks,
chunk outputs. Backward: the same states recomputed (nothing but the inputs is
stored), the cotangents' chunk states, a reverse scan over chunks, one gradient
kernel per chunk. The decays and their cumulative sums are elementwise XLA here.

TPU (tpu.py): one kernel walks the chunks with the state in VMEM; its backward is
three more runs of that kernel, so no chunk state is ever stored:

    dv, dh0 = core run backwards in time on (v <- do, k <- q, q <- k, h0 <- dh_T)
    dq      = core run forwards on (v <- k, k <- v, q <- do, h0 <- h0^T)
    dk      = core run backwards on (v <- q, k <- do, q <- v, h0 <- dh_T^T)
    da_t    = sum_{s >= t} (do_s . o_s - dv_s . v_s) + <dh_T, h_T>

The last line holds because exp(a_t) multiplies exactly the (output, source) pairs
that straddle t; summing "all pairs into outputs at s >= t" minus "all pairs from
sources at s >= t" leaves those. Backwards in time the log-decays shift by one
(the decay between s and s+1 belongs to s+1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import chunk_segments, default_interpret, pad_segments, pad_time, segment_index
from pallas_kernels.ssd.block_sizes import BlockSizes
from pallas_kernels.ssd.reference import check_shapes, process_dt, ssd_reference
from pallas_kernels.ssd.xla import ssd_xla

IMPLS = ("auto", "xla", "pallas", "reference")


def _next_pow2(n, minimum=16):
    return max(minimum, 1 << (n - 1).bit_length())


def _pad_last(z, size):
    return z if z.shape[-1] == size else jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, size - z.shape[-1])])


# ----------------------------------------------------------------------- TPU path
def _core_call(v, a, k, q, h0, seg, *, chunk_size, interpret):
    """Pad time to whole chunks, run the TPU kernel once, slice back.

    v [B,T,Hv,P], a [B,T,H] f32, k [B,T,Gk,N], q [B,T,Gq,N] (one dtype), h0 [B,H,P,N] f32,
    seg [B,T] monotone index or None. Returns (o [B,T,H,P] f32, hT [B,H,P,N] f32).
    """
    from pallas_kernels.ssd.tpu import core_pallas_tpu

    t = a.shape[1]
    L = chunk_size
    v, k, q = (pad_time(z, L) for z in (v, k, q))
    a = jnp.swapaxes(pad_time(a, L), 1, 2)  # [B, H, Tp]
    s = sp = None
    if seg is not None:
        s = pad_segments(seg, L).astype(jnp.float32)
        sp = jnp.concatenate([s[:, :1], s[:, :-1]], axis=1)  # index of the previous token
    o, hT = core_pallas_tpu(v, a, k, q, h0, s, sp, chunk_size=L, interpret=interpret)
    return o[:, :t], hT


def _core_call_reversed(v, a, k, q, h0, seg, *, chunk_size, **kw):
    """The core run from the last token to the first (anti-causal), outputs in time order.

    Time is padded to whole chunks before the flip, so the backward chunks are exactly
    the forward chunks: every (output, source) pair then takes the same path (inside a
    chunk, or through the state) in both directions and is rounded alike, which the
    decay gradient's difference of sums relies on in bf16.
    """
    t = a.shape[1]
    flip = lambda z: jnp.flip(pad_time(z, chunk_size), axis=1)
    a_next = jnp.concatenate([a[:, 1:], jnp.zeros_like(a[:, :1])], axis=1)  # decay s -> s+1
    seg_rev = None if seg is None else segment_index(jnp.flip(pad_segments(seg, chunk_size), axis=1))
    o, hT = _core_call(flip(v), flip(a_next), flip(k), flip(q), h0, seg_rev, chunk_size=chunk_size, **kw)
    return jnp.flip(o, axis=1)[:, :t], hT


def _sum_groups(z, groups):
    """[B, T, H, d] per-head gradients -> [B, T, G, d] summed over the heads of a group."""
    b, t, h, d = z.shape
    return z if groups == h else z.reshape(b, t, groups, h // groups, d).sum(axis=3)


def _repeat_groups(z, h):
    return z if z.shape[2] == h else jnp.repeat(z, h // z.shape[2], axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _core(v, a, k, q, h0, seg, chunk_size, interpret):
    return _core_call(v, a, k, q, h0, seg, chunk_size=chunk_size, interpret=interpret)


def _core_fwd(v, a, k, q, h0, seg, chunk_size, interpret):
    o, hT = _core(v, a, k, q, h0, seg, chunk_size, interpret)
    return (o, hT), (v, a, k, q, h0, seg, o, hT)


def _core_bwd(chunk_size, interpret, res, cts):
    v, a, k, q, h0, seg, o, hT = res
    do, dhT = cts
    h = a.shape[2]
    kw = dict(chunk_size=chunk_size, interpret=interpret)
    do_c = do.astype(v.dtype)
    dv_h, dh0 = _core_call_reversed(do_c, a, q, k, dhT, seg, **kw)
    dh0 = jnp.exp(a[:, 0])[:, :, None, None] * dh0
    dq_h, _ = _core_call(k, a, v, do_c, jnp.swapaxes(h0, 2, 3), seg, **kw)
    dk_h, _ = _core_call_reversed(q, a, do_c, v, jnp.swapaxes(dhT, 2, 3), seg, **kw)
    v_h = _repeat_groups(v, h).astype(jnp.float32)
    # do as rounded for the kernels, so that both sums see the same pairs.
    per_token = jnp.sum(do_c.astype(jnp.float32) * o, axis=-1) - jnp.sum(dv_h * v_h, axis=-1)
    da = jax.lax.cumsum(per_token, axis=1, reverse=True) + jnp.sum(dhT * hT, axis=(2, 3))[:, None]
    dv = _sum_groups(dv_h, v.shape[2]).astype(v.dtype)
    dk = _sum_groups(dk_h, k.shape[2]).astype(k.dtype)
    dq = _sum_groups(dq_h, q.shape[2]).astype(q.dtype)
    return dv, da, dk, dq, dh0, None


_core.defvjp(_core_fwd, _core_bwd)


# ----------------------------------------------------------------------- GPU path
def _decay_rows(a, seg, L):
    """a [B,T,H] log-decays -> the per-token float32 rows of the GPU kernels, time padded:
    cs (in-chunk cumulative sum), ein = e^cs on the entering state's segment,
    eout = e^{cs_L - cs} on the chunk's last segment, all [B,H,Tp]; carry [B,H,nc], the
    decay of the whole chunk (0 where a segment starts inside it); s [B,Tp] f32 or None."""
    b, t, h = a.shape
    a = pad_time(a, L)
    tp = a.shape[1]
    nc = tp // L
    cs = jnp.cumsum(a.reshape(b, nc, L, h), axis=2)
    ein = jnp.exp(cs)
    eout = jnp.exp(cs[:, :, -1:] - cs)
    s = None
    if seg is not None:
        segs = chunk_segments(seg, t, L)
        ein = ein * segs.carry_in[..., None]
        eout = eout * segs.carry_out[..., None]
        s = segs.seg.astype(jnp.float32)
    rows = lambda z: jnp.swapaxes(z.reshape(b, tp, h), 1, 2)
    cs, ein, eout = rows(cs), rows(ein), rows(eout)
    return cs, ein, eout, ein[:, :, L - 1::L], s


def _gpu_operands(v, a, k, q, h0, seg, L):
    """Pad time to whole chunks and P, N to Triton's power-of-two dims (zeros change nothing)."""
    pp, npad = _next_pow2(v.shape[-1]), _next_pow2(k.shape[-1])
    v = _pad_last(pad_time(v, L), pp)
    k, q = (_pad_last(pad_time(z, L), npad) for z in (k, q))
    h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, pp - h0.shape[2]), (0, npad - h0.shape[3])))
    return v, k, q, h0, _decay_rows(a, seg, L)


def _gpu_states(v, k, h0, rows, L, out_dtype, interpret, block_sizes):
    """(state entering each chunk [B,H,nc,P,N] in out_dtype, final state f32)."""
    from pallas_kernels.ssd import gpu

    cs, ein, eout, carry, s = rows
    local = gpu.chunk_states(v, k, eout, chunk_size=L, block_sizes=block_sizes, interpret=interpret)
    return gpu.state_pass(local, carry, h0, out_dtype=out_dtype, interpret=interpret, block_sizes=block_sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _core_gpu(v, a, k, q, h0, seg, chunk_size, interpret, block_sizes):
    """The core on the GPU kernels: arguments as _core_call with v per head and one grouping
    of q and k; o and the final state in float32."""
    from pallas_kernels.ssd import gpu

    t, p, n = a.shape[1], v.shape[-1], k.shape[-1]
    v, k, q, h0, rows = _gpu_operands(v, a, k, q, h0, seg, chunk_size)
    h_in, hT = _gpu_states(v, k, h0, rows, chunk_size, q.dtype, interpret, block_sizes)
    cs, ein, _, _, s = rows
    o = gpu.chunk_outputs(v, k, q, cs, ein, h_in, s, chunk_size=chunk_size, block_sizes=block_sizes,
                          interpret=interpret)
    return o[:, :t, :, :p], hT[:, :, :p, :n]


def _core_gpu_fwd(v, a, k, q, h0, seg, chunk_size, interpret, block_sizes):
    return _core_gpu(v, a, k, q, h0, seg, chunk_size, interpret, block_sizes), (v, a, k, q, h0, seg)


def _core_gpu_bwd(chunk_size, interpret, block_sizes, res, cts):
    from pallas_kernels.ssd import gpu

    v, a, k, q, h0, seg = res
    do, dhT = cts
    L = chunk_size
    t, p, n = a.shape[1], v.shape[-1], k.shape[-1]
    vp, kp, qp, h0p, rows = _gpu_operands(v, a, k, q, h0, seg, L)
    cs, ein, eout, carry, s = rows
    # States in float32 here: they enter da through sums that bf16 would bias (see gpu.py).
    h_in, _ = _gpu_states(vp, kp, h0p, rows, L, jnp.float32, interpret, block_sizes)
    do_p = _pad_last(pad_time(do.astype(v.dtype), L), vp.shape[-1])
    dhT_p = jnp.pad(dhT, ((0, 0), (0, 0), (0, vp.shape[-1] - p), (0, kp.shape[-1] - n)))
    # Each chunk's gradient of its entering state, then the reverse scan: g_out[c] is the
    # gradient of the state leaving chunk c, the scan's end the gradient of h0.
    local = gpu.chunk_states(do_p, qp, ein, chunk_size=L, block_sizes=block_sizes, fine=True, interpret=interpret)
    g_out, dh0 = gpu.state_pass(local, carry, dhT_p, out_dtype=jnp.float32, reverse=True,
                                interpret=interpret, block_sizes=block_sizes)
    dv, dk, dq, into, out_of = gpu.chunk_grads(vp, kp, qp, do_p, cs, ein, eout, h_in, g_out, s,
                                               chunk_size=L, block_sizes=block_sizes, interpret=interpret)
    b, h, tp = into.shape
    into, out_of = into.reshape(b, h, tp // L, L), out_of.reshape(b, h, tp // L, L)
    da = jax.lax.cumsum(into, axis=3, reverse=True) + jnp.cumsum(out_of, axis=3) - out_of
    dv, dk, dq = dv[:, :t, :, :p], dk[:, :t, :, :n], dq[:, :t, :, :n]
    da = jnp.swapaxes(da.reshape(b, h, tp)[:, :, :t], 1, 2)
    return dv, da, dk, dq, dh0[:, :, :p, :n], None


_core_gpu.defvjp(_core_gpu_fwd, _core_gpu_bwd)


def ssd_pallas(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
               output_final_state=False, segment_ids=None, chunk_size=64, interpret=None,
               backend=None, block_sizes=None):
    """The Pallas path. backend "gpu" (Triton) or "tpu" (Mosaic); None: the running platform's
    (the GPU kernel when interpreting on CPU). block_sizes: the GPU kernels' launch
    parameters (None: the committed `BlockSizes()`)."""
    check_shapes(x, dt, A, B, C, D, initial_state, segment_ids)
    if backend is None:
        backend = "tpu" if jax.default_backend() == "tpu" else "gpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")
    if backend == "gpu" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"the GPU kernel needs chunk_size a power of two >= 16, got {chunk_size}")
    if backend == "tpu" and chunk_size % 16:
        raise ValueError(f"the TPU kernel needs chunk_size a multiple of 16, got {chunk_size}")
    interpret = default_interpret(interpret)
    b, t, h, p = x.shape
    n = B.shape[-1]
    dt = process_dt(dt.astype(jnp.float32), None if dt_bias is None else dt_bias.astype(jnp.float32),
                    dt_softplus)
    # Matrix operands share one dtype (x's), accumulation is float32.
    u = (x.astype(jnp.float32) * dt[..., None]).astype(x.dtype)
    a = dt * A.astype(jnp.float32)[None, None, :]
    h0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    seg = None if segment_ids is None else segment_index(segment_ids)
    Bc, Cc = B.astype(x.dtype), C.astype(x.dtype)
    if backend == "gpu":
        block_sizes = BlockSizes() if block_sizes is None else block_sizes
        o, final = _core_gpu(u, a, Bc, Cc, h0, seg, chunk_size, interpret, block_sizes)
    else:
        o, final = _core(u, a, Bc, Cc, h0, seg, chunk_size, interpret)
    if D is not None:
        o = o + D.astype(jnp.float32)[None, None, :, None] * x.astype(jnp.float32)
    if initial_state is not None:
        final = final.astype(initial_state.dtype)
    return o.astype(x.dtype), (final if output_final_state else None)


def ssd(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
        output_final_state=False, segment_ids=None, chunk_size=64, interpret=None, impl="auto"):
    """SSD (Mamba2) scan. See docs/DESIGN.md "Interfaces" for shapes; returns (y, final_state or None).

    impl "auto": the fastest measured form for the platform (BENCHMARKS.md, "Kernels:
    SSD"): the chunk-parallel Pallas kernels on GPU, the chunked XLA form on TPU (its
    Mosaic kernel is not measured) and CPU, and Pallas in interpret mode when `interpret`
    is set; "reference": the per-step scan.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
              output_final_state=output_final_state, segment_ids=segment_ids)
    if impl == "auto":
        impl = "pallas" if interpret or jax.default_backend() == "gpu" else "xla"
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, **kw)
    if impl == "xla":
        return ssd_xla(x, dt, A, B, C, chunk_size=chunk_size, **kw)
    return ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, interpret=interpret, **kw)
