"""One distillation step as a sharded `jax.jit`.

The step has explicit NamedShardings for the student's params, the optimizer state
(inferred from the params'), the frozen teacher (sharded by the same logical rules) and
the batch; params and optimizer state are donated. The teacher runs inside the same
step, so its activations never leave the device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx

from hylo_jax import sharding as shd
from hylo_jax.distill import losses
from hylo_jax.distill.stages import Stage, make_optimizer


def stage_loss(stage: Stage, student, teacher, batch):
    if stage.kind == "align":
        return losses.layer_alignment_loss(student, teacher, batch, remat=stage.remat)
    return losses.kl_distill_loss(
        student,
        teacher,
        batch,
        temperature=stage.temperature,
        ce_weight=stage.ce_weight,
        kl_chunk=stage.kl_chunk,
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
