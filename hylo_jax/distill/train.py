"""The distillation loop: stages in order, sharded steps, evals, logs, checkpoints, resume.

    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    with jax.set_mesh(mesh):  # both models load straight onto their shards
        teacher, student = load_model(teacher_path), load_model(student_dir)
    history = distill(cfg, teacher=teacher, student=student, mesh=mesh, tokenizer=tokenizer)

`cfg` is configs/distill.py's ConfigDict. The parts the loop puts together: stages and
their optimizer (hylo_jax.distill.stages), the jitted step (.train_step), the losses
(.losses), metrics, FLOPs and plots (.metrics), evaluation (.evaluate) and the data
pipeline (.data).

State is saved with hylo_jax.checkpoint (Orbax) under `workdir/checkpoints`, keyed by
the global step (steps of all earlier stages + step in stage), with the data
iterator's state, so a killed run resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from hylo_jax import sharding as shd
from hylo_jax.checkpoint import Checkpointer
from hylo_jax.config import ModelConfig
from hylo_jax.distill import data as data_lib
from hylo_jax.distill.evaluate import Evaluator
from hylo_jax.distill.metrics import MetricsSink, Throughput, plot_loss_curves
from hylo_jax.distill.stages import Stage, stages_from_config, student_config_for_stage
from hylo_jax.distill.train_step import StepFn, build_step, init_opt_state, split_student
from hylo_jax.models.decoder import abstract_model

log = logging.getLogger("hylo_jax.distill")


def distill(
    cfg,
    *,
    teacher: nnx.Module,
    student: nnx.Module,
    mesh: jax.sharding.Mesh | None = None,
    tokenizer=None,
    make_data: Callable[[Stage, int], Iterator] | None = None,
    evaluator: Callable | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) every stage of `cfg`; returns {"stages": [...], "evals": {...}, ...}.

    mesh: where the run happens (default: `sharding.make_mesh(cfg.mesh)`). Load the
    teacher and the student under `jax.set_mesh(mesh)` so that their parameters start
    on their shards; parameters found anywhere else are placed on the mesh here.
    make_data(stage, stage_index) -> iterator of this host's batches (with
    get_state/set_state for exact resume); default: hylo_jax.distill.data over
    cfg.data with the teacher's tokenizer. evaluator(model, teacher_or_None, with_passkey=)
    -> dict of numbers, called on the teacher at the start, on the student at init and
    after each stage (passkey: at the start and after the last stage, or after every
    stage with cfg.eval.passkey_every_stage); default: `Evaluator(cfg.eval)` when
    cfg.eval.enabled (single-process). on_step(global_step, metrics) is called after
    every step (metrics as host floats only on log steps).
    """
    stages = stages_from_config(cfg)
    if mesh is None:
        mesh = shd.make_mesh(cfg.mesh.to_dict())
    if make_data is None:
        make_data = _default_data(cfg, tokenizer)
    if evaluator is None and cfg.eval.enabled:
        if tokenizer is None:
            raise ValueError("evaluation needs a tokenizer; pass one or set cfg.eval.enabled=False")
        evaluator = Evaluator(cfg.eval, tokenizer)
    sink = MetricsSink(cfg.workdir, tensorboard=cfg.tensorboard)
    ckpt = Checkpointer(
        os.path.join(cfg.workdir, "checkpoints"), save_every=cfg.checkpoint_every, keep=cfg.checkpoint_keep
    )
    ckpt.install_preemption_handler()
    try:
        run = _Run.start(cfg, mesh, sink, ckpt, evaluator, teacher, student)
        return _run_stages(run, stages, make_data, on_step)
    finally:
        ckpt.close()  # waits for an async save in flight, restores signal handlers
        sink.close()


