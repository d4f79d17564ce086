"""Mamba2 and Gated DeltaNet blocks, and their initialisation from attention.

Ground truth is an independent per-step PyTorch float64 loop written here from the
published equations (Mamba2: Dao & Gu 2024 / HF Mamba2Mixer; GDN: Yang et al. 2024 /
flash-linear-attention's GatedDeltaNet layer), with the weights copied from our block.
Checked: the chunked (training) form, chunked prefill through the cache, one-token
decode, T not a multiple of the chunk, T = 1, packed segments == separate runs, and
for Mamba2 also transformers' own Mamba2Mixer. The blocks run in float32 against the
float64 references: a relative RMS error of 1e-5 is float32 round-off over these
short sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hylo_jax.config import GDNConfig, Mamba2Config, ModelConfig, default_gdn_config, default_mamba2_config
from hylo_jax.convert import linear_init, mapping
from hylo_jax.layers.gated_deltanet import GatedDeltaNet
from hylo_jax.layers.mamba2 import Mamba2
from hylo_jax.models.decoder import CausalLM
from kernel_utils import rel_rms

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-5
BATCH, T = 2, 37  # 37: not a multiple of the chunk (16)


def _config(qkv_bias=False, o_bias=False, **over) -> ModelConfig:
    base = dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        layer_types=("mamba2", "gdn"),
        mamba2=Mamba2Config(num_heads=4, head_dim=8, n_groups=2, state_size=6, chunk_size=16),
        gdn=GDNConfig(num_heads=4, head_k_dim=8, head_v_dim=12, chunk_size=16),
    )
    base.update(over)
    return ModelConfig(**base)


def _params(block) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(block, nnx.Param)))


def _randomize(block, seed: int):
    """Every parameter away from its init (biases non-zero, norm weights not one), so
    a misplaced or ignored parameter shows."""
    rng = np.random.default_rng(seed)
    state = nnx.state(block, nnx.Param)

    def fresh(v):
        v = np.asarray(v)
        if v.ndim == 2:
            return (rng.standard_normal(v.shape) / np.sqrt(v.shape[0])).astype(np.float32)
        return (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)

    pure = jax.tree.map(fresh, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(block, state)
    return block


@functools.lru_cache(maxsize=None)
def _block(kind: str, bias: bool = False):
    """One randomised block per kind (tests only read it; building one costs seconds)."""
    cls = {"mamba2": Mamba2, "gdn": GatedDeltaNet}[kind]
    return _randomize(cls(_config(qkv_bias=bias, o_bias=bias), rngs=nnx.Rngs(0)), 1)


# One compiled call per block and shape: op-by-op dispatch would compile every primitive.
_run = nnx.jit(lambda block, x, segment_ids=None, cache=None: block(x, None, segment_ids, cache))


def _inputs(seed=0, batch=BATCH, t=T, d=32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, t, d)), jnp.float32)


# ------------------------------------------------------- float64 references
def _t(a):
    if isinstance(a, torch.Tensor):  # already a (possibly grad-tracking) float64 tensor
        return a
    return torch.from_numpy(np.asarray(a, np.float64))


def _linear(p, x):
    y = x @ _t(p["kernel"])
    return y + _t(p["bias"]) if "bias" in p else y


def _conv_step(window_state, new, kernel, bias):
    """window_state [B, K-1, C] + new [B, C] -> (silu(conv), next window state)."""
    window = torch.cat([window_state, new[:, None]], dim=1)
    y = (window * _t(kernel)[None]).sum(1)
    if bias is not None:
        y = y + _t(bias)
    return F.silu(y), window[:, 1:]


def _resets(segment_ids, t):
    """bool [B]: the state restarts at step t (a new document begins)."""
    if segment_ids is None or t == 0:
        return None
    seg = np.asarray(segment_ids)
    return torch.from_numpy(seg[:, t] != seg[:, t - 1])


def mamba2_reference(p, cfg: Mamba2Config, x, segment_ids=None, conv=None, ssm=None):
    """Per-step Mamba2 in float64 -> (y [B,T,D], conv state [B,K-1,C], ssm state [B,H,P,N])."""
    h_, p_, g_, n_ = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size
    d_inner = h_ * p_
    conv_dim = d_inner + 2 * g_ * n_
    x = _t(x)
    b, t, _ = x.shape
    conv = torch.zeros(b, cfg.conv_kernel - 1, conv_dim, dtype=torch.float64) if conv is None else _t(conv)
    ssm = torch.zeros(b, h_, p_, n_, dtype=torch.float64) if ssm is None else _t(ssm)
    A = -torch.exp(_t(p["A_log"]))
    ys = []
    for step in range(t):
        reset = _resets(segment_ids, step)
        if reset is not None:
            conv = torch.where(reset[:, None, None], torch.zeros_like(conv), conv)
            ssm = torch.where(reset[:, None, None, None], torch.zeros_like(ssm), ssm)
        z, xbc, dt = torch.split(_linear(p["in_proj"], x[:, step]), [d_inner, conv_dim, h_], dim=-1)
        xbc, conv = _conv_step(conv, xbc, p["conv1d"]["kernel"], p["conv1d"]["bias"])
        xs, bs, cs = torch.split(xbc, [d_inner, g_ * n_, g_ * n_], dim=-1)
        xs, bs, cs = xs.view(b, h_, p_), bs.view(b, g_, n_), cs.view(b, g_, n_)
        dt = F.softplus(dt + _t(p["dt_bias"]))  # [B, H]
        group = torch.arange(h_) // (h_ // g_)  # head -> its B/C group
        bh, ch = bs[:, group], cs[:, group]  # [B, H, N]
        ssm = torch.exp(dt * A)[..., None, None] * ssm + dt[..., None, None] * xs[..., None] * bh[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", ssm, ch) + _t(p["D"])[:, None] * xs
        y = y.reshape(b, d_inner) * F.silu(z)  # gate before the norm
        yg = y.view(b, g_, d_inner // g_)
        yg = yg / torch.sqrt(yg.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        ys.append(_linear(p["out_proj"], yg.reshape(b, d_inner) * _t(p["norm"]["weight"])))
    return torch.stack(ys, 1), conv, ssm


def gdn_reference(p, cfg: GDNConfig, x, segment_ids=None, conv=None, state=None):
    """Per-step Gated DeltaNet in float64 -> (y [B,T,D], conv state, state [B,H,Dk,Dv])."""
    h_, dk, dv = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
    x = _t(x)
    b, t, _ = x.shape
    conv_dim = h_ * (2 * dk + dv)
    conv = torch.zeros(b, cfg.conv_kernel - 1, conv_dim, dtype=torch.float64) if conv is None else _t(conv)
    state = torch.zeros(b, h_, dk, dv, dtype=torch.float64) if state is None else _t(state)
    kernel = torch.cat([_t(p[f"{n}_conv1d"]["kernel"]) for n in "qkv"], dim=-1)
    eye = torch.eye(dk, dtype=torch.float64)
    ys = []
    for step in range(t):
        reset = _resets(segment_ids, step)
        if reset is not None:
            conv = torch.where(reset[:, None, None], torch.zeros_like(conv), conv)
            state = torch.where(reset[:, None, None, None], torch.zeros_like(state), state)
        u = x[:, step]
        qkv = torch.cat([_linear(p[f"{n}_proj"], u) for n in "qkv"], dim=-1)
        qkv, conv = _conv_step(conv, qkv, kernel, None)
        q, k, v = torch.split(qkv, [h_ * dk, h_ * dk, h_ * dv], dim=-1)
        q, k, v = q.view(b, h_, dk), k.view(b, h_, dk), v.view(b, h_, dv)
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        beta = torch.sigmoid(_linear(p["b_proj"], u))
        g = -torch.exp(_t(p["A_log"])) * F.softplus(_linear(p["a_proj"], u) + _t(p["dt_bias"]))
        kkt = k[..., :, None] * k[..., None, :]  # [B, H, Dk, Dk]
        state = torch.exp(g)[..., None, None] * ((eye - beta[..., None, None] * kkt) @ state) + (
            beta[..., None, None] * k[..., :, None] * v[..., None, :]
        )
        o = dk**-0.5 * torch.einsum("bhkv,bhk->bhv", state, q)
        gate = _linear(p["g_proj"], u).view(b, h_, dv)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * _t(p["o_norm"]["weight"]) * F.silu(gate)
        ys.append(_linear(p["o_proj"], o.reshape(b, h_ * dv)))
    return torch.stack(ys, 1), conv, state


def _state(kind, cache):
    return cache.ssm if kind == "mamba2" else cache.state


def _reference(kind, block, x, segment_ids=None, cache=None, params=None):
    """(y, conv state, recurrent state) of the float64 reference as numpy arrays
    (as torch tensors when `params` holds grad-tracking tensors)."""
    p = _params(block) if params is None else params
    fn = mamba2_reference if kind == "mamba2" else gdn_reference
    states = () if cache is None else (cache.conv, _state(kind, cache))
    out = fn(p, block.cfg, x, segment_ids, *states)
    return out if params is not None else tuple(o.numpy() for o in out)


KINDS = ["mamba2", "gdn"]


# ------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "qkv_o_bias"])
def test_full_sequence_matches_float64_reference(kind, bias):
    block = _block(kind, bias)
    x = _inputs()
    y, cache = _run(block, x)
    assert cache is None and y.shape == x.shape and y.dtype == jnp.float32
    y_ref, _, _ = _reference(kind, block, x)
    assert rel_rms(y, y_ref) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_and_decode_match_reference(kind):
    """Prefill in uneven chunks (incl. a 1-token one) then decode token by token,
    starting from a non-zero cache: every output and the final cache agree with the
    per-step reference."""
    block = _block(kind)
    x = _inputs(seed=4)
    rng = np.random.default_rng(5)
    cache = block.init_cache(BATCH, 64)
    cache = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), cache)
    y_ref, conv_ref, state_ref = _reference(kind, block, x, cache=cache)
    outs, start = [], 0
    for piece in (13, 1, 11) + (1,) * 12:
        y, cache = _run(block, x[:, start : start + piece], None, cache)
        outs.append(y)
        start += piece
    assert start == T
    assert rel_rms(jnp.concatenate(outs, axis=1), y_ref) < TOL
    assert rel_rms(cache.conv, conv_ref) < TOL
    assert rel_rms(_state(kind, cache), state_ref) < TOL
    assert _state(kind, cache).dtype == jnp.float32


@pytest.mark.parametrize("kind", KINDS)
def test_single_token(kind):
    """T = 1 without a cache (chunked path) and with a fresh cache (decode step)."""
    block = _block(kind)
    x = _inputs(seed=7, t=1)
    y_ref, conv_ref, state_ref = _reference(kind, block, x)
    y, _ = _run(block, x)
    assert rel_rms(y, y_ref) < TOL
    y, cache = _run(block, x, None, block.init_cache(BATCH, 8))
    assert rel_rms(y, y_ref) < TOL
    assert rel_rms(cache.conv, conv_ref) < TOL
    assert rel_rms(_state(kind, cache), state_ref) < TOL


# Lengths include a 1-token document and ones shorter than the conv window; the id 1
# comes back later in the row and must still start a new document.
SEGMENTS = [(1, 5), (2, 17), (1, 1), (3, 2), (4, 12)]


def _segment_ids(batch=BATCH):
    ids = np.concatenate([np.full(n, i) for i, n in SEGMENTS])
    return jnp.asarray(np.broadcast_to(ids, (batch, ids.size)), jnp.int32)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_segments_equal_separate_runs(kind):
    block = _block(kind)
    seg = _segment_ids()
    x = _inputs(seed=9, t=seg.shape[1])
    y, _ = _run(block, x, seg)
    # Every document on its own row, right-padded to the longest: the blocks are
    # causal, so the padding does not touch a document's outputs.
    longest = max(n for _, n in SEGMENTS)
    starts = np.cumsum([0] + [n for _, n in SEGMENTS])
    alone = jnp.concatenate(
        [jnp.pad(x[:, a : a + n], ((0, 0), (0, longest - n), (0, 0))) for a, (_, n) in zip(starts, SEGMENTS)]
    )
    y_alone, _ = _run(block, alone)
    for i, (a, (_, n)) in enumerate(zip(starts, SEGMENTS)):
        assert rel_rms(y[:, a : a + n], y_alone[i * BATCH : (i + 1) * BATCH, :n]) < TOL, f"segment at {a} leaks"
    y_ref, _, _ = _reference(kind, block, x, np.asarray(seg))
    assert rel_rms(y, y_ref) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_packed_prefill_cache_continues_last_segment(kind):
    """A cache filled from a packed chunk holds only the last document: decoding on
    from it equals running that document alone."""
    block = _block(kind)
    seg = _segment_ids()
    x = _inputs(seed=11, t=seg.shape[1] + 3)
    n_last = SEGMENTS[-1][1]
    _, cache = _run(block, x[:, : seg.shape[1]], seg, block.init_cache(BATCH, 64))
    for i in range(3):
        y, cache = _run(block, x[:, seg.shape[1] + i : seg.shape[1] + i + 1], None, cache)
    y_alone, cache_alone = _run(block, x[:, -(n_last + 3) :], None, block.init_cache(BATCH, 64))
    assert rel_rms(y, y_alone[:, -1:]) < TOL
    assert rel_rms(cache.conv, cache_alone.conv) < TOL
    assert rel_rms(_state(kind, cache), _state(kind, cache_alone)) < TOL


def test_mamba2_matches_transformers_mixer():
    """Our names and layouts are HF Mamba2's: its Mamba2Mixer with our weights (conv1d
    weight [C, 1, K] = our kernel [K, C] transposed) gives our output."""
    transformers = pytest.importorskip("transformers")
    block = _block("mamba2")
    cfg, m = _config(), block.cfg
    hf_cfg = transformers.Mamba2Config(
        hidden_size=cfg.hidden_size,
        num_heads=m.num_heads,
        head_dim=m.head_dim,
        n_groups=m.n_groups,
        state_size=m.state_size,
        expand=m.num_heads * m.head_dim // cfg.hidden_size,  # 1 here: d_inner == hidden
        conv_kernel=m.conv_kernel,
        chunk_size=m.chunk_size,
        layer_norm_epsilon=m.norm_eps,
        use_bias=False,
        use_conv_bias=True,
        num_hidden_layers=1,
    )
    mixer = transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(hf_cfg, layer_idx=0).eval()
    # The checkpoint rows of hylo_jax/convert/mapping.py give HF's names and layouts.
    flat = {mapping.path_str(k): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(block, nnx.Param))}
    hf_state = {
        row.hf.removeprefix("mixer."): row.transform.to_hf(flat[row.nnx.removeprefix("mixer.")])
        for row in mapping.MAMBA2_ROWS
        if row.when is None or row.when(cfg)
    }
    mixer.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf_state.items()}, strict=True)
    x = _inputs(seed=12)
    with torch.no_grad():
        y_hf = mixer(torch.from_numpy(np.array(x))).numpy()
    y, _ = _run(block, x)
    assert rel_rms(y, y_hf) < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_float64_reference(kind):
    """d(sum(y * w))/d(every parameter and the input) against torch autograd through
    the per-step reference."""
    block = _block(kind, True)
    x = _inputs(seed=16, t=21)
    w = np.random.default_rng(17).standard_normal(x.shape)

    loss = lambda blk, x: jnp.sum(blk(x, None)[0] * w)
    grads, grad_x = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(block, x)
    ref_params = jax.tree.map(lambda a: _t(a).clone().requires_grad_(True), _params(block))
    ref_x = _t(x).clone().requires_grad_(True)
    y_ref, _, _ = _reference(kind, block, ref_x, params=ref_params)
    (y_ref * _t(w)).sum().backward()
    assert rel_rms(grad_x, ref_x.grad.numpy()) < TOL
    flat_ref = {mapping.path_str(k): v.grad.numpy() for k, v in nnx.to_flat_state(nnx.State(ref_params))}
    flat = {mapping.path_str(k): g for k, g in nnx.to_flat_state(grads)}
    assert set(flat) == set(flat_ref)
    for name, g in flat.items():
        assert rel_rms(g, flat_ref[name]) < TOL, name


def test_bfloat16_blocks_track_float32():
    """bf16 compute (f32 accumulation, f32 recurrent state): full forward and prefill +
    decode stay within a few bf16 roundings (eps 2^-8) of float32."""
    for kind, cls in (("mamba2", Mamba2), ("gdn", GatedDeltaNet)):
        f32 = _block(kind)
        b16 = cls(_config(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
        state = nnx.state(b16, nnx.Param)
        nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(f32, nnx.Param)))
        nnx.update(b16, state)
        x = _inputs(seed=18)
        y32, _ = _run(f32, x)
        y16, _ = _run(b16, x.astype(jnp.bfloat16))
        assert y16.dtype == jnp.bfloat16 and rel_rms(y16, y32) < 2e-2
        y, cache = _run(b16, x[:, :36].astype(jnp.bfloat16), None, b16.init_cache(BATCH, 64))
        y1, cache = _run(b16, x[:, 36:].astype(jnp.bfloat16), None, cache)
        assert rel_rms(jnp.concatenate([y, y1], axis=1), y32) < 2e-2
        assert cache.conv.dtype == jnp.bfloat16 and _state(kind, cache).dtype == jnp.float32


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "qkv_o_bias"])
def test_mapping_rows_cover_hybrid_model(bias):
    """Every parameter of a Mamba2 + GDN model has exactly one checkpoint row, and the
    conv1d layout change round-trips."""
    cfg = _config(qkv_bias=bias, o_bias=bias)
    model = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
    paths = [mapping.path_str(k) for k, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    table = mapping.param_table(cfg)
    mapping.check_against_model(table, paths)
    assert "model.layers.0.mixer.conv1d.weight" in table and "model.layers.1.linear_attn.q_conv1d.weight" in table
    w = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)  # [K, C]
    assert mapping.CONV1D.to_hf(w).shape == (6, 1, 4)
    np.testing.assert_array_equal(mapping.CONV1D.to_nnx(mapping.CONV1D.to_hf(w)), w)


def test_hybrid_model_decode_matches_full_forward():
    """A Mamba2 + GDN CausalLM: prefill + one-token steps give the full forward's logits."""
    model = CausalLM(_config(), rngs=nnx.Rngs(0))
    _randomize(model, 2)
    ids = jnp.asarray(np.random.default_rng(15).integers(0, 64, (BATCH, 21)), jnp.int32)
    full = nnx.jit(lambda m, i: m(i))(model, ids)
    step = nnx.jit(lambda m, i, pos, c: m.step(i, pos, c))
    pos = jnp.broadcast_to(jnp.arange(21, dtype=jnp.int32), (BATCH, 21))
    logits, cache = step(model, ids[:, :17], pos[:, :17], model.init_cache(BATCH, 32))
    outs = [logits]
    for i in range(17, 21):
        logits, cache = step(model, ids[:, i : i + 1], pos[:, i : i + 1], cache)
        outs.append(logits)
    assert rel_rms(jnp.concatenate(outs, axis=1), full) < TOL


