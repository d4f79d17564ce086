"""CausalLM against transformers (float32, eager attention) on tiny random models.

Covers Llama 2 and Llama 3.2 style (llama3 RoPE, tied embeddings), Qwen2 (q/k/v
biases), Qwen3 (q/k norm) at GQA ratios 1, 2 and 4; packed segments; cached and
chunked decoding; greedy generation; RoPE scalings against ROPE_INIT_FUNCTIONS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from hylo_jax.config import ModelConfig  # noqa: E402
from hylo_jax.inference import generate, prefill  # noqa: E402
from hylo_jax.layers.rope import RoPE, apply_rope, compute_inv_freq, rope_pair_dims  # noqa: E402
from hylo_jax.models import CausalLM  # noqa: E402

VOCAB = 128
HIDDEN = 64
HEADS = 4


def _hf_model(family: str, kv_heads: int, seed: int = 0):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="eager",
    )
    if family == "llama2":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    elif family == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        cfg = transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)
    elif family == "qwen3_yarn":
        rope = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64}
        cfg = transformers.Qwen3Config(**common, head_dim=32, rope_parameters=rope, tie_word_embeddings=False)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.float().eval()
    # Non-trivial norm weights and biases, so that a skipped or misplaced one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _load_into(model: CausalLM, hf_model) -> None:
    """Minimal test-only loader: NNX path -> HF name, Linear kernels transposed."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    used = set()
    for path, var in flat:
        *prefix, leaf = (str(p) for p in path)
        name = ".".join(prefix + ["weight" if leaf in ("kernel", "embedding") else leaf])
        value = sd[name].T if leaf == "kernel" else sd[name]
        assert value.shape == var.shape, (name, value.shape, var.shape)
        var[...] = jnp.asarray(value, var.dtype)
        used.add(name)
    # Everything the checkpoint holds must land somewhere (tied lm_head is an alias).
    aliases = {"lm_head.weight"} if hf_model.config.tie_word_embeddings else set()
    missing = set(sd) - used - aliases
    assert not missing, missing


def _build(family: str, kv_heads: int):
    hf = _hf_model(family, kv_heads)
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    model = CausalLM(config, rngs=nnx.Rngs(0))
    _load_into(model, hf)
    return hf, config, model


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@nnx.jit
def _forward(model, ids, positions=None, segment_ids=None):
    return model(ids, positions, segment_ids)


def _ids(batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length)).astype(np.int32)


FAMILIES = ["llama2", "llama3", "qwen2", "qwen3"]


@pytest.mark.parametrize(
    "family, kv_heads",
    [(f, kv) for f in FAMILIES for kv in (4, 2, 1)] + [("qwen3_yarn", 2)],
    ids=[f"{f}-gqa{HEADS // kv}" for f in FAMILIES for kv in (4, 2, 1)] + ["qwen3_yarn-gqa2"],
)
def test_logits_match_transformers(family, kv_heads):
    hf, config, model = _build(family, kv_heads)
    assert config.num_attention_heads // config.num_key_value_heads == HEADS // kv_heads
    ids = _ids(2, 24)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    ours = _forward(model, jnp.asarray(ids))
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    assert _rel_err(ours, ref) <= 1e-4


def test_config_flags_reach_the_model():
    _, qwen2, _ = _build("qwen2", 2)
    _, qwen3, m3 = _build("qwen3", 2)
    _, llama3, m_l3 = _build("llama3", 2)
    assert qwen2.qkv_bias and not qwen2.o_bias
    assert qwen3.qk_norm and m3.model.layers[0].self_attn.q_norm is not None
    assert llama3.tie_word_embeddings and m_l3.lm_head is None
    assert dict(llama3.rope_scaling)["rope_type"] == "llama3"


