"""Command line: `python -m hylo_jax.distill --config=configs/distill.py [--config.x=y ...]`.

Loads the teacher and the student (a hylo_jax checkpoint, e.g. from
`python -m hylo_jax.convert`), runs the stages of the config (resuming from
`workdir/checkpoints` if a run was interrupted), writes `workdir/summary.json` and,
if `export_dir` is set, the distilled student as an HF-style directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from hylo_jax.config_files import define_config_flag


def run(cfg) -> dict:
    """Everything the CLI does, callable from Python; returns the summary dict."""
    # Imported here, not at the top: `--help` answers without loading JAX.
    import jax
    import jax.numpy as jnp

    from hylo_jax import sharding
    from hylo_jax.convert.export import export_model
    from hylo_jax.convert.hub import load_tokenizer, resolve
    from hylo_jax.convert.loading import load_model
    from hylo_jax.distill import train

    sharding.maybe_initialize_distributed(cfg.distributed.to_dict())
    if not cfg.student:
        raise ValueError(
            "config.student is empty: give a hylo_jax student checkpoint dir, e.g. one written by "
            "`python -m hylo_jax.convert --config.output_dir=DIR --config.student.mla_layers=...`"
        )
    teacher_source = resolve(cfg.teacher or None)
    dtype = jnp.dtype(cfg.dtype)
    # The mesh first: both models are read straight onto their shards, never whole on one device.
    mesh = sharding.make_mesh(cfg.mesh.to_dict())
    with jax.set_mesh(mesh):
        teacher = load_model(teacher_source.path, dtype=dtype, progress=False)
        student = load_model(cfg.student, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype), progress=False)
    tokenizer = load_tokenizer(teacher_source)
    logging.info(
        "teacher %s (%d layers), student %s: %s; %d devices (%s), mesh %s",
        teacher_source.path, teacher.config.num_hidden_layers, cfg.student,
        ",".join(student.config.layer_types), jax.device_count(), jax.devices()[0].device_kind, dict(mesh.shape),
    )
    history = train.distill(cfg, teacher=teacher, student=student, mesh=mesh, tokenizer=tokenizer)
    summary = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "stopped_early": history["stopped"],
        "evals": history["evals"],
        "stages": history["stages"],
        "wall_s": history["wall_s"],
    }
    if jax.process_index() == 0:
        with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if cfg.export_dir and not history["stopped"]:
        summary["export_dir"] = export_model(history["student"], cfg.export_dir, tokenizer_from=teacher_source.path)
    return summary


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO
    try:
        summary = run(_CONFIG.value)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps({k: v for k, v in summary.items() if k != "stages"}, indent=1))


if __name__ == "__main__":
    _CONFIG = define_config_flag("distill", "ml_collections config file with get_config() (default configs/distill.py)")
    flags.declare_key_flag("config")  # --help lists it
    app.run(main)
