"""Distillation stages and their optimizer.

A stage (configs/distill.py `stages.<name>`, run in `stage_order`) has its kind
("align": stage-1 layer alignment, "kl": end-to-end KL), sequence length, step count,
global batch, peak learning rate (AdamW, linear warmup then cosine), remat policy and,
for long-context stages, a RoPE scaling (e.g. YaRN) applied to the MLA layers only.
Every stage starts a fresh optimizer.
"""

from __future__ import annotations

import dataclasses

import optax

from hylo_jax.distill import losses

STAGE_KINDS = ("align", "kl")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # "align" | "kl"
    seq_len: int
    steps: int
    batch_size: int  # global
    lr: float
    warmup_steps: int
    remat: str = "none"
    temperature: float = 1.0
    ce_weight: float = 0.0
    kl_chunk: int = 512
    # RoPE scaling for the MLA layers during and after this stage (None: unchanged).
    mla_rope_scaling: tuple | None = None

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage {self.name!r}: kind {self.kind!r} is not one of {STAGE_KINDS}")
        if self.steps < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError(
                f"stage {self.name!r}: steps={self.steps}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size} must be >= 1, >= 2, >= 1"
            )
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"stage {self.name!r}: warmup_steps={self.warmup_steps} not in [0, {self.steps}]")
        if self.remat not in losses.REMAT_POLICIES:
            raise ValueError(
                f"stage {self.name!r}: remat {self.remat!r} not in {tuple(losses.REMAT_POLICIES)}"
            )


def stages_from_config(cfg) -> list[Stage]:
    """Stages in `cfg.stage_order` (comma-separated names of entries of cfg.stages)."""
    names = [n.strip() for n in cfg.stage_order.split(",") if n.strip()]
    if not names:
        raise ValueError("config.stage_order is empty; name at least one stage of config.stages")
    out = []
    for name in names:
        if name not in cfg.stages:
            raise ValueError(f"stage {name!r} in stage_order is not in config.stages ({sorted(cfg.stages)})")
        s = cfg.stages[name]
        rope = s.mla_rope_scaling.to_dict() if "mla_rope_scaling" in s else {}
        rope = {k: v for k, v in rope.items() if v not in ("", None, 0, 0.0)}
        scaling = None
        if rope.get("rope_type"):
            scaling = tuple(sorted(rope.items()))
        out.append(
            Stage(
                name=name,
                kind=s.kind,
                seq_len=int(s.seq_len),
                steps=int(s.steps),
                batch_size=int(s.batch_size),
                lr=float(s.lr),
                warmup_steps=int(round(s.warmup_fraction * s.steps)),
                remat=s.remat,
                temperature=float(s.temperature),
                ce_weight=float(s.ce_weight),
                kl_chunk=int(s.kl_chunk),
                mla_rope_scaling=scaling,
            )
        )
    return out


def student_config_for_stage(config, stage: Stage):
    """The student's ModelConfig with the stage's MLA RoPE scaling (if it sets one)."""
    if stage.mla_rope_scaling is None:
        return config
    if config.mla is None:
        raise ValueError(f"stage {stage.name!r} sets mla_rope_scaling but the student has no MLA layers")
    return config.replace(mla=dataclasses.replace(config.mla, rope_scaling=stage.mla_rope_scaling))


def make_optimizer(stage: Stage, opt_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW, linear warmup to stage.lr, cosine down to min_lr_ratio * lr; clipped."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=stage.lr,
        warmup_steps=stage.warmup_steps,
        decay_steps=stage.steps,
        end_value=stage.lr * float(opt_cfg.min_lr_ratio),
    )
    tx = optax.chain(
        optax.clip_by_global_norm(float(opt_cfg.clip_norm)),
        optax.adamw(
            schedule,
            b1=float(opt_cfg.b1),
            b2=float(opt_cfg.b2),
            eps=float(opt_cfg.eps),
            weight_decay=float(opt_cfg.weight_decay),
        ),
    )
    return tx, schedule
