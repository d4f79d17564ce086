"""results.md and results.png from the suite's results dict (hylo_jax.eval.suite)."""

from __future__ import annotations

import os
import tempfile


def _models(results: dict) -> list[str]:
    return list(results)


def markdown(results: dict, tasks: list[str], lengths: list[int]) -> str:
    """Task accuracy (tasks x lengths, models side by side), loss by position and
    short-context quality as markdown tables."""
    models = _models(results)
    head = ["task"] + [f"{n:,} · {m}" for n in lengths for m in models]
    lines = ["## Accuracy (fraction of expected answers found)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in tasks:
        cells = [task]
        for n in lengths:
            for m in models:
                e = results.get(m, {}).get(task, {}).get(str(n))
                if e is None:
                    cells.append("")
                elif e.get("skipped"):
                    cells.append("skipped")
                else:
                    cells.append(f"{e['accuracy']:.2f} (n={e['n']})")
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [(m, t, n, e["skipped"]) for m in models for t in tasks
               for n, e in results.get(m, {}).get(t, {}).items() if e.get("skipped")]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{m} {t} @ {n}: {why}" for m, t, n, why in skipped)]

    loss = {m: results[m]["loss_by_position"] for m in models if "loss" in results[m].get("loss_by_position", {})}
    if loss:
        first = next(iter(loss.values()))
        lines += ["", f"## Loss by position (nats per token; {first['corpus']}, {first['samples']} documents "
                      f"of {first['length']:,} tokens)", "",
                  "| positions | " + " | ".join(loss) + " |", "|" + "---|" * (len(loss) + 1)]
        for i, (lo, hi) in enumerate(first["bins"]):
            lines.append(f"| {lo:,}-{hi:,} | " + " | ".join(f"{loss[m]['loss'][i]:.3f}" for m in loss) + " |")
    short = {m: results[m]["short_context"] for m in models if "short_context" in results[m]}
    if short:
        lines += ["", "## Short context (held-out)", "", "| model | perplexity | KL to the teacher |", "|---|---|---|"]
        for m, s in short.items():
            kl = f"{s['heldout_kl']:.4f}" if "heldout_kl" in s else ""
            lines.append(f"| {m} | {s['ppl']:.3f} | {kl} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, tasks: list[str], path: str) -> str | None:
    """Accuracy against length per task (one line per model) and the loss by position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = _models(results)
    has_loss = any("loss" in results[m].get("loss_by_position", {}) for m in models)
    panels = len(tasks) + has_loss
    if panels == 0:
        return None
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, task in zip(axes, tasks):
        for m in models:
            pts = sorted((int(n), e["accuracy"]) for n, e in results.get(m, {}).get(task, {}).items()
                         if e.get("accuracy") is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m)
        ax.set_title(task)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    if has_loss:
        ax = axes[len(tasks)]
        for m in models:
            lbp = results[m].get("loss_by_position", {})
            if "loss" in lbp:
                mids = [(lo + hi) / 2 for lo, hi in lbp["bins"]]
                ax.plot(mids, lbp["loss"], marker="o", label=m)
        ax.set_title("loss by position")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position (tokens)")
        ax.set_ylabel("nats per token")
        ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.axis("off")
    for ax in axes[:panels]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
            break
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