def _default_data(cfg, tokenizer) -> Callable[[Stage, int], Iterator]:
    if tokenizer is None:
        raise ValueError("distill() needs a tokenizer (or make_data) to build the data pipeline")
    n_proc = jax.process_count()

    def make_data(stage, index):
        if stage.batch_size % n_proc:
            raise ValueError(f"stage {stage.name!r}: batch {stage.batch_size} not divisible by {n_proc} processes")
        return data_lib.make_dataset(cfg.data, tokenizer, stage.seq_len, stage.batch_size // n_proc, seed=cfg.seed + index)

    return make_data


@dataclasses.dataclass
class _Run:
    """What the loop carries from stage to stage."""

    cfg: Any
    mesh: jax.sharding.Mesh
    sink: MetricsSink
    ckpt: Checkpointer
    evaluator: Callable | None
    teacher: nnx.Module
    teacher_graphdef: Any
    teacher_state: Any
    params: Any  # the student's nnx.Param state, sharded; each step donates and replaces it
    rest: Any  # the student's other state
    config: ModelConfig  # the student's, with the RoPE scalings of the stages so far
    dtype: Any
    param_dtype: Any
    history: dict

    @classmethod
    def start(cls, cfg, mesh, sink, ckpt, evaluator, teacher, student) -> "_Run":
        # The frozen teacher and the student are sharded by the same logical rules.
        teacher_graphdef, teacher_state = nnx.split(teacher)
        teacher_state = _on_mesh(teacher_state, mesh)
        _, params, rest = split_student(student)
        params, rest = _on_mesh(params, mesh), _on_mesh(rest, mesh)
        if cfg.assert_sharded and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
            shd.assert_params_sharded(params, mesh)
        return cls(
            cfg, mesh, sink, ckpt, evaluator, nnx.merge(teacher_graphdef, teacher_state), teacher_graphdef,
            teacher_state, params, rest, student.config, student.dtype, jax.tree.leaves(params)[0].dtype,
            {"stages": [], "evals": {}},
        )

    def graphdef(self):
        """The student's graph definition for its current config (RoPE scaling included)."""
        return split_student(abstract_model(self.config, dtype=self.dtype, param_dtype=self.param_dtype))[0]

    def student(self) -> nnx.Module:
        return nnx.merge(self.graphdef(), self.params, self.rest)

    def evaluate(self, name: str, model, *, with_teacher: bool = True, with_passkey: bool = True) -> None:
        if self.evaluator is None:
            return
        res = self.evaluator(model, self.teacher if with_teacher else None, with_passkey=with_passkey)
        self.history["evals"][name] = res
        self.sink.write({"event": "eval", "name": name, **res})
        log.info("eval %-14s %s", name, "  ".join(f"{k}={v:.4g}" for k, v in res.items()))


def _on_mesh(state, mesh):
    """State placed by its logical shardings; arrays already there (a model loaded under
    jax.set_mesh(mesh)) are kept as they are."""
    return shd.shard_state(state, shd.state_shardings(state, mesh))


def _run_stages(run: _Run, stages: list[Stage], make_data, on_step) -> dict[str, Any]:
    cfg = run.cfg
    ends = np.cumsum([s.steps for s in stages]).tolist()  # global step at the end of each stage
    resume_step = run.ckpt.latest_step or 0
    if resume_step == 0:
        run.evaluate("teacher", run.teacher, with_teacher=False, with_passkey=cfg.eval.passkey_teacher)
        run.evaluate("student_init", run.student(), with_passkey=cfg.eval.passkey_at_init)
    if resume_step >= ends[-1]:
        run.params = run.ckpt.restore(model=run.params, step=resume_step).trees["model"]
        log.info("all %d steps were already done (checkpoint %d)", ends[-1], resume_step)
    t_run = time.perf_counter()
    stopped = False
    for index, stage in enumerate(stages):
        run.config = student_config_for_stage(run.config, stage)  # it stays for the stages after
        last = index == len(stages) - 1
        if resume_step >= ends[index]:  # finished before the restart
            if last:  # the whole run was: measure the final student again
                run.evaluate(f"after_{stage.name}", run.student())
            continue
        stopped = _train_stage(run, stage, index, ends, resume_step, make_data, on_step)
        if stopped:
            break
        run.evaluate(f"after_{stage.name}", run.student(), with_passkey=last or cfg.eval.passkey_every_stage)
    run.history["student"] = run.student()
    run.history["stopped"] = stopped
    run.history["wall_s"] = time.perf_counter() - t_run
    if run.sink.active and not stopped:
        run.history["plot"] = plot_loss_curves(cfg.workdir)
    return run.history


def _train_stage(run: _Run, stage: Stage, index: int, ends, resume_step: int, make_data, on_step) -> bool:
    """Runs one stage's steps (from where a restart left it); True if pre-empted."""
    start = ends[index] - stage.steps  # global step before the stage's first
    stepfn = build_step(
        stage, run.graphdef(), run.teacher_graphdef, run.params, run.rest, run.teacher_state, run.mesh, run.cfg.optimizer
    )
    data_it = make_data(stage, index)
    step, opt_state = _resume(run, stage, start, resume_step, init_opt_state(stepfn, run.params), data_it)
    throughput = Throughput(stage, run.config, run.teacher.config, run.dtype, first_step=step)
    log.info(
        "stage %s (%s): %d steps x %d x %d tokens, lr %.2e, remat %s, MLA rope %s",
        stage.name, stage.kind, stage.steps, stage.batch_size, stage.seq_len, stage.lr, stage.remat,
        dict(stage.mla_rope_scaling) if stage.mla_rope_scaling else "unchanged",
    )
    while step < stage.steps:
        batch = _global_batch(next(data_it), stepfn.batch_sharding)
        run.params, opt_state, metrics = stepfn.step(run.params, opt_state, run.rest, run.teacher_state, batch)
        step += 1
        global_step = start + step
        record = None
        if step % run.cfg.log_every == 0 or step == stage.steps or step == 1:
            record = _log_step(run, stage, stepfn, throughput, step, global_step, ends[-1], metrics)
        if on_step is not None:
            on_step(global_step, record or {})
        run.ckpt.save(
            global_step, model=run.params, optimizer=opt_state, data_iter=data_it,
            extra={"stage": stage.name, "step_in_stage": step}, force=step == stage.steps,
        )
        if run.ckpt.stop_requested:
            log.warning("pre-empted: checkpoint at global step %d written, stopping", global_step)
            return True
    run.history["stages"].append({"name": stage.name, "compile_and_first_step_s": throughput.first_step_s})
    return False


def _resume(run: _Run, stage: Stage, start: int, resume_step: int, opt_state, data_it) -> tuple[int, Any]:
    """(step in stage, optimizer state) to go on from; restores params, optimizer and data
    iterator from the checkpoint when the run stopped inside or at the start of `stage`."""
    if resume_step > start:
        restored = run.ckpt.restore(model=run.params, optimizer=opt_state, data_iter=data_it, step=resume_step)
        run.params, opt_state = restored.trees["model"], restored.trees["optimizer"]
        log.info("resumed stage %s at step %d/%d", stage.name, resume_step - start, stage.steps)
        return resume_step - start, opt_state
    if resume_step == start and resume_step > 0:  # stopped at a stage boundary: a fresh optimizer
        run.params = run.ckpt.restore(model=run.params, step=resume_step).trees["model"]
        log.info("resumed at the start of stage %s", stage.name)
    return 0, opt_state


def _log_step(run: _Run, stage: Stage, stepfn: StepFn, throughput: Throughput, step: int, global_step: int,
              total_steps: int, metrics) -> dict:
    """The step's record (metrics, lr, speed) to the sinks and the console."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    speed = throughput.measure(step)
    record = {
        "event": "train", "stage": stage.name, "kind": stage.kind, "seq_len": stage.seq_len,
        "step": step, "global_step": global_step, "lr": float(stepfn.schedule(step - 1)), **speed, **metrics,
    }
    run.sink.write(record)
    mfu = speed.get("mfu")
    log.info(
        "[%s %d/%d] loss %.4g%s lr %.2e  %.0f tok/s%s  ETA %s",
        stage.name, step, stage.steps, metrics["loss"],
        f" kl {metrics['kl']:.4g}" if "kl" in metrics else "",
        record["lr"], speed["tokens_per_s"], f"  MFU {mfu:.1%}" if mfu is not None else "",
        "compiling" if step == 1 else _fmt_eta((total_steps - global_step) * speed["step_s"]),
    )
    return record


def _global_batch(local: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """This host's rows -> one global array per key (batch split over data x fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local.items()
        if k in ("input_ids", "positions", "segment_ids", "loss_mask")
    }


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
