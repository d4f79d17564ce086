"""Gated delta rule: reference vs an independent float64 loop, chunked XLA form and
Pallas kernels (interpret mode on CPU, compiled on GPU) vs the float64 reference in
output, final state and every gradient; the chunk-local GPU kernels (gpu_chunk_local) vs
xla.prepare and its autodiff VJP; Mosaic TPU and Triton lowering checked on CPU."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import launch_params, rel_rms
from pallas_kernels.gated_delta_rule import (
    BlockSizes,
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_pallas,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_step,
)
from pallas_kernels.gated_delta_rule import gpu_chunk_local
from pallas_kernels.gated_delta_rule.xla import prepare as xla_prepare

TOL = {jnp.float32: 5e-3, jnp.bfloat16: 2e-2}


def make_inputs(seed, b, t, h, dk, dv, dtype=jnp.float32, n_segments_hint=0.05):
    ks = jax.random.split(jax.random.key(seed), 9)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # GDN L2-normalises keys
    v = jax.random.normal(ks[2], (b, t, h, dv))
    g = jax.nn.log_sigmoid(2.0 * jax.random.normal(ks[3], (b, t, h)) + 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
    h0 = jax.random.normal(ks[5], (b, h, dk, dv))
    seg = jnp.cumsum(jax.random.uniform(ks[6], (b, t)) < n_segments_hint, axis=1).astype(jnp.int32)
    do = jax.random.normal(ks[7], (b, t, h, dv))
    dht = jax.random.normal(ks[8], (b, h, dk, dv))
    cast = lambda x: x.astype(dtype)
    return dict(q=cast(q), k=cast(k), v=cast(v), g=cast(g), beta=cast(beta), h0=h0, seg=seg, do=do, dht=dht)


def _loss_and_grads(fn, x, use_h0, use_seg, **kw):
    """o, final state, and gradients of <o, do> + <S_T, dS> w.r.t. q, k, v, g, beta (and h0)."""
    seg = x["seg"] if use_seg else None

    def loss(q, k, v, g, beta, h0):
        o, s = fn(q, k, v, g, beta, initial_state=h0 if use_h0 else None, output_final_state=True,
                  segment_ids=seg, **kw)
        return jnp.sum(o.astype(jnp.float32) * x["do"]) + jnp.sum(s * x["dht"]), (o, s)

    args = [x[n] for n in ("q", "k", "v", "g", "beta", "h0")]
    # One jit per case: compiling the whole program once is much cheaper than eager dispatch.
    grad_fn = jax.jit(jax.grad(loss, argnums=tuple(range(6 if use_h0 else 5)), has_aux=True))
    grads, (o, s) = grad_fn(*args)
    return o, s, grads


def _reference64(x, use_h0, use_seg):
    x64_inputs = {n: (a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a) for n, a in x.items()}
    return _loss_and_grads(fused_recurrent_gated_delta_rule, x64_inputs, use_h0, use_seg)


def _assert_close(got, want, tol, what=""):
    names = ("q", "k", "v", "g", "beta", "initial_state")
    o, s, grads = got
    o_r, s_r, grads_r = want
    errors = {"o": rel_rms(o, o_r), "final_state": rel_rms(s, s_r)}
    errors.update({f"d{n}": rel_rms(a, b) for n, a, b in zip(names, grads, grads_r)})
    for name, err in errors.items():
        assert np.isfinite(err) and err <= tol, f"{what}: rel-RMS error of {name} = {err:.2e} > {tol:.0e} ({errors})"


# ---------------------------------------------------------------------- reference
def test_reference_matches_dense_numpy_loop(x64):
    """The scan against S_t = exp(g_t)(I - b k k^T) S_{t-1} + b k v^T written with dense matrices."""
    x = make_inputs(0, 1, 23, 2, 5, 3, n_segments_hint=0.15)
    args = {n: np.asarray(x[n], np.float64) for n in ("q", "k", "v", "g", "beta", "h0")}
    seg = np.asarray(x["seg"])
    o, s = fused_recurrent_gated_delta_rule(
        *(jnp.asarray(args[n]) for n in ("q", "k", "v", "g", "beta")),
        initial_state=jnp.asarray(args["h0"]), output_final_state=True, segment_ids=x["seg"],
    )
    dk = args["q"].shape[-1]
    o_np = np.zeros_like(np.asarray(o))
    for hh in range(2):
        state = args["h0"][0, hh]
        for t in range(23):
            if t > 0 and seg[0, t] != seg[0, t - 1]:
                state = np.zeros_like(state)
            kt, bt = args["k"][0, t, hh], args["beta"][0, t, hh]
            state = np.exp(args["g"][0, t, hh]) * (np.eye(dk) - bt * np.outer(kt, kt)) @ state + bt * np.outer(
                kt, args["v"][0, t, hh]
            )
            o_np[0, t, hh] = dk**-0.5 * state.T @ args["q"][0, t, hh]
        np.testing.assert_allclose(np.asarray(s)[0, hh], state, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(o), o_np, rtol=1e-12, atol=1e-12)


def test_decode_steps_continue_chunked_prefill():
    """Prefill with the chunked op, then decode token by token with the step function:
    the same outputs as running the chunked op over the whole sequence."""
    x = make_inputs(1, 2, 40, 2, 8, 8)
    names = ("q", "k", "v", "g", "beta")
    chunked = jax.jit(functools.partial(chunk_gated_delta_rule, output_final_state=True, chunk_size=16, impl="xla"))
    full, s_full = chunked(*(x[n] for n in names), initial_state=x["h0"])
    _, s = chunked(*(x[n][:, :33] for n in names), initial_state=x["h0"])
    step = jax.jit(gated_delta_rule_step)
    outs = []
    for t in range(33, 40):
        o_t, s = step(*(x[n][:, t] for n in names), s)
        outs.append(o_t)
    assert rel_rms(jnp.stack(outs, 1), full[:, 33:]) < 1e-5
    assert rel_rms(s, s_full) < 1e-5


# ------------------------------------------------------------------- chunked XLA
@pytest.mark.parametrize("t", [1, 63, 77, 130, 1000])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_xla_forward(x64, t, chunk):
    x = make_inputs(t + chunk, 1, t, 2, 8, 4)
    names = ("q", "k", "v", "g", "beta")
    # Initial state and segments on here; the gradient tests below also cover them off.
    fn = jax.jit(functools.partial(chunk_gated_delta_rule, output_final_state=True, chunk_size=chunk, impl="xla"))
    o, s = fn(*(x[n] for n in names), initial_state=x["h0"], segment_ids=x["seg"])
    ref = jax.jit(functools.partial(fused_recurrent_gated_delta_rule, output_final_state=True))
    o_r, s_r = ref(*(x[n].astype(jnp.float64) for n in names), initial_state=x["h0"].astype(jnp.float64),
                   segment_ids=x["seg"])
    assert rel_rms(o, o_r) <= 5e-3 and rel_rms(s, s_r) <= 5e-3, (t, chunk)


@pytest.mark.parametrize(
    "t,chunk,use_h0,use_seg",
    [(1, 16, True, True), (63, 16, False, False), (77, 32, True, False), (130, 64, False, True),
     (1000, 64, True, True)],
)
def test_xla_gradients(x64, t, chunk, use_h0, use_seg):
    x = make_inputs(t, 2, t, 2, 8, 4)
    got = _loss_and_grads(chunk_gated_delta_rule, x, use_h0, use_seg, chunk_size=chunk, impl="xla")
    _assert_close(got, _reference64(x, use_h0, use_seg), 5e-3, f"xla T={t} C={chunk}")


def test_xla_bf16(x64):
    x = make_inputs(5, 1, 130, 2, 16, 16, dtype=jnp.bfloat16)
    got = _loss_and_grads(chunk_gated_delta_rule, x, True, True, chunk_size=32, impl="xla")
    _assert_close(got, _reference64(x, True, True), 2e-2, "xla bf16")


def test_segments_do_not_leak():
    """Packing two documents equals running them separately (state restarts at the boundary)."""
    x = make_inputs(7, 1, 50, 2, 8, 4)
    names = ("q", "k", "v", "g", "beta")
    seg = jnp.concatenate([jnp.zeros((1, 21), jnp.int32), jnp.ones((1, 29), jnp.int32)], axis=1)
    chunked = jax.jit(functools.partial(chunk_gated_delta_rule, chunk_size=16, impl="xla"))
    packed, _ = chunked(*(x[n] for n in names), segment_ids=seg)
    second, _ = chunked(*(x[n][:, 21:] for n in names))
    assert rel_rms(packed[:, 21:], second) < 1e-5


def test_bad_inputs_raise_clear_errors():
    x = make_inputs(0, 1, 8, 2, 4, 4)
    names = ("q", "k", "v", "g", "beta")
    args = [x[n] for n in names]
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_delta_rule(*args[:4], args[4][:, :5])
    with pytest.raises(ValueError, match="initial_state must be"):
        chunk_gated_delta_rule(*args, initial_state=x["h0"][:, :1])
    with pytest.raises(ValueError, match="segment_ids must be"):
        chunk_gated_delta_rule(*args, segment_ids=x["seg"][:, :3])
    with pytest.raises(ValueError, match="impl must be"):
        chunk_gated_delta_rule(*args, impl="cuda")


# ---------------------------------------------------------------- Pallas kernels
class TestPallasInterpret:
    """The Pallas forms with interpret=True on CPU (slow, so small shapes): one case by
    default, more under -m slow. TestPallasGPU runs the same checks compiled."""

    INTERPRET = True
    CASES = [(40, 16, True, True)]
    SLOW_CASES = [(1, 16, False, False), (63, 16, True, False), (77, 32, False, True), (130, 64, True, True)]
    ALL_CASES = CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES]

    def _check(self, backend, t, chunk, use_h0, use_seg, dtype=jnp.float32, dims=(16, 16), prepare_impls=("xla",)):
        """Output, final state and every gradient against the float64 reference, once per
        chunk-local implementation in prepare_impls (one reference for all)."""
        x = make_inputs(t, 1, t, 2, *dims, dtype=dtype)
        with jax.enable_x64(True):
            want = _reference64(x, use_h0, use_seg)
        for prepare_impl in prepare_impls:
            got = _loss_and_grads(chunk_gated_delta_rule_pallas, x, use_h0, use_seg, chunk_size=chunk,
                                  interpret=self.INTERPRET, backend=backend, prepare_impl=prepare_impl)
            _assert_close(got, want, TOL[dtype],
                          f"pallas-{backend} prepare={prepare_impl} T={t} C={chunk} h0={use_h0} seg={use_seg}")

    @pytest.mark.parametrize("backend", ["gpu", "tpu"])
    @pytest.mark.parametrize("t,chunk,use_h0,use_seg", ALL_CASES)
    def test_matches_reference(self, backend, t, chunk, use_h0, use_seg):
        self._check(backend, t, chunk, use_h0, use_seg)

    @pytest.mark.parametrize("backend", ["gpu", "tpu"])
    def test_widest_head_dims(self, backend):
        """K = 256, V = 512: the published Gated DeltaNet's key heads and 2x value expansion."""
        self._check(backend, 40, 16, True, True, dims=(256, 512))

    @pytest.mark.parametrize("t,chunk,use_h0,use_seg", CASES)
    def test_pallas_prepare_matches_reference(self, t, chunk, use_h0, use_seg):
        """The whole op as one custom VJP over the chunk-local and walk kernels (gpu_op)."""
        self._check("gpu", t, chunk, use_h0, use_seg, prepare_impls=("pallas",))

    def test_pallas_prepare_forward_alone(self):
        """Called outside autodiff, the op takes its primal path (no T kept for a backward):
        output and final state against the float64 reference."""
        x = make_inputs(5, 1, 77, 2, 32, 16, dtype=jnp.bfloat16)
        fn = functools.partial(chunk_gated_delta_rule_pallas, chunk_size=32, interpret=self.INTERPRET,
                               backend="gpu", prepare_impl="pallas")
        args = [x[n] for n in ("q", "k", "v", "g", "beta")]
        o, s = jax.jit(lambda *a: fn(*a, initial_state=x["h0"], output_final_state=True, segment_ids=x["seg"]))(*args)
        with jax.enable_x64(True):
            want_o, want_s = fused_recurrent_gated_delta_rule(
                *(a.astype(jnp.float64) for a in args), initial_state=x["h0"].astype(jnp.float64),
                output_final_state=True, segment_ids=x["seg"])
        errors = {"o": rel_rms(o.astype(jnp.float32), want_o), "final_state": rel_rms(s, want_s)}
        assert all(np.isfinite(e) and e <= TOL[jnp.bfloat16] for e in errors.values()), errors


