"""The upcycling report: per-layer init quality, sizes, KV cache and perplexity.

`build_report` gathers what `upcycle` measured per layer (mixer, SVD energy kept and
reconstruction errors for MLA, parameter counts), the KV-cache arithmetic of teacher
and student (`kv_cache_summary`), held-out perplexities and, in "auto" layer
selection, the per-layer sensitivities. `write_report` stores it as report.json and a
readable report.md table.
"""

from __future__ import annotations

import json
import os

from hylo_jax.config import ModelConfig


def kv_elements_per_layer(config: ModelConfig) -> list[int]:
    """Cache elements per token for each layer (constant-state layers: 0)."""
    return [config.replace(layer_types=(kind,), num_hidden_layers=1).cache_bytes_per_token(1) for kind in config.layer_types]


def kv_cache_summary(teacher: ModelConfig, student: ModelConfig, bytes_per_element: int = 2) -> dict:
    """Bytes of KV cache per token, teacher vs student, with the arithmetic spelt out."""
    t = teacher.cache_bytes_per_token(bytes_per_element)
    s = student.cache_bytes_per_token(bytes_per_element)
    per_t = 2 * teacher.num_key_value_heads * teacher.head_dim
    terms = []
    if student.mla is not None:
        m = student.mla
        n_rope = teacher.num_key_value_heads if m.rope_per_kv_head else 1
        n_mla = student.layer_types.count("mla")
        terms.append(f"{n_mla} MLA x ({m.kv_lora_rank} latent + {n_rope} x {m.qk_rope_head_dim} rope)")
    n_attn = student.layer_types.count("attention")
    if n_attn:
        terms.append(f"{n_attn} attention x {per_t}")
    return {
        "bytes_per_element": bytes_per_element,
        "teacher_bytes_per_token": t,
        "student_bytes_per_token": s,
        "ratio": s / t,
        "teacher_arithmetic": (
            f"{teacher.num_hidden_layers} layers x 2 (K,V) x {teacher.num_key_value_heads} kv heads x "
            f"{teacher.head_dim} dims x {bytes_per_element} B = {t} B"
        ),
        "student_arithmetic": (" + ".join(terms) or "0") + f" elements x {bytes_per_element} B = {s} B"
        + f" ({100 * s / t:.2f} % of the teacher)",
        "student_state_bytes_float32": student.state_bytes(4),
    }


def build_report(
    teacher: ModelConfig,
    student: ModelConfig,
    upcycle_report: dict,
    *,
    perplexity: dict | None = None,
    sensitivity: dict | None = None,
    settings: dict | None = None,
) -> dict:
    layers = []
    kv = kv_elements_per_layer(student)
    for stats, elems in zip(upcycle_report["layers"], kv):
        row = dict(stats)
        row["kv_elements_per_token"] = elems
        if sensitivity is not None:
            row["sensitivity_loss_rise"] = sensitivity["rise"][stats["layer"]]
        layers.append(row)
    mla_rows = [r for r in layers if r["mixer"] == "mla"]
    summary = {}
    if mla_rows:
        for key in ("k_rel_error", "v_rel_error", "q_rel_error"):
            vals = [r[key] for r in mla_rows]
            summary[f"mla_{key}_mean"] = sum(vals) / len(vals)
            summary[f"mla_{key}_max"] = max(vals)
        summary["mla_kv_energy_kept_mean"] = sum(r["kv"]["energy_kept"] for r in mla_rows) / len(mla_rows)
        summary["mla_q_energy_kept_mean"] = sum(r["q"]["energy_kept"] for r in mla_rows) / len(mla_rows)
    return {
        "teacher": teacher.to_hf_config(),
        "student_hylo": student.to_hf_config().get("hylo"),
        "settings": settings or {},
        "rope_pairs": upcycle_report.get("rope_pairs"),
        "rope_pair_criterion": upcycle_report.get("rope_pair_criterion"),
        "kv_cache": kv_cache_summary(teacher, student),
        "params": {
            "teacher_mixers": sum(r["teacher_attention_params"] for r in layers),
            "student_mixers": sum(r["mixer_params"] for r in layers),
        },
        "init_summary": summary,
        "perplexity": perplexity,
        "sensitivity": sensitivity,
        "layers": layers,
    }


def _fmt(x, spec=".4f"):
    return "" if x is None else format(x, spec)


def format_table(report: dict) -> str:
    """Readable Markdown: the headline numbers and one row per layer."""
    kv = report["kv_cache"]
    lines = ["# Upcycling report", ""]
    lines.append(f"- KV cache per token, teacher: {kv['teacher_arithmetic']}")
    lines.append(f"- KV cache per token, student: {kv['student_arithmetic']}")
    lines.append(f"- student recurrent state (float32, per sequence): {kv['student_state_bytes_float32']} B")
    p = report["params"]
    lines.append(f"- token-mixer parameters: teacher {p['teacher_mixers']:,}, student {p['student_mixers']:,}")
    if report.get("rope_pairs") is not None:
        lines.append(f"- MLA rotary pairs kept: {report['rope_pairs']} (criterion: {report['rope_pair_criterion'] or 'given'})")
    ppl = report.get("perplexity")
    if ppl:
        lines.append(
            f"- held-out perplexity ({ppl['corpus']}, {ppl['teacher']['tokens']} tokens, windows of "
            f"{ppl['teacher']['seq_len']}): teacher {ppl['teacher']['ppl']:.3f}, student before training "
            f"{ppl['student']['ppl']:.3f}"
        )
    for k, v in report.get("init_summary", {}).items():
        lines.append(f"- {k}: {v:.4f}")
    sens = report.get("sensitivity") is not None
    lines += ["", "| layer | mixer | q energy | kv energy | q err | k err | v err | mixer params | KV elem/token |"
              + (" loss rise |" if sens else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if sens else "")]
    for r in report["layers"]:
        is_mla = r["mixer"] == "mla"
        cells = [
            str(r["layer"]), r["mixer"],
            _fmt(r["q"]["energy_kept"]) if is_mla else "", _fmt(r["kv"]["energy_kept"]) if is_mla else "",
            _fmt(r.get("q_rel_error")), _fmt(r.get("k_rel_error")), _fmt(r.get("v_rel_error")),
            f"{r['mixer_params']:,}", str(r["kv_elements_per_token"]),
        ]
        if sens:
            cells.append(_fmt(r["sensitivity_loss_rise"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, directory: str) -> tuple[str, str]:
    """-> paths of report.json and report.md inside `directory`."""
    js, md = os.path.join(directory, "report.json"), os.path.join(directory, "report.md")
    with open(js, "w") as f:
        json.dump(report, f, indent=1)
    with open(md, "w") as f:
        f.write(format_table(report))
    return js, md
