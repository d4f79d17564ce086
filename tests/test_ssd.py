"""SSD (Mamba2) kernels against the per-step float64 reference: outputs, final state and
the gradient of every input, at awkward lengths, chunk sizes, groups, initial states and
packed segments. Pallas kernels run in interpret mode on CPU; GPU tests are marked."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import launch_params, rel_rms
from pallas_kernels.ssd import BlockSizes, ssd, ssd_pallas, ssd_reference, ssd_step, ssd_xla

ARG_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state")


def make_inputs(b, t, h, p, g, n, *, seed=0, init=True, seg=True):
    """Random inputs as float64 numpy arrays (cast per test), plus int segment ids."""
    rng = np.random.default_rng(seed)
    inputs = dict(
        x=rng.standard_normal((b, t, h, p)),
        dt=rng.standard_normal((b, t, h)) - 1.0,
        A=-np.exp(rng.uniform(-1.0, 1.0, (h,))),
        B=rng.standard_normal((b, t, g, n)) / np.sqrt(n),
        C=rng.standard_normal((b, t, g, n)),
        D=rng.standard_normal((h,)),
        dt_bias=0.5 * rng.standard_normal((h,)),
        initial_state=rng.standard_normal((b, h, p, n)) if init else None,
    )
    # Ids that come back (0 1 2 0 ...) so that only a change, not the value, restarts.
    ids = (np.cumsum(rng.random((b, t)) < 0.04, axis=1) % 3).astype(np.int32) if seg else None
    cot_y = rng.standard_normal((b, t, h, p))
    cot_state = rng.standard_normal((b, h, p, n))
    return inputs, ids, cot_y, cot_state


def loss_and_grads(fn, inputs, ids, cot_y, cot_state, dtype, **kw):
    """(y, final state, grads of <y, cot_y> + <state, cot_state> w.r.t. every input)."""
    names = [k for k in ARG_NAMES if inputs[k] is not None]
    cast = {k: jnp.asarray(inputs[k], dtype) for k in names}
    seg = None if ids is None else jnp.asarray(ids)

    def loss(args):
        x, dt, A, B, C = (args[k] for k in ARG_NAMES[:5])
        y, s = fn(x, dt, A, B, C, D=args["D"], dt_bias=args["dt_bias"], dt_softplus=True,
                  initial_state=args.get("initial_state"), output_final_state=True,
                  segment_ids=seg, **kw)
        total = jnp.sum(y.astype(jnp.float32 if dtype != jnp.float64 else dtype) * cot_y)
        return total + jnp.sum(s * cot_state), (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(cast)
    return y, s, grads


def rounded(inputs, dtype):
    """Inputs as the kernel under test sees them (rounded to its dtype), back in float64:
    the reference then measures the kernel's arithmetic, not the input quantisation."""
    return {k: None if v is None else np.asarray(jnp.asarray(v, dtype).astype(jnp.float64))
            for k, v in inputs.items()}


@functools.lru_cache(maxsize=None)
def reference_results(case, dtype_name="float32"):
    inputs, ids, cot_y, cot_state = make_inputs(*case[:6], init=case[6], seg=case[7])
    inputs = rounded(inputs, jnp.dtype(dtype_name))
    y, s, g = loss_and_grads(ssd_reference, inputs, ids, cot_y, cot_state, jnp.float64)
    return np.asarray(y), np.asarray(s), {k: np.asarray(v) for k, v in g.items()}


def check_against_reference(fn, case, dtype=jnp.float32, tol=5e-3, **kw):
    y_ref, s_ref, g_ref = reference_results(case, jnp.dtype(dtype).name)
    inputs, ids, cot_y, cot_state = make_inputs(*case[:6], init=case[6], seg=case[7])
    y, s, g = loss_and_grads(fn, inputs, ids, cot_y, cot_state, dtype, **kw)
    errors = {"y": rel_rms(y, y_ref), "final_state": rel_rms(s, s_ref)}
    errors.update({f"d{k}": rel_rms(g[k], g_ref[k]) for k in g_ref})
    bad = {k: v for k, v in errors.items() if not v <= tol}  # NaN fails too
    assert not bad, f"rel-RMS above {tol}: {bad} (all: {errors})"


# (batch, T, heads, head_dim P, groups G, state N, initial_state, segment_ids), chunk
CASES = [
    ((1, 1, 2, 4, 1, 8, True, False), 16),
    ((2, 63, 4, 8, 2, 16, True, True), 16),
    ((1, 77, 4, 8, 1, 16, False, True), 32),
    ((2, 130, 2, 8, 2, 8, True, False), 64),
    ((1, 1000, 2, 4, 1, 8, True, True), 64),
]