@pytest.mark.gpu
class TestPallasGPU(TestPallasInterpret):
    """The same checks compiled for the GPU (Triton): a grid of shapes (test_compiled) in
    place of the interpret-mode cases, which the GPU backend's checks below repeat once."""

    INTERPRET = False

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize(
        "t,chunk,use_h0,use_seg",
        [(1, 16, True, True), (63, 32, False, False), (77, 64, True, True), (130, 16, True, False),
         (1000, 32, False, True), (1000, 64, True, True)],
    )
    def test_compiled(self, dtype, t, chunk, use_h0, use_seg):
        self._check("gpu", t, chunk, use_h0, use_seg, dtype=dtype, dims=(32, 64), prepare_impls=("xla", "pallas"))

    @pytest.mark.parametrize("backend", ["gpu"])
    @pytest.mark.parametrize("t,chunk,use_h0,use_seg", TestPallasInterpret.CASES)
    def test_matches_reference(self, backend, t, chunk, use_h0, use_seg):
        self._check(backend, t, chunk, use_h0, use_seg)

    @pytest.mark.parametrize("backend", ["gpu"])
    def test_widest_head_dims(self, backend):
        self._check(backend, 300, 64, True, True, dims=(256, 512))


# ------------------------------------------------- chunk-local Pallas GPU kernels
def _prepare_and_vjp(fn, x, use_seg, chunk):
    """fn's Chunked outputs and the VJP of random cotangents w.r.t. q, k, v, g, beta (jitted)."""
    dk = x["q"].shape[-1]
    kw = dict(scale=dk**-0.5, segment_ids=x["seg"] if use_seg else None, chunk_size=chunk)
    args = tuple(x[n] for n in ("q", "k", "v", "g", "beta"))
    shapes = jax.eval_shape(lambda *a: xla_prepare(*a, **kw), *args)
    keys = jax.random.split(jax.random.key(11), len(shapes))
    cts = type(shapes)(*(jax.random.normal(kk, s.shape).astype(s.dtype) for kk, s in zip(keys, shapes)))

    def run(args, cts):
        out, vjp = jax.vjp(lambda *a: fn(*a, **kw), *args)
        return out, vjp(cts)

    return jax.jit(run)(args, cts)


