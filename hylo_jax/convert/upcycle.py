"""Upcycle a Transformer teacher into a hybrid student (the `upcycle` arrow of docs/DESIGN.md).

    student, report = upcycle(teacher, student_config)

Embeddings, every RMSNorm, every MLP and the lm_head are copied unchanged. Each layer's
attention becomes what `student_config.layer_types[i]` says:

    "attention"  the teacher's attention, copied
    "mla"        hylo_jax.convert.mla_init (SVD of W_Q and of the stacked [W_K; W_V])
    "mamba2"     hylo_jax.convert.linear_init.init_mamba2_from_attention
    "gdn"        hylo_jax.convert.linear_init.init_gdn_from_attention

Everything is a pure function on parameter pytrees (`nnx.to_pure_dict`): the student
is built abstractly (`nnx.eval_shape`) and filled once; the teacher is never modified.
The whole student config is checked against the teacher before any weight is touched
(`check_student_config`), so a bad config fails at once with a message naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.config import MIXERS, GDNConfig, Mamba2Config, MLAConfig, ModelConfig
from hylo_jax.convert import mla_init
from hylo_jax.layers.mla import validate_mla_config

# Fields a student config adds to its teacher's; every other field must be equal.
HYBRID_FIELDS = ("layer_types", "mla", "mamba2", "gdn")
MIXER_ATTR = {"attention": "self_attn", "mla": "self_attn", "mamba2": "mixer", "gdn": "linear_attn"}


def make_student_config(
    teacher: ModelConfig,
    layer_types: Sequence[str],
    *,
    mla: MLAConfig | None = None,
    mamba2: Mamba2Config | None = None,
    gdn: GDNConfig | None = None,
) -> ModelConfig:
    """The teacher's config with per-layer mixers; Mamba2/GDN sizes default to the ones
    that take the teacher's heads whole (linear_init.default_*_config)."""
    layer_types = tuple(layer_types)
    bad = [(i, k) for i, k in enumerate(layer_types) if k not in MIXERS]
    if bad:
        raise ValueError(f"unknown mixer(s) {bad} (layer, name); choose from {MIXERS}")
    if len(layer_types) != teacher.num_hidden_layers:
        raise ValueError(f"{len(layer_types)} layer types for a teacher with {teacher.num_hidden_layers} layers")
    if "mla" in layer_types and mla is None:
        raise ValueError("layer_types has 'mla' layers but no MLAConfig was given")
    if ("mamba2" in layer_types and mamba2 is None) or ("gdn" in layer_types and gdn is None):
        from hylo_jax.convert import linear_init  # needs the linear-attention kernels

        mamba2 = mamba2 or linear_init.default_mamba2_config(teacher)
        gdn = gdn or linear_init.default_gdn_config(teacher)
    return teacher.replace(
        layer_types=layer_types,
        mla=mla if "mla" in layer_types else None,
        mamba2=mamba2 if "mamba2" in layer_types else None,
        gdn=gdn if "gdn" in layer_types else None,
    )


def check_student_config(teacher: ModelConfig, student: ModelConfig) -> None:
    """Raise ValueError unless `student` can be upcycled from `teacher` (no work done)."""
    if teacher.is_hybrid:
        raise ValueError(f"the teacher must be a plain Transformer; it has layer types {set(teacher.layer_types)}")
    diff = [
        f"{f.name}: teacher {getattr(teacher, f.name)!r} vs student {getattr(student, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in HYBRID_FIELDS and getattr(teacher, f.name) != getattr(student, f.name)
    ]
    if diff:
        raise ValueError("the student config must equal the teacher's outside the hybrid fields; " + "; ".join(diff))
    student.validate()
    kinds = set(student.layer_types)
    d, hq = teacher.head_dim, teacher.num_attention_heads
    if "mla" in kinds:
        validate_mla_config(student)
        m = student.mla
        if m.v_head_dim != d:
            raise ValueError(f"mla.v_head_dim={m.v_head_dim} must equal the teacher head_dim {d} (o_proj is copied)")
        q_max, kv_max = mla_init.max_ranks(teacher, m)
        if m.q_lora_rank > q_max:
            raise ValueError(f"mla.q_lora_rank={m.q_lora_rank} exceeds the dims of W_Q ({teacher.hidden_size} x {hq * d}): at most {q_max}")
        if m.kv_lora_rank > kv_max:
            raise ValueError(
                f"mla.kv_lora_rank={m.kv_lora_rank} exceeds the dims of the stacked [W_K; W_V] "
                f"({hq * (m.qk_nope_head_dim + m.v_head_dim)} x {teacher.hidden_size}): at most {kv_max}"
            )
    want = {"num_heads": hq, "head_dim": d, "n_groups": hq, "state_size": d, "head_k_dim": d, "head_v_dim": d}
    for kind in ("mamba2", "gdn"):
        if kind in kinds:
            sub = getattr(student, kind)
            bad = [f"{n}={getattr(sub, n)} (needs {w})" for n, w in want.items() if hasattr(sub, n) and getattr(sub, n) != w]
            if bad:
                raise ValueError(f"{kind} sizes do not fit the teacher's attention: {', '.join(bad)}")


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
        from hylo_jax.convert import linear_init

        out["mixer"] = linear_init.init_mamba2_from_attention(attn, student, key=key)
    elif kind == "gdn":
        from hylo_jax.convert import linear_init

        out["linear_attn"] = linear_init.init_gdn_from_attention(attn, student, key=key)
    mixer = out[MIXER_ATTR[kind]]
    stats["mixer_params"] = int(sum(np.size(x) for x in jax.tree.leaves(mixer)))
    stats["teacher_attention_params"] = int(sum(np.size(x) for x in jax.tree.leaves(layer["self_attn"])))
    return out, stats