@pytest.mark.parametrize("case,chunk", CASES)
def test_xla_matches_reference(x64, case, chunk):
    check_against_reference(ssd_xla, case, chunk_size=chunk)


# More shapes for the chunk-parallel GPU kernels: neither initial state nor segments, and
# chunk 128 (two 64-row tiles per chunk).
GPU_CASES = CASES[:4] + [
    ((1, 130, 4, 16, 2, 32, False, False), 32),
    ((1, 300, 2, 16, 1, 32, True, True), 128),
]


@pytest.mark.parametrize("case,chunk", GPU_CASES)
def test_pallas_gpu_kernel_interpret(x64, case, chunk):
    check_against_reference(ssd_pallas, case, chunk_size=chunk, interpret=True, backend="gpu")


@pytest.mark.slow
@pytest.mark.parametrize("case,chunk", [GPU_CASES[1], GPU_CASES[5]])
def test_pallas_gpu_kernel_interpret_bf16(x64, case, chunk):
    check_against_reference(ssd_pallas, case, dtype=jnp.bfloat16, tol=2e-2, chunk_size=chunk,
                            interpret=True, backend="gpu")


@pytest.mark.parametrize("case,chunk,dtype", [
    (CASES[1][0], 32, jnp.float32),
    (CASES[3][0], 64, jnp.float32),
    (GPU_CASES[5][0], 128, jnp.bfloat16),
])
def test_pallas_gpu_kernel_interpret_tiles(x64, case, chunk, dtype):
    """Chunks of several 16-row tiles: the kernels' loops over the tiles of a chunk."""
    tol = 5e-3 if dtype == jnp.float32 else 2e-2
    check_against_reference(ssd_pallas, case, dtype=dtype, tol=tol, chunk_size=chunk,
                            interpret=True, backend="gpu", block_sizes=BlockSizes(tile=16))