class TestPreparePallas:
    """gpu_chunk_local.prepare (the chunk-local kernels) vs xla.prepare: all six outputs,
    and the custom VJP vs autodiff of xla.prepare, in interpret mode on CPU: two cases by
    default, more under -m slow."""

    INTERPRET = True
    # (T, chunk, K, segments, dtype)
    CASES = [(63, 16, 64, True, jnp.float32), (130, 64, 128, False, jnp.bfloat16)]
    SLOW_CASES = [
        (1, 32, 64, True, jnp.float32),
        (1, 16, 128, False, jnp.bfloat16), (63, 32, 128, True, jnp.float32), (63, 64, 64, False, jnp.bfloat16),
        (130, 16, 64, False, jnp.float32), (130, 32, 64, True, jnp.bfloat16), (130, 64, 64, True, jnp.float32),
        (130, 64, 128, True, jnp.bfloat16), (63, 16, 128, False, jnp.float32),
    ]
    ALL_CASES = CASES + [pytest.param(*case, marks=pytest.mark.slow) for case in SLOW_CASES]

    def _check(self, t, chunk, dk, use_seg, dtype):
        x = make_inputs(t + chunk + dk, 2, t, 2, dk, dk // 2, dtype=dtype, n_segments_hint=0.05)
        fn = functools.partial(gpu_chunk_local.prepare, interpret=self.INTERPRET)
        (out, grads), (out_r, grads_r) = (_prepare_and_vjp(f, x, use_seg, chunk) for f in (fn, xla_prepare))
        errors = {n: rel_rms(a.astype(jnp.float32), b.astype(jnp.float32))
                  for n, a, b in zip(out_r._fields, out, out_r)}
        errors.update({f"d{n}": rel_rms(a.astype(jnp.float32), b.astype(jnp.float32))
                       for n, a, b in zip(("q", "k", "v", "g", "beta"), grads, grads_r)})
        for name, err in errors.items():
            assert np.isfinite(err) and err <= TOL[dtype], f"T={t} C={chunk} K={dk} seg={use_seg}: {name} {errors}"

    @pytest.mark.parametrize("t,chunk,dk,use_seg,dtype", ALL_CASES)
    def test_matches_xla_prepare(self, t, chunk, dk, use_seg, dtype):
        self._check(t, chunk, dk, use_seg, dtype)

    @staticmethod
    def _hard_chunk(d, dtype=jnp.float32):
        """One 64-token chunk with unit decay, beta = 1 and keys that nearly repeat, which
        make I + L far from the identity: (q, k, v, g, beta) and prepare's keywords."""
        x = make_inputs(3, 1, 64, 1, d, d)
        k = jax.random.normal(jax.random.key(4), (d,)) + 0.3 * x["k"]
        x.update(k=k / jnp.linalg.norm(k, axis=-1, keepdims=True), g=jnp.zeros_like(x["g"]),
                 beta=jnp.ones_like(x["beta"]))
        args = [x[n].astype(dtype) for n in ("q", "k", "v", "g", "beta")]
        return args, dict(scale=d**-0.5, segment_ids=None, chunk_size=64)

    def test_inverse_is_exact_on_a_hard_chunk(self):
        """On the hard chunk, w and u match the float64 triangular solve of xla.prepare to
        float32 accuracy."""
        args, kw = self._hard_chunk(16)
        got = gpu_chunk_local.prepare(*args, interpret=self.INTERPRET, **kw)
        with jax.enable_x64(True):
            want = xla_prepare(*(a.astype(jnp.float64) for a in args), **kw)
        assert rel_rms(got.w, want.w) < 1e-4 and rel_rms(got.u, want.u) < 1e-4

    def test_bf16_inverse_on_a_hard_chunk(self):
        """With bf16 inputs the solve's dots may be TF32 (on GPU): w and u on the hard chunk
        stay within twice the error of xla.prepare, which inverts exactly and then rounds."""
        args, kw = self._hard_chunk(64, jnp.bfloat16)
        got = gpu_chunk_local.prepare(*args, interpret=self.INTERPRET, **kw)
        rounded = xla_prepare(*args, **kw)
        with jax.enable_x64(True):
            want = xla_prepare(*(a.astype(jnp.float64) for a in args), **kw)
        for name in ("w", "u"):
            err, err_rounded = (rel_rms(getattr(r, name).astype(jnp.float32), getattr(want, name))
                                for r in (got, rounded))
            assert err <= 2 * err_rounded, f"{name}: {err} vs exact-then-rounded {err_rounded}"


@pytest.mark.gpu
class TestPreparePallasGPU(TestPreparePallas):
    """The same checks compiled for the GPU (Triton), every case (none is slow there)."""

    INTERPRET = False

    @pytest.mark.parametrize("t,chunk,dk,use_seg,dtype", TestPreparePallas.CASES + TestPreparePallas.SLOW_CASES)
    def test_matches_xla_prepare(self, t, chunk, dk, use_seg, dtype):
        self._check(t, chunk, dk, use_seg, dtype)


# --------------------------------------------------------------------- lowering
def _export_grad(backend, platform, dtype, dk=128, dv=128, use_seg=False, value=False, prepare_impl="xla",
                 block_sizes=None):
    """Export (loss and) gradients of the Pallas form on ShapeDtypeStructs, lowered for `platform`."""
    b, t, h = 1, 200, 2

    def grads(q, k, v, g, beta, h0, seg):
        def loss(*a):
            o, s = chunk_gated_delta_rule_pallas(*a[:5], initial_state=a[5], output_final_state=True,
                                                 segment_ids=seg if use_seg else None, chunk_size=64,
                                                 interpret=False, backend=backend, prepare_impl=prepare_impl,
                                                 block_sizes=block_sizes)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return (jax.value_and_grad if value else jax.grad)(loss, argnums=tuple(range(6)))(q, k, v, g, beta, h0)

    shapes = [(b, t, h, dk), (b, t, h, dk), (b, t, h, dv), (b, t, h), (b, t, h)]
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    args += [jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.int32)]
    disabled = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if backend == "gpu" else []
    return jax.export.export(jax.jit(grads), platforms=(platform,), disabled_checks=disabled)(*args)


