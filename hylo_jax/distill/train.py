"""The distillation train loop: stages, sharded jitted steps, evals, logs, resume.

    history = distill(cfg, teacher=teacher, student=student, tokenizer=tokenizer)

`cfg` is configs/distill.py's ConfigDict. Stages run in `cfg.stage_order`; each has
its kind ("align": stage-1 layer alignment, "kl": end-to-end KL), sequence length,
step count, global batch, peak learning rate (AdamW, linear warmup then cosine),
remat policy and, for long-context stages, a RoPE scaling (e.g. YaRN) applied to the
MLA layers only. Every stage starts a fresh optimizer.

The step is one `jax.jit` with explicit NamedShardings for the student's params, the
optimizer state (inferred from the params'), the frozen teacher (sharded by the same
logical rules) and the batch; params and optimizer state are donated. The teacher
runs inside the same step, so its activations never leave the device.

State is saved with hylo_jax.checkpoint (Orbax) under `workdir/checkpoints`, keyed by
the global step (steps of all earlier stages + step in stage), with the data
iterator's state, so a killed run resumes exactly where it stopped.

Outputs (process 0): console lines (loss, KL, lr, tokens/s, MFU, ETA), TensorBoard
events under `workdir/tb`, `workdir/metrics.jsonl`, and `workdir/loss_curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hylo_jax import sharding as shd
from hylo_jax.distill import losses

log = logging.getLogger("hylo_jax.distill")

STAGE_KINDS = ("align", "kl")


# ------------------------------------------------------------------ stages
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


# --------------------------------------------------------------- optimizer
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


# -------------------------------------------------------------------- step
def stage_loss(stage: Stage, student, teacher, batch):
    if stage.kind == "align":
        return losses.layer_alignment_loss(student, teacher, batch, remat=stage.remat)
    return losses.kl_distill_loss(
        student,
        teacher,
        batch,
        temperature=stage.temperature,
        ce_weight=stage.ce_weight,
        chunk_size=stage.kl_chunk,
        remat=stage.remat,
    )


@dataclasses.dataclass
class StepFn:
    """A stage's compiled step and the shardings it was built with."""

    step: Callable  # (params, opt_state, rest, teacher_state, batch) -> (params, opt_state, metrics)
    graphdef: Any
    param_shardings: Any
    opt_shardings: Any
    rest_shardings: Any
    teacher_shardings: Any
    batch_sharding: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def build_step(stage: Stage, student_graphdef, teacher_graphdef, params, rest, teacher_state, mesh, opt_cfg) -> StepFn:
    """jit of one optimizer step with explicit shardings and donated params/opt state.

    `params`, `rest`, `teacher_state` must already be sharded (their shardings are read).
    """
    tx, schedule = make_optimizer(stage, opt_cfg)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    rest_sh = jax.tree.map(lambda x: x.sharding, rest)
    teacher_sh = jax.tree.map(lambda x: x.sharding, teacher_state)
    # AdamW moments take their parameter's sharding; counters are replicated.
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_sh = _opt_shardings(abstract_opt, params, mesh)
    batch_sh = shd.batch_sharding(mesh, 2)

    def step(params, opt_state, rest, teacher_state, batch):
        teacher = nnx.merge(teacher_graphdef, teacher_state)

        def loss_fn(params):
            student = nnx.merge(student_graphdef, params, rest)
            return stage_loss(stage, student, teacher, batch)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return params, opt_state, metrics

    batch_tree_sh = {k: batch_sh for k in ("input_ids", "positions", "segment_ids", "loss_mask")}
    jitted = jax.jit(
        step,
        in_shardings=(param_sh, opt_sh, rest_sh, teacher_sh, batch_tree_sh),
        out_shardings=(param_sh, opt_sh, None),
        donate_argnums=(0, 1),
    )
    return StepFn(jitted, student_graphdef, param_sh, opt_sh, rest_sh, teacher_sh, batch_sh, tx, schedule)


