"""Upcycle a Transformer teacher into a hybrid student (the `upcycle` arrow of docs/DESIGN.md).

    student, report = upcycle(teacher, student_config)

Embeddings, every RMSNorm, every MLP and the lm_head are copied unchanged. Each layer's
attention becomes what `student_config.layer_types[i]` says:

    "attention"  the teacher's attention, copied
    "mla"        hylo_jax.convert.mla_init (SVD of W_Q and of the stacked [W_K; W_V])
    "mamba2"     hylo_jax.convert.linear_init.init_mamba2_from_attention
    "gdn"        hylo_jax.convert.linear_init.init_gdn_from_attention

Everything is a pure function on parameter pytrees (`nnx.to_pure_dict`): the student
is built abstractly (`models.decoder.abstract_model`) and filled once; the teacher is never modified.
The whole student config is checked against the teacher before any weight is touched
(`hylo_jax.config.check_student_config`), so a bad config fails at once with a message
naming the field. The convert job around it (settings, layer selection, evaluation,
report) is hylo_jax.convert.job.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.config import ModelConfig, check_student_config
from hylo_jax.convert import linear_init, mla_init
from hylo_jax.models.decoder import abstract_model

MIXER_ATTR = {"attention": "self_attn", "mla": "self_attn", "mamba2": "mixer", "gdn": "linear_attn"}


def _pure_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _attention_params(layer: Mapping) -> dict:
    return {k: {n: np.asarray(v) for n, v in sub.items()} for k, sub in layer["self_attn"].items()}


def resolve_rope_pairs(
    teacher_params: Mapping, teacher: ModelConfig, student: ModelConfig, criterion: str = "lowest"
) -> ModelConfig:
    """`student` with mla.rope_pairs filled (chosen over the MLA layers' teacher keys by
    `criterion`, see mla_init.choose_rope_pairs) unless it is already set."""
    if student.mla is None or student.mla.rope_pairs is not None:
        return student
    layers = teacher_params["model"]["layers"]
    mla_layers = [i for i, kind in enumerate(student.layer_types) if kind == "mla"]
    kernels = []
    for i in mla_layers:
        kernel = np.asarray(layers[i]["self_attn"]["k_proj"]["kernel"])
        if teacher.qk_norm:  # the key energy that reaches the scores includes the k_norm weight
            kernel = kernel * np.tile(np.asarray(layers[i]["self_attn"]["k_norm"]["weight"]), teacher.num_key_value_heads)
        kernels.append(kernel)
    pairs = mla_init.choose_rope_pairs(kernels, teacher, student.mla.qk_rope_head_dim // 2, criterion)
    return student.replace(mla=dataclasses.replace(student.mla, rope_pairs=pairs))


def upcycle_layer(
    layer: Mapping, teacher: ModelConfig, student: ModelConfig, index: int, key: jax.Array
) -> tuple[dict, dict]:
    """One teacher layer's pure params -> (student layer's pure params, stats)."""
    kind = student.layer_types[index]
    out = {name: layer[name] for name in ("input_layernorm", "post_attention_layernorm", "mlp")}
    stats: dict[str, Any] = {"mixer": kind}
    attn = _attention_params(layer)
    if kind == "attention":
        out["self_attn"] = layer["self_attn"]
    elif kind == "mla":
        out["self_attn"], mla_stats = mla_init.init_mla_from_attention(attn, teacher, student.mla, student.mla.rope_pairs)
        stats.update(mla_stats)
    elif kind == "mamba2":
        out["mixer"] = linear_init.init_mamba2_from_attention(attn, student, key=key)
    elif kind == "gdn":
        out["linear_attn"] = linear_init.init_gdn_from_attention(attn, student, key=key)
    mixer = out[MIXER_ATTR[kind]]
    stats["mixer_params"] = int(sum(np.size(x) for x in jax.tree.leaves(mixer)))
    stats["teacher_attention_params"] = int(sum(np.size(x) for x in jax.tree.leaves(layer["self_attn"])))
    return out, stats


def fill_abstract(config: ModelConfig, pure: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, what: str = "student"):
    """CausalLM of `config` whose parameters are `pure` (checked leaf by leaf)."""
    return fill_module(abstract_model(config, dtype=dtype, param_dtype=param_dtype), pure, what)


def fill_module(abstract, pure: Mapping, what: str):
    """Merge an abstract (eval_shape) module with the pure param dict `pure`; fails on
    any missing, unexpected or mis-shaped parameter, naming it."""
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the {what} has non-parameter state that conversion cannot fill")
    want = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(pure)[0])
    name = jax.tree_util.keystr
    missing, extra = sorted(map(name, want.keys() - got.keys())), sorted(map(name, got.keys() - want.keys()))
    if missing or extra:
        raise ValueError(f"{what} parameters do not match its modules: missing {missing[:6]}, unexpected {extra[:6]}")
    for path, spec in want.items():
        if tuple(np.shape(got[path])) != tuple(spec.shape):
            raise ValueError(f"{what} parameter {name(path)} has shape {np.shape(got[path])}, expected {spec.shape}")
    values = jax.tree.map(lambda spec, v: jnp.asarray(v, spec.dtype), nnx.to_pure_dict(state), pure)
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state, rest)


def upcycle(
    teacher,
    student_config: ModelConfig,
    *,
    seed: int = 0,
    rope_pair_criterion: str = "lowest",
    dtype=None,
) -> tuple[Any, dict]:
    """teacher: a CausalLM or (ModelConfig, pure param dict) -> (student CausalLM, report).

    dtype: the student's compute dtype; None = the teacher model's (float32 for a tuple).

    The student's config (`student.config`) has mla.rope_pairs filled in. report:
    {"layers": [per-layer stats], "rope_pairs": ..., "rope_pair_criterion": ...}.
    """
    if isinstance(teacher, tuple):
        teacher_cfg, teacher_params = teacher
    else:
        teacher_cfg, teacher_params = teacher.config, _pure_params(teacher)
        dtype = dtype or teacher.dtype
    check_student_config(teacher_cfg, student_config)
    student_cfg = resolve_rope_pairs(teacher_params, teacher_cfg, student_config, rope_pair_criterion)
    param_dtype = jnp.asarray(teacher_params["model"]["embed_tokens"]["embedding"]).dtype

    key = jax.random.key(seed)
    pure = {k: v for k, v in teacher_params.items() if k != "model"}  # lm_head (untied) copied
    pure["model"] = {k: v for k, v in teacher_params["model"].items() if k != "layers"}
    pure["model"]["layers"] = {}
    layer_stats = []
    for i in range(student_cfg.num_hidden_layers):
        pure["model"]["layers"][i], stats = upcycle_layer(
            teacher_params["model"]["layers"][i], teacher_cfg, student_cfg, i, jax.random.fold_in(key, i)
        )
        layer_stats.append({"layer": i, **stats})
    student = fill_abstract(student_cfg, pure, dtype=dtype or jnp.float32, param_dtype=param_dtype)
    report = {
        "layers": layer_stats,
        "rope_pairs": None if student_cfg.mla is None else list(student_cfg.mla.rope_pairs),
        "rope_pair_criterion": None if student_cfg.mla is None or student_config.mla.rope_pairs is not None else rope_pair_criterion,
    }
    return student, report
