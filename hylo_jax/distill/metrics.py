"""What a distillation run reports: FLOPs and MFU, throughput, metric logs and plots.

Process 0 writes console lines (loss, KL, lr, tokens/s, MFU, ETA), TensorBoard events
under `workdir/tb`, `workdir/metrics.jsonl` and `workdir/loss_curves.png`.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from hylo_jax.distill import losses
from hylo_jax.distill.stages import Stage


def forward_flops_per_token(config, seq_len: int, layers: tuple[int, ...] | None = None, lm_head: bool = True) -> float:
    """Approximate forward matmul FLOPs per token (2 * MACs), incl. causal attention
    scores (average context seq_len / 2) and linear-mixer state updates."""
    d = config.hidden_size
    total = 0.0
    idx = range(config.num_hidden_layers) if layers is None else layers
    for i in idx:
        kind = config.layer_types[i]
        total += 2 * 3 * d * config.intermediate_size  # MLP
        h, hd, kv = config.num_attention_heads, config.head_dim, config.num_key_value_heads
        if kind == "attention":
            total += 2 * d * (2 * h * hd + 2 * kv * hd) + 2 * h * hd * seq_len
        elif kind == "mla":
            m = config.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            q = 2 * d * h * qk if m.q_lora_rank == 0 else 2 * m.q_lora_rank * (d + h * qk)
            kv_a = 2 * d * (m.kv_lora_rank + m.qk_rope_head_dim)
            kv_b = 2 * m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
            total += q + kv_a + kv_b + 2 * h * m.v_head_dim * d + h * (qk + m.v_head_dim) * seq_len
        elif kind == "mamba2":
            m = config.mamba2
            inner = m.num_heads * m.head_dim
            in_dim = 2 * inner + 2 * m.n_groups * m.state_size + m.num_heads
            total += 2 * d * in_dim + 2 * inner * d + 6 * inner * m.state_size
        elif kind == "gdn":
            g = config.gdn
            total += 2 * d * g.num_heads * (2 * g.head_k_dim + 2 * g.head_v_dim) + 2 * g.num_heads * g.head_v_dim * d
            total += 6 * g.num_heads * g.head_k_dim * g.head_v_dim
    if lm_head:
        total += 2 * d * config.vocab_size
    return total


def step_flops_per_token(stage: Stage, student_config, teacher_config, align_layers) -> float:
    """Training FLOPs per token of one step: student forward+backward (3x forward)
    plus the teacher's forward. Stage 1 trains only the aligned layers."""
    if stage.kind == "align":
        student = 3 * forward_flops_per_token(student_config, stage.seq_len, align_layers, lm_head=False)
        teacher = forward_flops_per_token(teacher_config, stage.seq_len, lm_head=False)
    else:
        student = 3 * forward_flops_per_token(student_config, stage.seq_len)
        teacher = forward_flops_per_token(teacher_config, stage.seq_len)
    return student + teacher


# Dense bf16 / tf32 peak FLOP/s per chip, from the vendors' datasheets (SXM parts).
PEAK_FLOPS = {"H100": {"bfloat16": 989e12, "float32": 494e12}, "H200": {"bfloat16": 989e12, "float32": 494e12},
              "A100": {"bfloat16": 312e12, "float32": 156e12}}


def peak_flops_per_device(compute_dtype: str) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, table in PEAK_FLOPS.items():
        if name in kind:
            return table.get(compute_dtype, table["float32"])
    return None


class Throughput:
    """Tokens/s, step time and MFU of one stage, averaged between log steps."""

    def __init__(self, stage: Stage, student_config, teacher_config, compute_dtype, first_step: int = 0):
        self.tokens_per_step = stage.batch_size * stage.seq_len
        align_layers = losses.aligned_layers(student_config, teacher_config)
        self.flops_per_token = step_flops_per_token(stage, student_config, teacher_config, align_layers)
        self.peak = peak_flops_per_device(jnp.dtype(compute_dtype).name)
        self.first_step_s = None  # the stage's first step, compilation included
        self.last_step, self.t_last = first_step, time.perf_counter()

    def measure(self, step: int) -> dict[str, float]:
        """{"tokens_per_s", "step_s"[, "mfu"]} over the steps since the last call."""
        now = time.perf_counter()
        step_s = (now - self.t_last) / (step - self.last_step)
        if step == 1:
            self.first_step_s = now - self.t_last
        self.last_step, self.t_last = step, now
        out = {"tokens_per_s": self.tokens_per_step / step_s, "step_s": step_s}
        if self.peak is not None:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.peak * jax.device_count())
        return out


class MetricsSink:
    """Console + TensorBoard + metrics.jsonl, written by process 0 only."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0 and bool(workdir)
        self.path = os.path.join(workdir, "metrics.jsonl") if workdir else ""
        self.writer = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.writer = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and "global_step" in record:
            prefix = record.get("stage", "")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("global_step", "step"):
                    self.writer.add_scalar(f"{prefix}/{k}" if prefix else k, v, record["global_step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(workdir: str) -> str | None:
    """PNG with one panel per stage: training loss (and KL) against step."""
    records = [r for r in read_metrics(workdir) if r.get("event") == "train"]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in records))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
    for ax, name in zip(axes[0], stages):
        rs = [r for r in records if r["stage"] == name]
        steps = [r["step"] for r in rs]
        ax.plot(steps, [r["loss"] for r in rs], label="loss")
        if "ce" in rs[0]:  # loss mixes KL and CE: show the KL alone too
            ax.plot(steps, [r["kl"] for r in rs], label="KL")
        ax.set_title(f"{name} ({rs[0].get('kind', '')}, T={rs[0].get('seq_len', '?')})")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = os.path.join(workdir, "loss_curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