def test_packed_segments_equal_separate_documents():
    hf, config, model = _build("qwen3", 2)
    lengths = [5, 11, 8]
    docs = [_ids(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    packed = jnp.asarray(np.concatenate(docs))[None]
    segment_ids = jnp.asarray(np.repeat(np.arange(len(docs)), lengths))[None]
    out = _forward(model, packed, None, segment_ids)
    lo = 0
    for doc in docs:
        alone = _forward(model, jnp.asarray(doc)[None])
        np.testing.assert_allclose(out[0, lo : lo + len(doc)], alone[0], rtol=0, atol=2e-5)
        lo += len(doc)
    # Query-chunked attention (chunks of 5 over 24 tokens) gives the same logits.
    for layer in model.model.layers:
        layer.self_attn.chunk_size = 5
    np.testing.assert_allclose(_forward(model, packed, None, segment_ids), out, rtol=0, atol=2e-5)


def test_cached_decoding_matches_full_forward():
    _, _, model = _build("llama3", 2)
    ids = jnp.asarray(_ids(2, 20, seed=3))
    full = _forward(model, ids)
    scale = float(jnp.max(jnp.abs(full)))

    # Token by token.
    cache = model.init_cache(2, 24)
    step = nnx.jit(lambda m, x, p, c: m.step(x, p, c))
    for t in range(ids.shape[1]):
        logits, cache = step(model, ids[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), cache)
        assert float(jnp.max(jnp.abs(logits[:, 0] - full[:, t]))) / scale <= 1e-5
    assert int(cache[0].index) == 20

    # Chunked prefill with uneven chunks (7 + 7 + 6): the last position's logits.
    cache = model.init_cache(2, 24)
    logits, cache = prefill(model, ids, cache, chunk_size=7)
    assert logits.shape == (2, VOCAB) and int(cache[0].index) == 20
    assert float(jnp.max(jnp.abs(logits - full[:, -1]))) / scale <= 1e-5


@pytest.mark.parametrize("family, prefill_chunk", [("llama2", None), ("qwen3", 3)])
def test_greedy_generation_matches_transformers(family, prefill_chunk):
    hf, _, model = _build(family, 2)
    prompt = _ids(2, 7, seed=5)
    with torch.no_grad():
        ref = hf.generate(
            torch.from_numpy(prompt.astype(np.int64)),
            attention_mask=torch.ones(prompt.shape, dtype=torch.int64),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    ours = generate(model, prompt, 16, prefill_chunk_size=prefill_chunk).tokens
    np.testing.assert_array_equal(ours, ref[:, prompt.shape[1] :])


def test_generation_pads_after_eos():
    _, _, model = _build("llama2", 2)
    prompt = _ids(1, 5, seed=1)
    free = generate(model, prompt, 8).tokens[0]
    eos = int(free[2])
    first = int(np.argmax(free == eos))  # first occurrence of that token
    out = generate(model, prompt, 8, eos_token_id=eos, pad_token_id=VOCAB - 1).tokens[0]
    np.testing.assert_array_equal(out[: first + 1], free[: first + 1])
    assert (out[first + 1 :] == VOCAB - 1).all()


# ------------------------------------------------------------------------ RoPE


def _hf_rope(rope_parameters: dict, head_dim: int = 64, max_pos: int = 4096):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters=dict(rope_parameters),
    )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")
    return inv_freq.numpy(), float(scaling), dict(cfg.rope_parameters)


# (rope_parameters, max_position_embeddings) pairs that transformers accepts silently.
ROPE_CASES = {
    "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 4096),
    "llama3": ({
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }, 131072),
    "yarn": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0, "original_max_position_embeddings": 2048}, 32768),
    "yarn_mscale": ({
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 0.707,
        "mscale_all_dim": 0.5,
    }, 16384),
    "yarn_no_truncate": ({
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 1024,
        "truncate": False,
    }, 8192),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scalings_match_transformers(case):
    rope_parameters, max_pos = ROPE_CASES[case]
    ref_inv, ref_scale, params = _hf_rope(rope_parameters, max_pos=max_pos)
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    inv, scale = compute_inv_freq(64, params["rope_theta"], scaling, max_pos)
    np.testing.assert_allclose(inv, ref_inv, rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    if case.startswith("yarn"):
        assert scale != 1.0
    # The same through a ModelConfig-style frozen tuple.
    rope = RoPE(64, params["rope_theta"], tuple(sorted(scaling.items())), max_pos)
    np.testing.assert_array_equal(rope.inv_freq, inv)


def test_rope_rejects_unknown_type_and_missing_keys():
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        compute_inv_freq(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="'llama3' needs 'low_freq_factor'"):
        compute_inv_freq(64, 10000.0, {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0})


def test_rope_pair_subset_equals_rotating_the_full_head():
    """Rotating the dims of a few pairs alone equals rotating the whole head and then
    picking those dims: the MLA RoPE key can be cut from the teacher's key."""
    head_dim, pairs = 32, (0, 3, 9, 15)
    full, sub = RoPE(head_dim, 10000.0), RoPE(head_dim, 10000.0, pairs=pairs)
    assert sub.rotary_dim == 2 * len(pairs)
    x = jax.random.normal(jax.random.key(0), (2, 6, 3, head_dim))
    positions = jnp.broadcast_to(jnp.arange(6) * 37, (2, 6))
    dims = rope_pair_dims(pairs, head_dim)
    np.testing.assert_array_equal(dims, [0, 3, 9, 15, 16, 19, 25, 31])
    rotated_full = apply_rope(x, *full(positions))[..., dims]
    rotated_sub = apply_rope(x[..., dims], *sub(positions))
    np.testing.assert_allclose(rotated_sub, rotated_full, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rotary pairs"):
        rope_pair_dims((3, 16), head_dim)


# ------------------------------------------------------------------- attention


def _naive_attention(q, k, v, segment_ids=None, q_offset=0):
    """float64 numpy reference: per head, per query, with explicit GQA head mapping."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b, t, h, v.shape[-1]))
    visible = np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None]  # [t, s]
    for bi in range(b):
        vis = visible
        if segment_ids is not None:
            vis = visible & (segment_ids[bi][:, None] == segment_ids[bi][None, :])
        for hi in range(h):
            kh = hi // (h // hkv)
            scores = np.where(vis, q[bi, :, hi] @ k[bi, :, kh].T / np.sqrt(d), -np.inf)
            p = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(axis=1, keepdims=True)) @ v[bi, :, kh]
    return out


def test_causal_attention_chunks_match_naive_reference():
    from hylo_jax.layers.attention import causal_attention

    causal_attention = jax.jit(causal_attention, static_argnames=("scale", "chunk_size"))

    b, t, h, hkv, d, dv = 2, 37, 4, 2, 8, 6
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k = jax.random.normal(keys[1], (b, t, hkv, d))
    v = jax.random.normal(keys[2], (b, t, hkv, dv))
    seg = np.repeat(np.array([[0, 1, 2], [5, 6, 6]]), [10, 20, 7], axis=1).astype(np.int32)
    for segment_ids in (None, seg):
        ref = _naive_attention(q, k, v, segment_ids)
        ids = None if segment_ids is None else jnp.asarray(segment_ids)
        for chunk in (None, 8, 16):
            out = causal_attention(q, k, v, scale=d**-0.5, segment_ids=ids, chunk_size=chunk)
            np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6, err_msg=f"chunk={chunk}")

    # Queries 30.. against a cache of 40 slots (the last 3 empty) in chunks of 3.
    offset = 30
    ref = _naive_attention(q[:, offset:], k, v, q_offset=offset)
    k_cache = jnp.pad(k, ((0, 0), (0, 3), (0, 0), (0, 0)))
    v_cache = jnp.pad(v, ((0, 0), (0, 3), (0, 0), (0, 0)), constant_values=9.0)
    out = causal_attention(q[:, offset:], k_cache, v_cache, scale=d**-0.5, cache_index=jnp.int32(offset), chunk_size=3)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)


def test_causal_attention_chunked_gradients_equal_unchunked():
    from hylo_jax.layers.attention import causal_attention

    b, t, h, d = 1, 29, 2, 8
    keys = jax.random.split(jax.random.key(2), 4)
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk in keys[:3])
    w = jax.random.normal(keys[3], (b, t, h, d))
    seg = jnp.asarray(np.repeat([[0, 1]], [12, 17], axis=1).astype(np.int32))

    def loss(q, k, v, chunk):
        return jnp.sum(w * causal_attention(q, k, v, scale=0.3, segment_ids=seg, chunk_size=chunk))

    full = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
    chunked = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, 8)
    for a, b_ in zip(full, chunked):
        np.testing.assert_allclose(a, b_, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        causal_attention(q, k, v, scale=0.3, segment_ids=seg, cache_index=jnp.int32(0))


def test_abstract_build_and_bfloat16_compute():
    """Built abstractly (no weights allocated), then filled; bf16 compute with f32
    params stays close to the f32 model and still returns float32 logits."""
    hf = _hf_model("qwen2", 2)
    config = ModelConfig.from_hf_config(hf.config.to_dict())
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    params = nnx.state(abstract, nnx.Param)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    names = {p[-1]: v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(params)}
    assert names["embedding"] == ("vocab", "embed") and names["weight"] == ("norm",)

    ref_model = CausalLM(config, rngs=nnx.Rngs(0))
    _load_into(ref_model, hf)
    graphdef, _ = nnx.split(abstract)
    model = nnx.merge(graphdef, nnx.state(ref_model))
    ids = jnp.asarray(_ids(2, 16))
    ours, ref = _forward(model, ids), _forward(ref_model, ids)
    assert ours.dtype == jnp.float32
    assert 0 < _rel_err(ours, ref) <= 3e-2


def test_bad_inputs_raise_clear_errors():
    _, _, model = _build("llama2", 2)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, time\]"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(TypeError, match="token ids must be integers"):
        model(jnp.zeros((1, 5), jnp.float32))
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model.model(jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), model.init_cache(1, 4))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, jnp.zeros((1, 3), jnp.int32), 0)


def _hybrid_model():
    from hylo_jax.config import GDNConfig, Mamba2Config, MLAConfig

    config = ModelConfig(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=("mla", "mamba2", "gdn", "attention"),
        mla=MLAConfig(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
        mamba2=Mamba2Config(num_heads=4, head_dim=16, n_groups=4, state_size=16, chunk_size=8),
        gdn=GDNConfig(num_heads=4, head_k_dim=16, head_v_dim=16, chunk_size=8),
    )
    return CausalLM(config, rngs=nnx.Rngs(0))


def test_hybrid_dispatch_and_caches():
    """One layer of each kind: attribute names follow the checkpoint names; cached
    decoding and chunked prefill equal the full forward."""
    model = _hybrid_model()
    layers = model.model.layers
    assert [layer.mixer_attr for layer in layers] == ["self_attn", "mixer", "linear_attn", "self_attn"]
    assert [type(layer.token_mixer).__name__ for layer in layers] == ["MLA", "Mamba2", "GatedDeltaNet", "Attention"]

    ids = jnp.asarray(_ids(2, 13, seed=7))
    full = _forward(model, ids)
    scale = float(jnp.max(jnp.abs(full)))
    cache = model.init_cache(2, 16)
    step = nnx.jit(lambda m, x, p, c: m.step(x, p, c))
    for t in range(ids.shape[1]):
        logits, cache = step(model, ids[:, t : t + 1], jnp.full((2, 1), t, jnp.int32), cache)
        assert float(jnp.max(jnp.abs(logits[:, 0] - full[:, t]))) / scale <= 1e-5
    logits, _ = prefill(model, ids, model.init_cache(2, 16), chunk_size=5)
    assert float(jnp.max(jnp.abs(logits - full[:, -1]))) / scale <= 1e-5