# ------------------------------------------------------------- linear init
def _teacher_attention(cfg: ModelConfig, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    d, hq, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shapes = {"q_proj": (d, hq * hd), "k_proj": (d, hkv * hd), "v_proj": (d, hkv * hd), "o_proj": (hq * hd, d)}
    params = {}
    for name, shape in shapes.items():
        params[name] = {"kernel": jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)}
        if (cfg.o_bias if name == "o_proj" else cfg.qkv_bias):
            params[name]["bias"] = jnp.asarray(rng.standard_normal(shape[1]), jnp.float32)
    return params


def _teacher_config(**over) -> ModelConfig:
    return _config(layer_types=("attention", "attention"), mamba2=None, gdn=None, **over)


def _check_repeated(student_w, teacher_w, heads=4, kv_heads=2, head_dim=8):
    """Query head h of the student holds KV head h // (H / Hkv) of the teacher (HF repeat_kv)."""
    for qh in range(heads):
        kv = qh // (heads // kv_heads)
        np.testing.assert_array_equal(
            student_w[..., qh * head_dim : (qh + 1) * head_dim],
            teacher_w[..., kv * head_dim : (kv + 1) * head_dim],
        )


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "qkv_o_bias"])
def test_init_mamba2_from_attention(bias):
    teacher_cfg = _teacher_config(qkv_bias=bias, o_bias=bias)
    teacher = _teacher_attention(teacher_cfg)
    mcfg = default_mamba2_config(teacher_cfg, chunk_size=16)
    assert (mcfg.num_heads, mcfg.head_dim, mcfg.n_groups, mcfg.state_size) == (4, 8, 4, 8)
    cfg = teacher_cfg.replace(layer_types=("mamba2", "attention"), mamba2=mcfg)
    params = linear_init.init_mamba2_from_attention(teacher, cfg, key=jax.random.key(0))
    d_inner = 32
    parts = ["kernel", "bias"] if bias else ["kernel"]
    for part in parts:
        w = np.asarray(params["in_proj"][part])
        assert w.shape[-1] == 2 * d_inner + 2 * d_inner + 4
        x_w, b_w, c_w = (w[..., (i + 1) * d_inner : (i + 2) * d_inner] for i in range(3))
        _check_repeated(x_w, np.asarray(teacher["v_proj"][part]))
        _check_repeated(b_w, np.asarray(teacher["k_proj"][part]))
        np.testing.assert_array_equal(c_w, teacher["q_proj"][part])
        np.testing.assert_array_equal(params["out_proj"][part], teacher["o_proj"][part])
    if bias:  # z and dt rows keep their zero default bias
        w = np.asarray(params["in_proj"]["bias"])
        assert not w[:d_inner].any() and not w[-4:].any()
    a = np.exp(np.asarray(params["A_log"]))
    assert np.all((a >= 1) & (a <= 16))
    dt = np.asarray(jax.nn.softplus(params["dt_bias"]))
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))
    np.testing.assert_array_equal(params["D"], 1.0)
    # The initialised block loads and runs.
    block = Mamba2(cfg, rngs=nnx.Rngs(1))
    state = nnx.state(block, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(block, state)
    np.testing.assert_array_equal(block.in_proj.kernel[...], params["in_proj"]["kernel"])
    y, _ = _run(block, _inputs(seed=13))
    assert y.shape == (BATCH, T, 32) and np.all(np.isfinite(y)) and float(jnp.abs(y).max()) > 0


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "qkv_o_bias"])
def test_init_gdn_from_attention(bias):
    teacher_cfg = _teacher_config(qkv_bias=bias, o_bias=bias)
    teacher = _teacher_attention(teacher_cfg, seed=1)
    gcfg = default_gdn_config(teacher_cfg, chunk_size=16)
    assert (gcfg.num_heads, gcfg.head_k_dim, gcfg.head_v_dim) == (4, 8, 8)
    cfg = teacher_cfg.replace(layer_types=("gdn", "attention"), gdn=gcfg)
    params = linear_init.init_gdn_from_attention(teacher, cfg, key=jax.random.key(0))
    for part in ["kernel", "bias"] if bias else ["kernel"]:
        np.testing.assert_array_equal(params["q_proj"][part], teacher["q_proj"][part])
        _check_repeated(np.asarray(params["k_proj"][part]), np.asarray(teacher["k_proj"][part]))
        _check_repeated(np.asarray(params["v_proj"][part]), np.asarray(teacher["v_proj"][part]))
        np.testing.assert_array_equal(params["o_proj"][part], teacher["o_proj"][part])
    a = np.exp(np.asarray(params["A_log"]))
    assert np.all((a >= 1) & (a <= 16))
    block = GatedDeltaNet(cfg, rngs=nnx.Rngs(1))
    state = nnx.state(block, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(block, state)
    y, _ = _run(block, _inputs(seed=14))
    assert y.shape == (BATCH, T, 32) and np.all(np.isfinite(y)) and float(jnp.abs(y).max()) > 0


def test_init_rejects_sizes_that_do_not_fit_the_teacher():
    teacher_cfg = _teacher_config()
    teacher = _teacher_attention(teacher_cfg)
    bad = teacher_cfg.replace(
        layer_types=("mamba2", "attention"), mamba2=default_mamba2_config(teacher_cfg, state_size=4)
    )
    with pytest.raises(ValueError, match="state_size=4"):
        linear_init.init_mamba2_from_attention(teacher, bad, key=jax.random.key(0))
    good = teacher_cfg.replace(layer_types=("gdn", "attention"), gdn=default_gdn_config(teacher_cfg))
    wrong = dict(teacher, k_proj={"kernel": teacher["k_proj"]["kernel"][:, :8]})
    with pytest.raises(ValueError, match="k_proj.kernel has shape"):
        linear_init.init_gdn_from_attention(wrong, good, key=jax.random.key(0))


def test_init_folds_qwen3_qk_norm_weights():
    teacher_cfg = _teacher_config(model_type="qwen3", qk_norm=True)
    teacher = _teacher_attention(teacher_cfg, seed=2)
    rng = np.random.default_rng(3)
    for norm in ("q_norm", "k_norm"):
        teacher[norm] = {"weight": jnp.asarray(1 + 0.3 * rng.standard_normal(8), jnp.float32)}
    cfg = teacher_cfg.replace(layer_types=("gdn", "attention"), gdn=default_gdn_config(teacher_cfg))
    params = linear_init.init_gdn_from_attention(teacher, cfg, key=jax.random.key(0))
    q_scale = np.tile(np.asarray(teacher["q_norm"]["weight"]), 4)
    k_scale = np.tile(np.asarray(teacher["k_norm"]["weight"]), 2)
    np.testing.assert_allclose(params["q_proj"]["kernel"], np.asarray(teacher["q_proj"]["kernel"]) * q_scale)
    _check_repeated(np.asarray(params["k_proj"]["kernel"]), np.asarray(teacher["k_proj"]["kernel"]) * k_scale)