def _opt_shardings(abstract_opt, params, mesh):
    """Optimizer-state shardings: a leaf shaped like a param (same tree position under
    a params-shaped subtree) gets that param's sharding; anything else is replicated."""
    param_leaves = jax.tree.leaves(params)
    param_def = jax.tree.structure(params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def is_params_like(x):
        return jax.tree.structure(x) == param_def

    def assign(sub):
        if is_params_like(sub):
            leaves = jax.tree.leaves(sub)
            if all(a.shape == p.shape for a, p in zip(leaves, param_leaves)):
                return jax.tree.unflatten(param_def, [p.sharding for p in param_leaves])
        return jax.tree.map(lambda _: replicated, sub)

    return jax.tree.map(assign, abstract_opt, is_leaf=is_params_like)


def init_opt_state(stepfn: StepFn, params):
    return jax.jit(stepfn.tx.init, out_shardings=stepfn.opt_shardings)(params)


def split_student(student):
    """(graphdef, params, rest): trainable nnx.Param leaves and everything else."""
    return nnx.split(student, nnx.Param, ...)


# --------------------------------------------------------------------- FLOPs
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


# -------------------------------------------------------------------- logging
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


# ---------------------------------------------------------------- evaluation
@nnx.jit(static_argnames=("chunk",))
def _heldout_kl_sums(student, teacher, batch, chunk: int):
    ids, positions, segment_ids, mask = losses._batch_parts(batch)
    h_s = student.hidden(ids, positions, segment_ids)
    h_t = teacher.hidden(ids, positions, segment_ids)
    return losses.chunked_kl_and_ce(student, teacher, h_s, h_t, mask, chunk_size=chunk)


def heldout_kl(student, teacher, token_windows: np.ndarray, batch_size: int, chunk: int = 256) -> float:
    """Mean KL(teacher || student) per token over held-out windows [N, T]."""
    kl = tokens = 0.0
    for start in range(0, len(token_windows) - batch_size + 1, batch_size):
        ids = jnp.asarray(token_windows[start : start + batch_size])
        mask = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
        sums = _heldout_kl_sums(student, teacher, {"input_ids": ids, "loss_mask": mask}, chunk)
        kl += float(sums["kl_sum"])
        tokens += float(sums["tokens"])
    if tokens == 0:
        raise ValueError(f"{len(token_windows)} held-out windows are fewer than one batch of {batch_size}")
    return kl / tokens


# ---------------------------------------------------------------- main loop
def _global_batch(local: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This host's rows -> one global array per key (batch split over data x fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local.items()
        if k in ("input_ids", "positions", "segment_ids", "loss_mask")
    }


def _graphdef_for(config, dtype, param_dtype):
    from hylo_jax.models.decoder import CausalLM

    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return split_student(abstract)[0]


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Evaluator:
    """Held-out perplexity, KL to the teacher and passkey accuracy, measured the same
    way for teacher and student (single-process; see cfg.eval)."""

    def __init__(self, eval_cfg, tokenizer):
        from hylo_jax.eval import perplexity

        self.cfg = eval_cfg
        self.tokenizer = tokenizer
        self.tokens = perplexity.heldout_tokens(
            tokenizer, eval_cfg.corpus, "heldout", max_tokens=eval_cfg.ppl_seq_len * eval_cfg.ppl_windows
        )
        self.windows = perplexity.windows(self.tokens, eval_cfg.ppl_seq_len, eval_cfg.ppl_windows)
        self.passkey_lengths = [int(n) for n in str(eval_cfg.passkey_lengths).split(",") if n.strip()]

    def perplexity(self, model) -> float:
        from hylo_jax.eval import perplexity

        c = self.cfg
        return perplexity.perplexity(
            model, self.tokens, seq_len=c.ppl_seq_len, batch_size=c.batch_size, max_windows=c.ppl_windows
        )["ppl"]

    def passkey(self, model) -> dict[str, float]:
        from hylo_jax.eval import passkey

        out = {}
        for length in self.passkey_lengths:
            res = passkey.evaluate(
                model, self.tokenizer, length, n_trials=self.cfg.passkey_trials, seed=self.cfg.seed,
                prefill_chunk_size=self.cfg.passkey_prefill_chunk or None,
                batch_size=self.cfg.passkey_batch_size,
            )
            out[f"passkey@{length}"] = float(res["accuracy"])
            log.info("passkey at %d tokens: %d/%d", length, res["correct"], res["n_trials"])
        return out

    def __call__(self, student, teacher=None, *, with_passkey: bool = True) -> dict[str, float]:
        res = {"ppl": float(self.perplexity(student))}
        if teacher is not None:
            res["heldout_kl"] = heldout_kl(student, teacher, self.windows, self.cfg.batch_size)
        if with_passkey:
            res.update(self.passkey(student))
        return res


def distill(
    cfg,
    *,
    teacher: nnx.Module,
    student: nnx.Module,
    tokenizer=None,
    make_data: Callable[[Stage, int], Iterator] | None = None,
    evaluator: Callable | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) every stage of `cfg`; returns {"stages": [...], "evals": {...}}.

    make_data(stage, stage_index) -> iterator of this host's batches (with
    get_state/set_state for exact resume); default: hylo_jax.distill.data over
    cfg.data with the teacher's tokenizer. evaluator(model, teacher_or_None, with_passkey=)
    -> dict of numbers, called on the teacher at the start, on the student at init and
    after each stage (passkey: at the start and after the last stage, or after every
    stage with cfg.eval.passkey_every_stage); default: `Evaluator(cfg.eval)` when
    cfg.eval.enabled (single-process). on_step(global_step,
    metrics) is called after every step (metrics as host floats only on log steps).
    """
    from hylo_jax.checkpoint import Checkpointer
    from hylo_jax.distill import data as data_lib

    stages = stages_from_config(cfg)
    mesh = shd.make_mesh(cfg.mesh.to_dict())
    sink = MetricsSink(cfg.workdir, tensorboard=cfg.tensorboard)
    if make_data is None:
        if tokenizer is None:
            raise ValueError("distill() needs a tokenizer (or make_data) to build the data pipeline")
        n_proc = jax.process_count()

        def make_data(stage, index):
            if stage.batch_size % n_proc:
                raise ValueError(f"stage {stage.name!r}: batch {stage.batch_size} not divisible by {n_proc} processes")
            return data_lib.make_dataset(
                cfg.data, tokenizer, stage.seq_len, stage.batch_size // n_proc, seed=cfg.seed + index
            )

    if evaluator is None and cfg.eval.enabled:
        if tokenizer is None:
            raise ValueError("evaluation needs a tokenizer; pass one or set cfg.eval.enabled=False")
        evaluator = Evaluator(cfg.eval, tokenizer)

    # Shard the frozen teacher and the student by the same logical rules.
    teacher_graphdef, teacher_state = nnx.split(teacher)
    teacher_state = shd.shard_state(teacher_state, shd.state_shardings(teacher_state, mesh))
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    _, params, rest = split_student(student)
    params = shd.shard_state(params, shd.state_shardings(params, mesh))
    rest = shd.shard_state(rest, shd.state_shardings(rest, mesh))
    if cfg.assert_sharded and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
        shd.assert_params_sharded(params, mesh)

    ckpt = Checkpointer(
        os.path.join(cfg.workdir, "checkpoints"), save_every=cfg.checkpoint_every, keep=cfg.checkpoint_keep
    )
    ckpt.install_preemption_handler()
    try:
        return _run_stages(cfg, stages, mesh, sink, ckpt, make_data, evaluator, on_step,
                           teacher, teacher_graphdef, teacher_state, student, params, rest)
    finally:
        ckpt.close()  # waits for an async save in flight, restores signal handlers
        sink.close()


def _run_stages(cfg, stages, mesh, sink, ckpt, make_data, evaluator, on_step,
                teacher, teacher_graphdef, teacher_state, student, params, rest):
    base_config = student.config
    dtype = student.dtype
    param_dtype = jax.tree.leaves(params)[0].dtype
    ends = np.cumsum([s.steps for s in stages]).tolist()
    resume_step = ckpt.latest_step or 0
    history: dict[str, Any] = {"stages": [], "evals": {}}

    def evaluate(name, model, with_teacher=True, with_passkey=True):
        if evaluator is None:
            return
        res = evaluator(model, teacher if with_teacher else None, with_passkey=with_passkey)
        history["evals"][name] = res
        sink.write({"event": "eval", "name": name, **res})
        log.info("eval %-14s %s", name, "  ".join(f"{k}={v:.4g}" for k, v in res.items()))

    if resume_step == 0:
        evaluate("teacher", teacher, with_teacher=False, with_passkey=cfg.eval.passkey_teacher)
        evaluate(
            "student_init", nnx.merge(_graphdef_for(base_config, dtype, param_dtype), params, rest),
            with_passkey=cfg.eval.passkey_at_init,
        )

    total_steps = ends[-1]
    if resume_step >= total_steps:
        params = ckpt.restore(model=params, step=resume_step).trees["model"]
        log.info("all %d steps were already done (checkpoint %d)", total_steps, resume_step)
    t_run = time.perf_counter()
    stopped = False
    for si, stage in enumerate(stages):
        start_global = ends[si] - stage.steps
        config = student_config_for_stage(base_config, stage)
        base_config = config  # a stage's RoPE scaling stays for the stages after it
        if resume_step >= ends[si]:  # finished before the restart
            if si == len(stages) - 1:  # the whole run was: measure the final student again
                evaluate(f"after_{stage.name}", nnx.merge(_graphdef_for(config, dtype, param_dtype), params, rest))
            continue
        graphdef = _graphdef_for(config, dtype, param_dtype)
        stepfn = build_step(stage, graphdef, teacher_graphdef, params, rest, teacher_state, mesh, cfg.optimizer)
        opt_state = init_opt_state(stepfn, params)
        data_it = make_data(stage, si)
        step = 0
        if resume_step > start_global:  # resume inside this stage
            restored = ckpt.restore(model=params, optimizer=opt_state, data_iter=data_it, step=resume_step)
            params, opt_state = restored.trees["model"], restored.trees["optimizer"]
            step = resume_step - start_global
            log.info("resumed stage %s at step %d/%d", stage.name, step, stage.steps)
        elif resume_step == start_global and resume_step > 0:  # resume at a stage boundary
            params = ckpt.restore(model=params, step=resume_step).trees["model"]
            log.info("resumed at the start of stage %s", stage.name)
        flops_tok = step_flops_per_token(
            stage, config, teacher.config, losses.aligned_layers(config, teacher.config)
        )
        peak = peak_flops_per_device(jnp.dtype(dtype).name)
        tokens_per_step = stage.batch_size * stage.seq_len
        log.info(
            "stage %s (%s): %d steps x %d x %d tokens, lr %.2e, remat %s, MLA rope %s",
            stage.name, stage.kind, stage.steps, stage.batch_size, stage.seq_len, stage.lr, stage.remat,
            dict(stage.mla_rope_scaling) if stage.mla_rope_scaling else "unchanged",
        )
        t_last, steps_since = time.perf_counter(), 0
        first_step_time = None
        while step < stage.steps:
            local = next(data_it)
            batch = _global_batch(local, stepfn.batch_sharding)
            params, opt_state, metrics = stepfn.step(params, opt_state, rest, teacher_state, batch)
            step += 1
            steps_since += 1
            global_step = start_global + step
            is_log = step % cfg.log_every == 0 or step == stage.steps or step == 1
            record = None
            if is_log:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = (now - t_last) / steps_since
                if step == 1:
                    first_step_time = now - t_last  # includes compilation
                t_last, steps_since = now, 0
                tok_s = tokens_per_step / dt
                mfu = None if peak is None else tok_s * flops_tok / (peak * jax.device_count())
                eta = (total_steps - global_step) * dt
                record = {
                    "event": "train", "stage": stage.name, "kind": stage.kind, "seq_len": stage.seq_len,
                    "step": step, "global_step": global_step, "lr": float(stepfn.schedule(step - 1)),
                    "tokens_per_s": tok_s, "step_s": dt, **metrics,
                }
                if mfu is not None:
                    record["mfu"] = mfu
                sink.write(record)
                log.info(
                    "[%s %d/%d] loss %.4g%s lr %.2e  %.0f tok/s%s  ETA %s",
                    stage.name, step, stage.steps, metrics["loss"],
                    f" kl {metrics['kl']:.4g}" if "kl" in metrics else "",
                    record["lr"], tok_s, f"  MFU {mfu:.1%}" if mfu is not None else "",
                    "compiling" if step == 1 else _fmt_eta(eta),
                )
            if on_step is not None:
                on_step(global_step, record or {})
            ckpt.save(
                global_step, model=params, optimizer=opt_state, data_iter=data_it,
                extra={"stage": stage.name, "step_in_stage": step}, force=step == stage.steps,
            )
            if ckpt.stop_requested:
                log.warning("pre-empted: checkpoint at global step %d written, stopping", global_step)
                stopped = True
                break
        if stopped:
            break
        history["stages"].append({"name": stage.name, "compile_and_first_step_s": first_step_time})
        student_now = nnx.merge(graphdef, params, rest)
        last = si == len(stages) - 1
        evaluate(f"after_{stage.name}", student_now, with_passkey=last or cfg.eval.passkey_every_stage)
    history["student"] = nnx.merge(_graphdef_for(base_config, dtype, param_dtype), params, rest)
    history["stopped"] = stopped
    history["wall_s"] = time.perf_counter() - t_run
    if sink.active and not stopped:
        history["plot"] = plot_loss_curves(cfg.workdir)
    return history