def fill_abstract(config: ModelConfig, pure: Mapping, *, dtype=jnp.float32, param_dtype=jnp.float32, what: str = "student"):
    """CausalLM of `config` whose parameters are `pure` (checked leaf by leaf)."""
    from hylo_jax.models.decoder import CausalLM

    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return fill_module(abstract, pure, what)


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


# ------------------------------------------------------------------ the convert job
def wants_upcycling(settings) -> bool:
    """True if the `student` settings of configs/convert.py ask for a hybrid."""
    return bool(settings.layer_types or settings.mla_layers)


def _parse_int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"{what}={text!r} is not a comma-separated list of integers") from None


def student_config_from_settings(teacher: ModelConfig, settings, mla_layers: Sequence[int] | None = None) -> ModelConfig:
    """The student ModelConfig the `student` settings describe, checked against `teacher`.

    settings.layer_types (comma list, one per layer) wins over settings.mla_layers
    (preset name | "auto" | comma list); with "auto", pass the chosen `mla_layers`
    (None checks the config with the first num_mla_layers layers as stand-ins).
    """
    from hylo_jax.convert import layer_selection

    n = teacher.num_hidden_layers
    if settings.layer_types:
        types = tuple(t.strip() for t in settings.layer_types.split(","))
    else:
        if settings.mixer not in MIXERS:
            raise ValueError(f"student.mixer={settings.mixer!r} is not a mixer; choose from {MIXERS}")
        spec = str(settings.mla_layers)
        if mla_layers is not None:
            layers = mla_layers
        elif spec == "auto":
            if not 0 < settings.num_mla_layers <= n:
                raise ValueError(f"student.num_mla_layers={settings.num_mla_layers} must be in 1..{n}")
            layers = tuple(range(settings.num_mla_layers))
        elif spec[:1].isdigit():
            layers = _parse_int_list(spec, "student.mla_layers")
        else:
            layers = layer_selection.preset_layers(spec, n)
        types = layer_selection.layer_types(layers, n, kept="mla", other=settings.mixer)
    mla = None
    if "mla" in types:
        rope = settings.qk_rope_head_dim
        pairs = _parse_int_list(settings.rope_pairs, "student.rope_pairs") if settings.rope_pairs else None
        mla = MLAConfig(
            kv_lora_rank=settings.kv_lora_rank,
            q_lora_rank=settings.q_lora_rank,
            qk_rope_head_dim=rope,
            qk_nope_head_dim=teacher.head_dim - rope,
            v_head_dim=teacher.head_dim,
            rope_per_kv_head=settings.rope_per_kv_head,
            rope_pairs=pairs,
        )
    student = make_student_config(teacher, types, mla=mla)
    check_student_config(teacher, student)
    return student


def upcycle_job(teacher, settings, *, tokenizer=None, log=print) -> tuple[Any, dict]:
    """Layer selection (incl. "auto"), upcycling, held-out perplexity, report dict.

    `tokenizer` is needed for "auto" selection and for perplexity (settings.eval_windows > 0).
    """
    from hylo_jax.convert import layer_selection, report as report_lib
    from hylo_jax.eval import perplexity as ppl_lib

    cfg_t = teacher.config
    student_cfg = student_config_from_settings(cfg_t, settings)
    sensitivity = None
    if not settings.layer_types and settings.mla_layers == "auto":
        calib = ppl_lib.heldout_tokens(tokenizer, settings.calibration_corpus, "train", settings.calibration_tokens)
        seq = settings.calibration_seq_len
        calib = ppl_lib.windows(calib, seq)
        log(f"auto layer selection: converting each layer to {settings.mixer} on {calib.size} calibration tokens")
        sensitivity = layer_selection.layer_sensitivity(teacher, student_cfg, calib, settings.mixer, seed=settings.seed)
        chosen = layer_selection.most_sensitive(sensitivity["rise"], settings.num_mla_layers)
        sensitivity["chosen"] = list(chosen)
        student_cfg = student_config_from_settings(cfg_t, settings, chosen)
    log(f"upcycling: layer types {student_cfg.layer_types}")
    student, up_report = upcycle(teacher, student_cfg, seed=settings.seed, rope_pair_criterion=settings.rope_pair_criterion)
    perplexity = None
    if settings.eval_windows > 0:
        ids = ppl_lib.heldout_tokens(tokenizer, settings.eval_corpus, "heldout")
        kw = dict(seq_len=settings.eval_seq_len, max_windows=settings.eval_windows, batch_size=settings.eval_batch_size)
        log(f"held-out perplexity on {settings.eval_corpus}: up to {settings.eval_windows} windows of {settings.eval_seq_len}")
        perplexity = {
            "corpus": f"{settings.eval_corpus} (held-out split)",
            "teacher": ppl_lib.perplexity(teacher, ids, **kw),
            "student": ppl_lib.perplexity(student, ids, **kw),
        }
    report = report_lib.build_report(
        cfg_t, student.config, up_report, perplexity=perplexity, sensitivity=sensitivity, settings=settings.to_dict()
    )
    return student, report
