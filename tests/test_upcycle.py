"""Upcycling pipeline on a tiny random teacher: copies, exact full-rank MLA, purity,
checkpoint round trip, layer selection, KV arithmetic, perplexity and config errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hylo_jax.config_files import load_config
from hylo_jax.config import MLAConfig, ModelConfig, check_student_config, make_student_config
from hylo_jax.convert import job, layer_selection, report, upcycle
from hylo_jax.eval import perplexity as ppl
from hylo_jax.models.decoder import CausalLM

L, HEAD_DIM = 4, 16
EXACT_MLA = MLAConfig(kv_lora_rank=48, qk_rope_head_dim=HEAD_DIM, qk_nope_head_dim=0, v_head_dim=HEAD_DIM,
                      rope_per_kv_head=True)
LOW_MLA = MLAConfig(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=12, v_head_dim=HEAD_DIM, q_lora_rank=16)
@pytest.fixture(scope="module")
def teacher():
    cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM, tie_word_embeddings=True)
    return CausalLM(cfg, rngs=nnx.Rngs(0))


def ids(b=2, t=13, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, 96, (b, t)), jnp.int32)


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_all_attention_student_is_the_teacher(teacher):
    student, rep = upcycle.upcycle(teacher, make_student_config(teacher.config, ["attention"] * L))
    np.testing.assert_array_equal(np.asarray(student(ids())), np.asarray(teacher(ids())))
    assert rep["rope_pairs"] is None


def test_full_rank_mla_student_reproduces_teacher_and_copies_the_rest(teacher):
    before = jax.tree.map(np.array, params_of(teacher))
    cfg = make_student_config(teacher.config, ["mla", "attention", "mla", "mla"], mla=EXACT_MLA)
    student, rep = upcycle.upcycle(teacher, cfg)
    lt, ls = teacher(ids()), student(ids())
    assert float(jnp.max(jnp.abs(ls - lt)) / jnp.max(jnp.abs(lt))) < 1e-5
    # The teacher is untouched and everything outside the mixers is copied bit for bit.
    jax.tree.map(np.testing.assert_array_equal, before, params_of(teacher))
    s, t = params_of(student), params_of(teacher)
    np.testing.assert_array_equal(s["model"]["embed_tokens"]["embedding"], t["model"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(s["model"]["norm"]["weight"], t["model"]["norm"]["weight"])
    for i in range(L):
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            jax.tree.map(np.testing.assert_array_equal, s["model"]["layers"][i][name], t["model"]["layers"][i][name])
    np.testing.assert_array_equal(s["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"],
                                  t["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"])
    assert [r["mixer"] for r in rep["layers"]] == list(cfg.layer_types)
    assert all(r["kv"]["energy_kept"] == pytest.approx(1.0) for r in rep["layers"] if r["mixer"] == "mla")


def test_rope_pairs_are_chosen_and_stored(teacher):
    cfg = make_student_config(teacher.config, ["mla"] * L, mla=LOW_MLA)
    student, rep = upcycle.upcycle(teacher, cfg, rope_pair_criterion="k_energy")
    assert student.config.mla.rope_pairs == tuple(rep["rope_pairs"]) and len(rep["rope_pairs"]) == 2
    student_low, rep_low = upcycle.upcycle(teacher, cfg, rope_pair_criterion="lowest")
    assert rep_low["rope_pairs"] == [0, 1]
    given = cfg.replace(mla=dataclasses.replace(LOW_MLA, rope_pairs=(5, 2)))
    assert upcycle.upcycle(teacher, given)[0].config.mla.rope_pairs == (5, 2)


def test_student_checkpoint_round_trip(teacher, tmp_path):
    from hylo_jax.convert.export import export_model
    from hylo_jax import load_model

    cfg = make_student_config(teacher.config, ["mla", "attention", "mla", "attention"], mla=LOW_MLA)
    student, _ = upcycle.upcycle(teacher, cfg)
    out = export_model(student, tmp_path / "student", dtype="float32")
    loaded = load_model(out, progress=False)
    assert loaded.config == student.config
    np.testing.assert_array_equal(np.asarray(loaded(ids())), np.asarray(student(ids())))


def test_load_model_under_a_mesh_puts_every_tensor_on_its_shards(teacher, tmp_path):
    """What `python -m hylo_jax.distill` relies on: under jax.set_mesh, load_model reads each
    tensor straight onto the shardings of the rules table (every mixer kind), same values.
    Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 for a real split."""
    from hylo_jax import load_model
    from hylo_jax import sharding as shd
    from hylo_jax.convert.export import export_model

    cfg = make_student_config(teacher.config, ["mla", "gdn", "mamba2", "attention"], mla=LOW_MLA)
    out = export_model(upcycle.upcycle(teacher, cfg)[0], tmp_path / "student", dtype="float32")
    plain = load_model(out, progress=False)
    mesh = shd.make_mesh({"fsdp": -1})
    with jax.set_mesh(mesh):
        sharded = load_model(out, progress=False)
    state = nnx.state(sharded)
    assert [x.sharding for x in jax.tree.leaves(state)] == jax.tree.leaves(shd.state_shardings(state, mesh))
    if mesh.shape["fsdp"] > 1:
        shd.assert_params_sharded(state, mesh, tolerance=0.5)
    jax.tree.map(np.testing.assert_array_equal, params_of(sharded), params_of(plain))


@pytest.mark.parametrize("kind", ["gdn", "mamba2"])
def test_linear_layers_take_the_teacher_projections(teacher, kind):
    cfg = make_student_config(teacher.config, ["mla", kind, kind, "attention"], mla=LOW_MLA)
    student, rep = upcycle.upcycle(teacher, cfg)
    assert np.isfinite(np.asarray(student(ids()))).all()
    attr = upcycle.MIXER_ATTR[kind]
    s = params_of(student)["model"]["layers"][1][attr]
    t = params_of(teacher)["model"]["layers"][1]["self_attn"]
    np.testing.assert_array_equal(s["out_proj" if kind == "mamba2" else "o_proj"]["kernel"], t["o_proj"]["kernel"])


def test_layer_presets_and_checks():
    assert layer_selection.preset_layers("hylo", 30) == (1, 5, 9, 13, 17, 21, 25, 29)
    assert layer_selection.preset_layers("llama32_1b", 16) == (1, 5, 10, 14)
    assert layer_selection.preset_layers("llama32_3b", 28) == (0, 5, 10, 16, 21, 26)
    assert layer_selection.preset_layers("qwen3_1p7b", 28) == (1, 5, 9, 13, 17, 21, 25)
    with pytest.raises(ValueError, match="16-layer"):
        layer_selection.preset_layers("llama32_1b", 30)
    with pytest.raises(ValueError, match="out of range"):
        layer_selection.check_layers([1, 30], 30)
    with pytest.raises(ValueError, match="repeats"):
        layer_selection.check_layers([1, 1], 30)
    with pytest.raises(ValueError, match="unknown layer preset"):
        layer_selection.preset_layers("nope", 30)
    assert layer_selection.most_sensitive([0.1, 0.5, 0.0, 0.3], 2) == (1, 3)
    assert layer_selection.layer_types([1], 3, "mla", "gdn") == ("gdn", "mla", "gdn")


def test_layer_sensitivity(teacher):
    x = np.asarray(ids(2, 12))
    low = layer_selection.layer_sensitivity(teacher, teacher.config.replace(layer_types=("mla",) * L, mla=LOW_MLA), x, "mla")
    # Converting layer i alone, run through the full student, gives the same loss.
    i = int(np.argmax(low["rise"]))
    cfg = make_student_config(teacher.config, ["mla" if j == i else "attention" for j in range(L)], mla=LOW_MLA)
    student, _ = upcycle.upcycle(teacher, cfg)
    logits = student(jnp.asarray(x))
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), x[:, 1:, None], -1).mean()
    assert float(nll) == pytest.approx(low["loss"][i], rel=1e-5)


def test_perplexity_matches_direct_computation(teacher):
    stream = np.random.RandomState(3).randint(0, 96, 70).astype(np.int32)
    got = ppl.perplexity(teacher, stream, seq_len=16, batch_size=3, chunk=5)
    win = jnp.asarray(stream[:64].reshape(4, 16))
    logp = jax.nn.log_softmax(teacher(win)[:, :-1])
    nll = -float(jnp.take_along_axis(logp, win[:, 1:, None], -1).mean())
    assert got["tokens"] == 4 * 15 and got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_kv_cache_arithmetic(teacher):
    cfg = make_student_config(teacher.config, ["mla", "attention", "mla", "mla"], mla=LOW_MLA)
    kv = report.kv_cache_summary(teacher.config, cfg)
    assert kv["teacher_bytes_per_token"] == 2 * L * 2 * 2 * HEAD_DIM
    assert kv["student_bytes_per_token"] == 2 * (3 * (8 + 4) + 2 * 2 * HEAD_DIM)
    assert report.kv_elements_per_layer(cfg) == [12, 64, 12, 12]


def student_settings(**overrides):
    s = load_config("convert").student
    s.qk_rope_head_dim, s.kv_lora_rank, s.mla_layers = 4, 8, "hylo"
    for k, v in overrides.items():
        setattr(s, k, v)
    return s


@pytest.mark.parametrize("overrides,match", [
    (dict(kv_lora_rank=200), "kv_lora_rank=200 exceeds"),
    (dict(q_lora_rank=49), "q_lora_rank=49 exceeds"),
    (dict(qk_rope_head_dim=5), "even"),
    (dict(qk_rope_head_dim=18), "head_dim"),
    (dict(mla_layers="1,4"), "out of range"),
    (dict(mixer="lstm"), "not a mixer"),
    (dict(layer_types="mla,gdn,foo,mla"), "unknown mixer"),
    (dict(layer_types="mla,mla"), "2 layer types"),
    (dict(mla_layers="llama32_1b"), "16-layer"),
    (dict(rope_pairs="0,9"), "rope_pairs"),
])
def test_bad_student_settings_fail_before_work(teacher, overrides, match):
    with pytest.raises(ValueError, match=match):
        job.student_config_from_settings(teacher.config, student_settings(**{"mixer": "attention", **overrides}))


def test_student_must_match_teacher(teacher):
    other = teacher.config.replace(hidden_size=64, layer_types=("mla",) * L, mla=LOW_MLA)
    with pytest.raises(ValueError, match="hidden_size"):
        check_student_config(teacher.config, other)