@pytest.mark.parametrize("dtype,dk,dv", [(jnp.bfloat16, 128, 128), (jnp.float32, 128, 128), (jnp.bfloat16, 256, 512)])
def test_tpu_kernels_lower_with_mosaic(dtype, dk, dv):
    exported = _export_grad("tpu", "tpu", dtype, dk=dk, dv=dv)
    # Under grad the primal forward kernel is dead code; the recompute forward and the backward remain.
    assert exported.mlir_module().count("tpu_custom_call") >= 2


def _gpu_warps(bs: BlockSizes, width: int) -> dict:
    """{kernel name: num_warps} of the fused GPU op's kernels at head width max(K, V)."""
    return {"gdn_aqk_qg": bs.aqk_qg_warps, "gdn_wy": bs.wy_warps, "gdn_output": bs.output_warps,
            "gdn_prepare_bwd": bs.prepare_bwd_warps_at(width), "gdn_recurrence_states": bs.walk_warps,
            "gdn_recurrence_bwd": bs.walk_warps, "gdn_recurrence_grads": bs.grads_warps}


GPU_KERNELS = tuple(_gpu_warps(BlockSizes(), 64))


@pytest.mark.parametrize("dtype,dk,dv,use_seg", [(jnp.bfloat16, 128, 128, True), (jnp.float32, 64, 32, False),
                                                (jnp.bfloat16, 256, 512, False)])