def test_gpu_state_stages_interpret():
    """The state stages of the GPU path on their own: chunk_states (bf16 products, and the
    hi + lo split) against an einsum, state_pass both ways against a Python loop."""
    from pallas_kernels.ssd import gpu

    rng = np.random.default_rng(5)
    b, h, g, p, n, L, nc = 1, 4, 2, 16, 32, 32, 3
    v = jnp.asarray(rng.standard_normal((b, nc * L, h, p)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, nc * L, g, n)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0.0, 1.0, (b, h, nc * L)), jnp.float32)
    kh = jnp.repeat(k.astype(jnp.float32), h // g, axis=2).reshape(b, nc, L, h, n)
    vw = v.astype(jnp.float32) * jnp.swapaxes(w, 1, 2)[..., None]
    want = jnp.einsum("bclhp,bclhn->bhcpn", vw.reshape(b, nc, L, h, p), kh,
                      precision=jax.lax.Precision.HIGHEST)
    tiles = BlockSizes(tile=16)
    fine = gpu.chunk_states(v, k, w, chunk_size=L, block_sizes=tiles, fine=True, interpret=True)
    coarse = gpu.chunk_states(v, k, w, chunk_size=L, block_sizes=tiles, interpret=True)
    assert rel_rms(fine, want) < 1e-5 < rel_rms(coarse, want) < 5e-3

    s = jnp.asarray(rng.standard_normal((b, h, nc, p, n)), jnp.float32)
    carry = jnp.asarray(rng.uniform(0.0, 1.0, (b, h, nc)), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    for reverse in (False, True):
        met, final = gpu.state_pass(s, carry, h0, out_dtype=jnp.float32, reverse=reverse,
                                    interpret=True)
        state, want = h0, [None] * nc
        for c in (reversed(range(nc)) if reverse else range(nc)):
            want[c] = state
            state = carry[:, :, c, None, None] * state + s[:, :, c]
        assert rel_rms(met, jnp.stack(want, axis=2)) < 1e-6 and rel_rms(final, state) < 1e-6


@pytest.mark.slow
def test_pallas_gpu_kernel_interpret_long(x64):
    case, chunk = CASES[4]
    check_against_reference(ssd_pallas, case, chunk_size=chunk, interpret=True, backend="gpu")


def test_pallas_tpu_kernel_interpret(x64):
    check_against_reference(ssd_pallas, CASES[1][0], chunk_size=16, interpret=True, backend="tpu")


WIDEST = (1, 40, 2, 512, 1, 256, True, True)  # P = 512, N = 256: the widest heads of the contract


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_pallas_widest_head_dims_interpret(x64, backend):
    check_against_reference(ssd_pallas, WIDEST, chunk_size=16, interpret=True, backend=backend)


def test_bf16(x64):
    case = (1, 77, 4, 16, 2, 16, True, True)
    check_against_reference(ssd_xla, case, dtype=jnp.bfloat16, tol=2e-2, chunk_size=32)
    check_against_reference(ssd_pallas, case, dtype=jnp.bfloat16, tol=2e-2, chunk_size=32,
                            interpret=True, backend="gpu")


def test_bf16_decay_gradient_long_sequence(x64):
    """dA in bf16 over several chunks. The GPU kernels sum it per chunk from terms that do
    not cancel (7.4e-3 here); a reverse cumsum over the sequence of do.o - dv.v, with the
    backward's chunks misaligned, gave 8.6e-2, and the XLA autodiff form gives 1.4e-2."""
    check_against_reference(ssd_pallas, (1, 300, 2, 32, 1, 64, True, True), dtype=jnp.bfloat16,
                            tol=2e-2, chunk_size=64, interpret=True, backend="gpu")


def test_no_softplus_no_d_and_public_dispatch(x64):
    """dt used as given; D, dt_bias, initial state absent; impl= routes to each form."""
    rng = np.random.default_rng(1)
    b, t, h, p, g, n = 1, 45, 2, 4, 1, 8
    x = jnp.asarray(rng.standard_normal((b, t, h, p)))
    dt = jnp.asarray(rng.uniform(0.01, 0.5, (b, t, h)))
    A = jnp.asarray(-rng.uniform(0.5, 2.0, (h,)))
    B, C = (jnp.asarray(rng.standard_normal((b, t, g, n))) for _ in range(2))
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, output_final_state=True)
    for impl in ("xla", "reference", "auto"):
        y, s = ssd(x, dt, A, B, C, output_final_state=True, chunk_size=16, impl=impl)
        assert rel_rms(y, y_ref) < 1e-10 and rel_rms(s, s_ref) < 1e-10, impl
    y, s = ssd(*(z.astype(jnp.float32) for z in (x, dt, A, B, C)), output_final_state=True,
               chunk_size=16, impl="pallas", interpret=True)
    assert rel_rms(y, y_ref) < 5e-3 and rel_rms(s, s_ref) < 5e-3
    assert ssd(x, dt, A, B, C, impl="xla")[1] is None


def test_prefill_then_decode_steps(x64):
    """Chunked prefill of T tokens, then ssd_step token by token, equals one long reference."""
    inputs, ids, _, _ = make_inputs(2, 40, 4, 4, 2, 8, seed=3, seg=False)
    args = {k: jnp.asarray(v) for k, v in inputs.items()}
    kw = dict(D=args["D"], dt_bias=args["dt_bias"], dt_softplus=True)
    seq = [args[k] for k in ("x", "dt", "A", "B", "C")]
    y_ref, s_ref = ssd_reference(*seq, initial_state=args["initial_state"],
                                 output_final_state=True, **kw)
    cut = 33
    head = [z if z.ndim == 1 else z[:, :cut] for z in seq]
    y, state = ssd_xla(*head, initial_state=args["initial_state"], output_final_state=True,
                       chunk_size=16, **kw)
    ys = [y]
    for t in range(cut, 40):
        y_t, state = ssd_step(seq[0][:, t], seq[1][:, t], seq[2], seq[3][:, t], seq[4][:, t],
                              state, **kw)
        ys.append(y_t[:, None])
    assert rel_rms(jnp.concatenate(ys, axis=1), y_ref) < 1e-10
    assert rel_rms(state, s_ref) < 1e-10


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((1, 8, 4, 4))
    dt = jnp.zeros((1, 8, 4))
    A = -jnp.ones((4,))
    B = jnp.zeros((1, 8, 3, 8))
    with pytest.raises(ValueError, match="not a multiple of groups"):
        ssd(x, dt, A, B, B)
    B = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(ValueError, match="dt must be"):
        ssd(x, dt[:, :4], A, B, B)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd(x, dt, A, B, B, initial_state=jnp.zeros((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="impl must be"):
        ssd(x, dt, A, B, B, impl="cuda")
    with pytest.raises(ValueError, match="power of two"):
        ssd(x, dt, A, B, B, impl="pallas", chunk_size=24, interpret=True)


def _export_fwd_bwd(backend, platforms, seg, chunk=64, p=64, n=128, block_sizes=None):
    """MLIR of jit(value_and_grad) of the Pallas path, exported for `platforms` on this CPU."""
    b, t, h, g = 1, 130, 4, 2
    S = lambda *s, d=jnp.bfloat16: jax.ShapeDtypeStruct(s, d)
    f32 = jnp.float32

    def fwd_bwd(x, dt, A, B, C, h0, ids):
        def loss(x, dt, A, B, C, h0):
            y, s = ssd_pallas(x, dt, A, B, C, initial_state=h0, output_final_state=True,
                              segment_ids=ids if seg else None, chunk_size=chunk, interpret=False,
                              backend=backend, block_sizes=block_sizes)
            return jnp.sum(y.astype(f32)) + jnp.sum(s)
        return jax.value_and_grad(loss, argnums=range(6))(x, dt, A, B, C, h0)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=platforms, disabled_checks=checks)(
        S(b, t, h, p), S(b, t, h, d=f32), S(h, d=f32), S(b, t, g, n), S(b, t, g, n),
        S(b, h, p, n, d=f32), S(b, t, d=jnp.int32))
    return exported.mlir_module()


@pytest.mark.parametrize("seg,p,n", [(False, 64, 128), (True, 64, 128), (False, 512, 256)])
def test_tpu_kernel_lowers(seg, p, n):
    """The Mosaic TPU kernel (forward and the three backward runs) lowers for TPU on CPU."""
    assert "tpu_custom_call" in _export_fwd_bwd("tpu", ("tpu",), seg, p=p, n=n)


GPU_KERNELS = ("ssd_chunk_states", "ssd_state_pass", "ssd_state_pass_rev", "ssd_chunk_outputs",
               "ssd_chunk_grads")


@pytest.mark.parametrize("seg,chunk,p,n", [(True, 64, 64, 128), (False, 256, 64, 128), (False, 64, 512, 256)])
def test_gpu_kernels_lower(seg, chunk, p, n):
    """Each Triton kernel of the forward and backward lowers for CUDA on CPU (lowering to the
    Triton dialect happens in Python, so this catches Triton lowering errors early)."""
    mlir = _export_fwd_bwd("gpu", ("cuda",), seg, chunk, p=p, n=n)
    assert "xla.gpu.triton" in mlir
    missing = [k for k in GPU_KERNELS if k not in mlir]
    assert not missing, f"kernels not in the exported module: {missing}"


def test_block_sizes_reach_the_gpu_kernels():
    """A BlockSizes value given to ssd_pallas sets each kernel's warps and stages (the
    default's, and another's)."""
    changed = BlockSizes(states_warps=8, outputs_warps=8, outputs_stages=2, grads_warps=4, pass_warps=2,
                         pass_stages=1)
    for bs in (BlockSizes(), changed):
        mlir = _export_fwd_bwd("gpu", ("cuda",), False, block_sizes=None if bs == BlockSizes() else bs)
        params = lambda k: (getattr(bs, f"{k}_warps"), getattr(bs, f"{k}_stages"))
        assert launch_params(mlir) == {
            "ssd_chunk_states": params("states"), "ssd_chunk_outputs": params("outputs"),
            "ssd_chunk_grads": params("grads"), "ssd_state_pass": params("pass"), "ssd_state_pass_rev": params("pass")}


@pytest.mark.gpu
@pytest.mark.parametrize("case,chunk", CASES[1:] + [((2, 300, 4, 64, 2, 128, True, True), 64),
                                                    ((2, 600, 4, 64, 2, 128, True, True), 256)])
def test_pallas_gpu_compiled(x64, case, chunk):
    check_against_reference(ssd_pallas, case, chunk_size=chunk, interpret=False, backend="gpu")


@pytest.mark.gpu
def test_pallas_gpu_compiled_widest_head_dims(x64):
    check_against_reference(ssd_pallas, (1, 300, 2, 512, 1, 256, True, True), chunk_size=64, interpret=False,
                            backend="gpu")


@pytest.mark.gpu
def test_pallas_gpu_compiled_bf16(x64):
    for chunk in (64, 256):
        check_against_reference(ssd_pallas, (2, 300, 4, 64, 2, 128, True, True), dtype=jnp.bfloat16,
                                tol=2e-2, chunk_size=chunk, interpret=False, backend="gpu")
