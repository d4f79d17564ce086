"""Compile time of the distillation train steps (and of their parts), on this machine.

Builds the teacher and the hybrid student of a student config.json (only that file is
read; the models are abstract, built with nnx.eval_shape, so no weights are loaded),
then lowers and compiles the stage-1 ("align") and stage-2 ("kl") steps exactly as
hylo_jax/distill/train_step.py builds them (`train_step.build_step`: one jit with shardings,
donated params and optimizer state, teacher inside the step). Each row: the lower time,
the compile time (wall and CPU), the size of the optimized HLO (count of instructions)
and the temporary memory it asks for. `--split` also compiles each step's loss +
gradients and its optimizer update on their own; `--parts` also times the pieces: one
GDN layer and one MLA layer (forward + backward, rematerialised as in the stage), the
chunked KL loss alone, and the teacher's forward alone.

The persistent compilation cache is off, so every number is a cold compile. On CPU the
GDN kernel is the chunked pure-JAX form (impl "xla"); a GPU run uses the Pallas form.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hylo_jax import sharding as shd
from hylo_jax.config import ModelConfig
from hylo_jax.distill import losses, stages, train_step
from hylo_jax.models.decoder import abstract_model
from tools.bench.harness import REPO, Column, Report, add_report_arguments

COLUMNS = (Column("name", "what"), Column("lower_s", "lower (s)", "{:.2f}"),
           Column("compile_s", "compile (s)", "{:.2f}"), Column("compile_cpu_s", "compile CPU (s)", "{:.2f}"),
           Column("hlo_ops", "HLO ops"), Column("temp_gib", "temp (GiB)", "{:.2f}"))


_INSTR = re.compile(r"^\s*(ROOT\s+)?%?[\w.\-]+\s*=\s", re.M)


def hlo_ops(compiled) -> int:
    """Instructions in the optimized HLO text (all computations, fusions included)."""
    return len(_INSTR.findall(compiled.as_text()))


def measure(report, name: str, jitted, *args) -> None:
    """Lower and compile; wall and CPU seconds (the CPU time of this process is less
    disturbed by other jobs on a shared machine than the wall time)."""
    w0 = time.perf_counter()
    lowered = jitted.lower(*args)
    w1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    w2, c2 = time.perf_counter(), time.process_time()
    mem = compiled.memory_analysis()  # what the step needs beyond its arguments (activations, gradients)
    report.row(name=name, lower_s=w1 - w0, compile_s=w2 - w1, compile_cpu_s=c2 - c1, hlo_ops=hlo_ops(compiled),
               temp_gib=None if mem is None else mem.temp_size_in_bytes / 2**30)


def teacher_config(student: ModelConfig) -> ModelConfig:
    return student.replace(layer_types=("attention",) * student.num_hidden_layers, mla=None, gdn=None, mamba2=None)


def with_shardings(state, mesh):
    """ShapeDtypeStructs carrying the NamedShardings train.distill would give them."""
    shardings = shd.state_shardings(state, mesh)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def abstract_batch(b, t, sharding):
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sharding)
    return {"input_ids": ids, "positions": ids, "segment_ids": ids,
            "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=sharding)}


def bench_stage(report, kind, args, student, teacher, mesh, opt_cfg):
    stage = stages.Stage(name=kind, kind=kind, seq_len=args.seq, steps=10, batch_size=args.batch, lr=1e-4,
                        warmup_steps=1, remat=args.remat, kl_chunk=args.kl_chunk)
    graphdef, params, rest = train_step.split_student(student)
    t_graphdef, t_state = nnx.split(teacher)
    params, rest, t_state = (with_shardings(s, mesh) for s in (params, rest, t_state))
    stepfn = train_step.build_step(stage, graphdef, t_graphdef, params, rest, t_state, mesh, opt_cfg)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       jax.eval_shape(stepfn.tx.init, params), stepfn.opt_shardings)
    batch = abstract_batch(args.batch, args.seq, stepfn.batch_sharding)
    measure(report, f"stage {kind} step", stepfn.step, params, opt, rest, t_state, batch)
    if args.split:  # the step's two halves on their own: loss + gradients, optimizer update

        def loss_and_grad(params, rest, t_state, batch):
            def loss_fn(p):
                return train_step.stage_loss(stage, nnx.merge(graphdef, p, rest), nnx.merge(t_graphdef, t_state), batch)

            return jax.value_and_grad(loss_fn, has_aux=True)(params)

        def update(grads, opt, params):
            updates, opt = stepfn.tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        measure(report, f"  {kind} loss + grad only", jax.jit(loss_and_grad), params, rest, t_state, batch)
        measure(report, f"  {kind} optimizer only", jax.jit(update), params, opt, params)


def bench_parts(report, args, student, teacher, dtype):
    b, t, d = args.batch, args.seq, student.config.hidden_size
    h = jax.ShapeDtypeStruct((b, t, d), dtype)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.float32)
    for kind in ("gdn", "mla"):
        i = student.config.layer_types.index(kind)
        gd, state = nnx.split(student.model.layers[i])

        def layer_loss(state, h, positions, segment_ids, gd=gd):
            layer = nnx.merge(gd, state)
            h_out, mixer_out = losses._layer_call(layer, h, positions, segment_ids, args.remat)
            return jnp.sum(h_out.astype(jnp.float32)) + jnp.sum(mixer_out.astype(jnp.float32))

        measure(report, f"one {kind} layer fwd+bwd", jax.jit(jax.grad(layer_loss, argnums=(0, 1))), state, h, ids, ids)

    gs, s_state = nnx.split(student)
    gt, t_state = nnx.split(teacher)

    def kl_only(s_state, t_state, h_s, h_t, mask):
        sums = losses.chunked_kl_and_ce(nnx.merge(gs, s_state), nnx.merge(gt, t_state), h_s, h_t, mask,
                                        kl_chunk=args.kl_chunk)
        return sums["kl_sum"]

    measure(report, "chunked KL fwd+bwd", jax.jit(jax.grad(kl_only, argnums=(0, 2))), s_state, t_state, h, h, mask)

    def teacher_fwd(t_state, ids, positions, segment_ids):
        return nnx.merge(gt, t_state).hidden(ids, positions, segment_ids)

    measure(report, "teacher forward", jax.jit(teacher_fwd), t_state, ids, ids, ids)

    def teacher_collect(t_state, ids, positions, segment_ids):
        return nnx.merge(gt, t_state).model(ids, positions, segment_ids, collect=True)[2]

    measure(report, "teacher forward (collect)", jax.jit(teacher_collect), t_state, ids, ids, ids)


def add_arguments(p):
    p.add_argument("--config", default=os.path.join(REPO, "outputs", "hylo_smollm2", "config.json"),
                   help="the student's config.json (default: the one `python -m hylo_jax.convert` writes)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="full", choices=tuple(losses.REMAT_POLICIES))
    p.add_argument("--kl-chunk", type=int, default=256)
    p.add_argument("--stages", default="align,kl", help="comma-separated stage kinds to compile")
    p.add_argument("--parts", action="store_true", help="also time one GDN / MLA layer, the KL, the teacher")
    p.add_argument("--split", action="store_true", help="also time each stage's loss+grad and optimizer alone")
    add_report_arguments(p)


def run(args):
    if not os.path.exists(args.config):
        raise SystemExit(f"no student config at {args.config}: write one with `python -m hylo_jax.convert` "
                         "or point --config at a config.json")
    jax.config.update("jax_enable_compilation_cache", False)
    with open(args.config) as f:
        s_cfg = ModelConfig.from_hf_config(json.load(f))
    dtype = jnp.dtype(args.dtype)
    student = abstract_model(s_cfg, dtype=dtype)
    teacher = abstract_model(teacher_config(s_cfg), dtype=dtype)
    report = Report(COLUMNS, args.json, args.markdown, model=(
        f"student {s_cfg.layer_types.count('mla')} MLA + {s_cfg.layer_types.count('gdn')} GDN of "
        f"{s_cfg.num_hidden_layers} layers; B={args.batch} T={args.seq} {args.dtype} remat={args.remat}"))

    spec = importlib.util.spec_from_file_location("distill_cfg", os.path.join(REPO, "configs", "distill.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    opt_cfg = module.get_config().optimizer
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})

    for kind in [k.strip() for k in args.stages.split(",") if k.strip()]:
        bench_stage(report, kind, args, student, teacher, mesh, opt_cfg)
    if args.parts:
        bench_parts(report, args, student, teacher, dtype)
