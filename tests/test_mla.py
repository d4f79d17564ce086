"""MLA layer: exactness of the full-rank conversion, rank sweep, absorbed vs expanded
forms, chunked prefill + decode, a float64 numpy reference, and config errors."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from hylo_jax.config import MLAConfig, ModelConfig, validate_mla_config
from hylo_jax.convert.mla_init import init_mla_from_attention
from hylo_jax.layers.attention import Attention
from hylo_jax.layers.mla import MLA
from hylo_jax.layers.rope import compute_inv_freq

D, HEAD_DIM, T = 48, 16, 11


def teacher_config(heads=4, kv_heads=2, rope_scaling=None):
    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=HEAD_DIM, rope_theta=500.0,
                       rope_scaling=rope_scaling)


# Llama 3's frequency-dependent scaling, frozen as ModelConfig stores it.
LLAMA3_SCALING = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                  ("original_max_position_embeddings", 8), ("rope_type", "llama3"))


def mla_student(cfg, **kw):
    kw.setdefault("qk_rope_head_dim", 8)
    kw.setdefault("qk_nope_head_dim", HEAD_DIM - kw["qk_rope_head_dim"])
    kw.setdefault("v_head_dim", HEAD_DIM)
    kw.setdefault("kv_lora_rank", 12)
    m = MLAConfig(**kw)
    return cfg.replace(layer_types=("mla",), mla=m)


def load(module, params):
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(module, state)
    return module


def inputs(b=2, t=T, seed=0):
    x = jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)
    return x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def upcycled(cfg, scfg, pairs, seed=0):
    att = Attention(cfg, rngs=nnx.Rngs(seed))
    params, stats = init_mla_from_attention(nnx.to_pure_dict(nnx.state(att, nnx.Param)), cfg, scfg.mla, pairs)
    return att, load(MLA(scfg, rngs=nnx.Rngs(99)), params), stats


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("heads,kv_heads,q_lora,scaling", [
    (4, 4, 0, None), (4, 2, D, None), (4, 1, 0, None), (4, 2, 0, LLAMA3_SCALING)])
def test_full_rank_per_kv_head_rope_is_exact(heads, kv_heads, q_lora, scaling):
    cfg = teacher_config(heads, kv_heads, scaling)
    full_kv = min(D, heads * 2 * HEAD_DIM)  # rank of the stacked [K_nope; V] is at most D here
    # The pairs in a scrambled order: the layout must follow rope_pairs, not assume 0..n-1.
    pairs = (3, 0, 7, 1, 6, 2, 5, 4)
    scfg = mla_student(cfg, qk_rope_head_dim=HEAD_DIM, kv_lora_rank=full_kv, q_lora_rank=q_lora,
                       rope_per_kv_head=True, rope_pairs=pairs)
    att, mla, stats = upcycled(cfg, scfg, pairs)
    x, pos = inputs()
    y_t, _ = att(x, pos)
    y_s, _ = mla(x, pos)
    assert rel(y_s, y_t) < 2e-6
    assert stats["kv"]["energy_kept"] == pytest.approx(1.0) and stats["k_rel_error"] < 1e-12


def test_error_falls_monotonically_with_rank():
    cfg = teacher_config(4, 2)
    x, pos = inputs()
    weight_err, out_err, energy = [], [], []
    for rank in (4, 8, 16, 32, 48):
        scfg = mla_student(cfg, qk_rope_head_dim=HEAD_DIM, kv_lora_rank=rank, q_lora_rank=rank, rope_per_kv_head=True)
        att, mla, stats = upcycled(cfg, scfg, tuple(range(HEAD_DIM // 2)))
        weight_err.append(stats["v_rel_error"] + stats["q_rel_error"])
        energy.append(stats["kv"]["energy_kept"])
        out_err.append(rel(mla(x, pos)[0], att(x, pos)[0]))
    assert all(a > b for a, b in zip(weight_err, weight_err[1:])), weight_err
    assert all(a > b for a, b in zip(out_err, out_err[1:])), out_err
    assert all(a < b for a, b in zip(energy[:-2], energy[1:-1])), energy
    assert out_err[-1] < 2e-6


def random_mla(rope_per_kv_head=False, q_lora=24, nope=10, seed=1):
    cfg = teacher_config(4, 2)
    scfg = mla_student(cfg, qk_rope_head_dim=HEAD_DIM - nope, kv_lora_rank=12, q_lora_rank=q_lora,
                       rope_per_kv_head=rope_per_kv_head)
    return MLA(scfg, rngs=nnx.Rngs(seed)), scfg


def reference_mla(params, scfg, x, pos):
    """Float64 numpy MLA (expanded form) written from the DeepSeek-V2 equations."""
    m, h = scfg.mla, scfg.num_attention_heads
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    if m.q_lora_rank:
        q = (x @ p["q_a_proj"]["kernel"]) @ p["q_b_proj"]["kernel"]
    else:
        q = x @ p["q_proj"]["kernel"]
    b, t, _ = x.shape
    q = q.reshape(b, t, h, -1)
    kv = x @ p["kv_a_proj_with_mqa"]["kernel"]
    c, kr = kv[..., : m.kv_lora_rank], kv[..., m.kv_lora_rank:].reshape(b, t, -1, m.qk_rope_head_dim)
    kvb = (c @ p["kv_b_proj"]["kernel"]).reshape(b, t, h, -1)
    inv_freq, _ = compute_inv_freq(scfg.head_dim, scfg.rope_theta)
    pairs = list(m.rope_pairs or range(m.qk_rope_head_dim // 2))
    ang = np.asarray(pos, np.float64)[..., None] * inv_freq[pairs].astype(np.float64)  # [b, t, n]

    def rot(v):  # rotate_half over the rope dims: pair j = (j, j + n)
        n = v.shape[-1] // 2
        c_, s_ = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
        a, bb = v[..., :n], v[..., n:]
        return np.concatenate([a * c_ - bb * s_, bb * c_ + a * s_], axis=-1)

    qn, qr = q[..., : m.qk_nope_head_dim], rot(q[..., m.qk_nope_head_dim:])
    kn, v = kvb[..., : m.qk_nope_head_dim], kvb[..., m.qk_nope_head_dim:]
    kr = rot(kr)
    out = np.zeros((b, t, h, m.v_head_dim))
    for head in range(h):
        r = head // (h // kr.shape[2])
        s = (np.einsum("btn,bsn->bts", qn[:, :, head], kn[:, :, head])
             + np.einsum("btn,bsn->bts", qr[:, :, head], kr[:, :, r])) / np.sqrt(scfg.head_dim)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, head] = np.einsum("bts,bsv->btv", w / w.sum(-1, keepdims=True), v[:, :, head])
    return out.reshape(b, t, -1) @ p["o_proj"]["kernel"]


@pytest.mark.parametrize("rope_per_kv_head,q_lora", [(False, 24), (True, 0)])
def test_matches_float64_reference(rope_per_kv_head, q_lora):
    mla, scfg = random_mla(rope_per_kv_head, q_lora)
    x, pos = inputs()
    ref = reference_mla(nnx.to_pure_dict(nnx.state(mla, nnx.Param)), scfg, x, pos + 5)
    assert rel(mla(x, pos + 5)[0], jnp.asarray(ref, jnp.float32)) < 1e-5


@pytest.mark.parametrize("rope_per_kv_head", [False, True])
def test_absorbed_form_equals_training_form(rope_per_kv_head):
    mla, _ = random_mla(rope_per_kv_head)
    x, pos = inputs()
    y_train, none = mla(x, pos)
    assert none is None
    y_abs, cache = mla(x, pos, cache=mla.init_cache(2, T + 3))
    assert rel(y_abs, y_train) < 1e-5
    assert int(cache.index) == T and cache.latent.shape == (2, T + 3, 12)
    assert cache.k_rope.shape == (2, T + 3, 2 if rope_per_kv_head else 1, 6)


def test_chunked_prefill_and_decode_equal_full_forward():
    mla, _ = random_mla(True)
    x, pos = inputs()
    y_full, _ = mla(x, pos)
    cache = mla.init_cache(2, 16)
    outs, start = [], 0
    for size in (4, 3, 1, 1, 1, 1):  # prefill in chunks, then one token at a time
        y, cache = mla(x[:, start:start + size], pos[:, start:start + size], cache=cache)
        outs.append(y)
        start += size
    assert start == T
    assert rel(jnp.concatenate(outs, axis=1), y_full) < 1e-5


def test_segments_do_not_attend_across_documents():
    mla, _ = random_mla()
    x, _ = inputs(b=1)
    seg = jnp.asarray([[0] * 5 + [1] * (T - 5)])
    pos = jnp.asarray([list(range(5)) + list(range(T - 5))])
    y, _ = mla(x, pos, segment_ids=seg)
    y0, _ = mla(x[:, :5], pos[:, :5])
    y1, _ = mla(x[:, 5:], pos[:, 5:])
    assert rel(y, jnp.concatenate([y0, y1], axis=1)) < 1e-5


@pytest.mark.parametrize("kw,match", [
    (dict(qk_rope_head_dim=7, qk_nope_head_dim=9), "even"),
    (dict(qk_rope_head_dim=18, qk_nope_head_dim=-2), "head_dim"),
    (dict(qk_rope_head_dim=8, qk_nope_head_dim=4), "must equal the teacher head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(rope_pairs=(0, 1, 2)), "rope_pairs"),
    (dict(rope_pairs=(0, 1, 2, 8)), r"\[0, 8\)"),
    (dict(rope_pairs=(0, 1, 1, 2)), "distinct"),
])
def test_bad_config_errors(kw, match):
    base = dict(kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=HEAD_DIM)
    scfg = teacher_config().replace(layer_types=("mla",), mla=MLAConfig(**{**base, **kw}))
    with pytest.raises(ValueError, match=match):
        validate_mla_config(scfg)
    with pytest.raises(ValueError, match=match):
        MLA(scfg, rngs=nnx.Rngs(0))


def test_long_sequences_go_in_query_blocks_in_both_forms():
    """Past DEFAULT_CHUNK_SIZE queries (1100 > 1024: two blocks, the last padded) the
    training and the cached form still equal the float64 reference."""
    mla, scfg = random_mla(True, q_lora=0)
    x, pos = inputs(b=1, t=1100)
    ref = jnp.asarray(reference_mla(nnx.to_pure_dict(nnx.state(mla, nnx.Param)), scfg, x, pos), jnp.float32)
    assert rel(mla(x, pos)[0], ref) < 1e-5
    y_abs, _ = mla(x, pos, cache=mla.init_cache(1, 1104))
    assert rel(y_abs, ref) < 1e-5
