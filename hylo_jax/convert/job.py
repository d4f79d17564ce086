"""The convert job: configs/convert.py's `student` settings -> student config, layer
selection, upcycled student, held-out perplexity and the report.

    student_cfg = student_config_from_settings(teacher.config, settings)  # checked, no work done
    student, report = upcycle_job(teacher, settings, tokenizer=tokenizer)

Settings text (comma lists, presets, "auto") is parsed here; the resulting ModelConfig is
checked by hylo_jax.config.check_student_config. `python -m hylo_jax.convert` runs it.
"""

from __future__ import annotations

from typing import Any, Sequence

from hylo_jax.config import MIXERS, MLAConfig, ModelConfig, check_student_config, make_student_config
from hylo_jax.convert import layer_selection
from hylo_jax.convert import report as report_lib
from hylo_jax.convert.upcycle import upcycle
from hylo_jax.eval import perplexity as ppl_lib


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
