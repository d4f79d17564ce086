"""Public SSD (Mamba2) API: `ssd(...)` with impl "auto" | "xla" | "pallas" | "reference".

The Pallas path wraps the core recurrence (o, h_T) = core(v, a, k, q, h0) — with
q = C, k = B, v = dt x, a = dt A — in a custom_vjp whose backward is three more core
runs, so no chunk state is ever stored (each run recomputes them on the fly):

    dv, dh0 = core run backwards in time on (v <- do, k <- q, q <- k, h0 <- dh_T)
    dq      = core run forwards on (v <- k, k <- v, q <- do, h0 <- h0^T)
    dk      = core run backwards on (v <- q, k <- do, q <- v, h0 <- dh_T^T)
    da_t    = sum_{s >= t} (do_s . o_s - dv_s . v_s) + <dh_T, h_T>

The last line holds because exp(a_t) multiplies exactly the (output, source) pairs
that straddle t; summing "all pairs into outputs at s >= t" minus "all pairs from
sources at s >= t" leaves those. Backwards in time the log-decays shift by one
(the decay between s and s+1 belongs to s+1). Everything outside the core (dt bias,
softplus, dt x, dt A, D x) is plain JAX and differentiated by autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import default_interpret, pad_time, segment_index
from pallas_kernels.ssd.reference import check_shapes, process_dt, ssd_reference
from pallas_kernels.ssd.xla import pad_segments, ssd_xla

IMPLS = ("auto", "xla", "pallas", "reference")


def _next_pow2(n, minimum=16):
    return max(minimum, 1 << (n - 1).bit_length())


def _pad_last(z, size):
    return z if z.shape[-1] == size else jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, size - z.shape[-1])])


def _core_call(v, a, k, q, h0, seg, *, chunk_size, platform, interpret):
    """Pad to the kernel's shape rules, run one core kernel, slice back.

    v [B,T,Hv,P], a [B,T,H] f32, k [B,T,Gk,N], q [B,T,Gq,N] (one dtype), h0 [B,H,P,N] f32,
    seg [B,T] monotone index or None. Returns (o [B,T,H,P] f32, hT [B,H,P,N] f32).
    """
    b, t, h = a.shape
    p, n = v.shape[-1], k.shape[-1]
    L = chunk_size
    if platform == "gpu":
        from pallas_kernels.ssd.gpu import core_pallas_gpu as kernel
        # Triton: power-of-two blocks, matrix dims >= 16; zero padding changes nothing.
        pp, npad = _next_pow2(p), _next_pow2(n)
    else:
        from pallas_kernels.ssd.tpu import core_pallas_tpu as kernel
        pp, npad = p, n
    v = _pad_last(pad_time(v, L), pp)
    k, q = (_pad_last(pad_time(z, L), npad) for z in (k, q))
    a = jnp.swapaxes(pad_time(a, L), 1, 2)  # [B, H, Tp]
    h0 = jnp.pad(h0, ((0, 0), (0, 0), (0, pp - p), (0, npad - n)))
    s = sp = None
    if seg is not None:
        s = pad_segments(seg, L).astype(jnp.float32)
        sp = jnp.concatenate([s[:, :1], s[:, :-1]], axis=1)  # index of the previous token
    o, hT = kernel(v, a, k, q, h0, s, sp, chunk_size=L, interpret=interpret)
    return o[:, :t, :, :p], hT[:, :, :p, :n]


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _core(v, a, k, q, h0, seg, chunk_size, platform, interpret):
    return _core_call(v, a, k, q, h0, seg, chunk_size=chunk_size, platform=platform,
                      interpret=interpret)


def _core_fwd(v, a, k, q, h0, seg, chunk_size, platform, interpret):
    o, hT = _core(v, a, k, q, h0, seg, chunk_size, platform, interpret)
    return (o, hT), (v, a, k, q, h0, seg, o, hT)


def _core_bwd(chunk_size, platform, interpret, res, cts):
    v, a, k, q, h0, seg, o, hT = res
    do, dhT = cts
    h = a.shape[2]
    kw = dict(chunk_size=chunk_size, platform=platform, interpret=interpret)
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


def ssd_pallas(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
               output_final_state=False, segment_ids=None, chunk_size=64, interpret=None,
               platform=None):
    """The Pallas path. platform "gpu" (Triton) or "tpu" (Mosaic); None: the current backend's
    (the GPU kernel when interpreting on CPU)."""
    check_shapes(x, dt, A, B, C, D, initial_state, segment_ids)
    if platform is None:
        platform = "tpu" if jax.default_backend() == "tpu" else "gpu"
    if platform not in ("gpu", "tpu"):
        raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
    if platform == "gpu" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"the GPU kernel needs chunk_size a power of two >= 16, got {chunk_size}")
    if platform == "tpu" and chunk_size % 16:
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
    o, final = _core(u, a, B.astype(x.dtype), C.astype(x.dtype), h0, seg, chunk_size, platform,
                     interpret)
    if D is not None:
        o = o + D.astype(jnp.float32)[None, None, :, None] * x.astype(jnp.float32)
    if initial_state is not None:
        final = final.astype(initial_state.dtype)
    return o.astype(x.dtype), (final if output_final_state else None)


def ssd(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
        output_final_state=False, segment_ids=None, chunk_size=64, interpret=None, impl="auto"):
    """SSD (Mamba2) scan. See DESIGN.md "Interfaces" for shapes; returns (y, final_state or None).

    impl "auto": the fastest measured form for the platform. Today that is the chunked
    XLA form everywhere (BENCHMARKS.md "Kernels: SSD": on an H200 our Pallas kernel is
    1.6x slower forward and 4x slower forward+backward than XLA), and Pallas only when
    `interpret` is set; "reference": the per-step scan.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
              output_final_state=output_final_state, segment_ids=segment_ids)
    if impl == "auto":
        impl = "pallas" if interpret else "xla"
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, **kw)
    if impl == "xla":
        return ssd_xla(x, dt, A, B, C, chunk_size=chunk_size, **kw)
    return ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, interpret=interpret, **kw)