def test_gpu_kernels_lower_with_triton(dtype, dk, dv, use_seg):
    """All seven GDN GPU kernels of the op (the chunk-local ones: aqk and qg, T, w, u and kg, the
    output from the states, and their reverse; the recurrence's state walk, its reverse walk
    and its parallel gradients) lower to Triton for CUDA on this CPU-only machine."""
    module = _export_grad("gpu", "cuda", dtype, dk=dk, dv=dv, use_seg=use_seg, value=True,
                          prepare_impl="pallas").mlir_module()
    assert module.count("__gpu$xla.gpu.triton") >= 8  # the backward pass recomputes the states
    for name in GPU_KERNELS:
        assert f'name = "{name}"' in module, name


@pytest.mark.parametrize("dk,dv,expect_prepare_kernels", [(64, 64, True), (128, 128, True), (256, 512, False)])
def test_gpu_default_prepare_by_head_width(dk, dv, expect_prepare_kernels):
    """On GPU the chunk-local part runs in the gpu_chunk_local kernels up to K, V = 128, in XLA above
    (where the outputs come from the recurrence's own kernel, from XLA's aqk and qg)."""
    module = _export_grad("gpu", "cuda", jnp.bfloat16, dk=dk, dv=dv, value=True, prepare_impl=None).mlir_module()
    assert ('name = "gdn_aqk_qg"' in module) == expect_prepare_kernels
    assert ('name = "gdn_recurrence_output"' in module) != expect_prepare_kernels
    assert 'name = "gdn_recurrence_states"' in module


def test_block_sizes_reach_the_gpu_kernels():
    """A BlockSizes value given to the op sets each kernel's launch parameters (the
    default's, and another's), and the walks' V block (their grid)."""
    changed = BlockSizes(aqk_qg_warps=8, wy_warps=4, output_warps=2, prepare_bwd_warps=2, walk_warps=8,
                         grads_warps=8, walk_block_v=32)
    for bs in (BlockSizes(), changed):
        module = _export_grad("gpu", "cuda", jnp.bfloat16, dk=64, dv=64, value=True, prepare_impl="pallas",
                              block_sizes=None if bs == BlockSizes() else bs).mlir_module()
        want = {name: (warps, 1) for name, warps in _gpu_warps(bs, 64).items()}
        assert launch_params(module) == want
    walks = [line for line in module.splitlines() if 'name = "gdn_recurrence_states"' in line]
    grids = {re.search(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32", line).groups() for line in walks}
    assert grids == {("2", "2")}  # (B * H, V / walk_block_v)


def test_resources_tool_keeps_every_gpu_kernel():
    """`python -m tools.bench resources` (registers and spills of each kernel, compiled
    offline) gets every GDN GPU kernel's Triton IR and launch parameters out of the Pallas
    lowering."""
    from tools.bench import resources as tool

    kernels = tool.lowered_kernels("gdn", 64, 64, jnp.bfloat16)
    assert sorted(kernels) == sorted(GPU_KERNELS)
    for name, (ir, warps, stages) in kernels.items():
        assert f"tt.func public @{name}" in ir, name
        assert warps == _gpu_warps(BlockSizes(), 64)[name], name
        assert stages == 1, name


@pytest.mark.parametrize("bh,dv", [(32, 64), (128, 64), (64, 64), (16, 128), (1, 512), (2, 48), (3, 20)])
def test_gpu_walk_block_is_widest_that_fills_the_gpu(bh, dv):
    """The walks' default V block divides V, and is the widest power-of-two fraction of V
    (down to 16) with at least BlockSizes.walk_programs programs, or 16 when none has that many."""
    from pallas_kernels.gated_delta_rule.gpu_recurrence import walk_block_v

    bs = BlockSizes()
    bv = walk_block_v(dv, bh, bs)
    candidates = [dv // 2**i for i in range(8) if dv % 2**i == 0 and dv // 2**i >= 16] or [dv]
    enough = [c for c in candidates if bh * (dv // c) >= bs.walk_programs]
    assert dv % bv == 0
    assert bv == (max(enough) if enough else min(candidates)), (bh, dv, bv)
    assert walk_block_v(dv, bh, BlockSizes(walk_block_v=dv)) == dv  # an explicit block wins


@pytest.mark.parametrize("c", [1, 3, 16, 63, 64])
def test_unit_lower_inverse_matches_numpy_float64(c):
    """The doubling inverse inside xla.prepare is exact (float64), any C (padded inside)."""
    from pallas_kernels.gated_delta_rule.xla import unit_lower_inverse

    rng = np.random.default_rng(c)
    a = np.tril(rng.normal(size=(2, 3, c, c)) * 0.3, -1) + np.eye(c)
    with jax.enable_x64(True):
        got = np.asarray(unit_lower_inverse(jnp.asarray(a)))
    np.testing.assert_allclose(got, np.linalg.inv(a), rtol=0, atol=1e-12)


def test_solve_unit_lower_vjp_matches_numpy_float64():
    """solve_unit_lower's closed-form VJP (dR = T^T dX, dL = -dR X^T on the strictly lower
    part) against the derivative of X = (I + L)^-1 R by numpy's inverse, float64."""
    from pallas_kernels.gated_delta_rule.xla import solve_unit_lower

    rng = np.random.default_rng(0)
    c, d = 13, 5
    lower = np.tril(rng.normal(size=(2, c, c)) * 0.3, -1)
    rhs, dx = rng.normal(size=(2, c, d)), rng.normal(size=(2, c, d))
    with jax.enable_x64(True):
        x, vjp = jax.vjp(lambda lo, r: solve_unit_lower(lo, r, jnp.float64), jnp.asarray(lower), jnp.asarray(rhs))
        dlower, drhs = (np.asarray(a) for a in vjp(jnp.asarray(dx)))
    inv = np.linalg.inv(np.eye(c) + lower)
    np.testing.assert_allclose(np.asarray(x), inv @ rhs, atol=1e-12)
    want_drhs = np.swapaxes(inv, -1, -2) @ dx
    np.testing.assert_allclose(drhs, want_drhs, atol=1e-12)
    # d/dL of <dX, (I + L)^-1 R> = -T^T dX X^T, of which only the strictly lower part exists
    np.testing.assert_allclose(dlower, np.tril(-want_drhs @ np.swapaxes(inv @ rhs, -1, -2), -1), atol=1e-12)
