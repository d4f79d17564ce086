"""Import a teacher, upcycle it into a hybrid student, export an HF-style directory.

  python -m hylo_jax.convert          # SmolLM2-135M -> 8 MLA + 22 GDN in outputs/hylo_smollm2
  python -m hylo_jax.convert --config=configs/hylo_llama32_1b.py --config.source=/path/to/Llama-3.2-1B
  # no upcycling: import and export the teacher as is
  python -m hylo_jax.convert --config.source=/path/to/hf_dir --config.output_dir=/tmp/out --config.student.mla_layers=

Config: configs/convert.py (another file with get_config() via --config=path); every
field can be overridden with --config.<field>=<value>; unknown fields are errors. The
source is an HF dir, a .gguf file, a hub id or a hylo_jax checkpoint; an empty source is
the bundled SmolLM2-135M-Instruct GGUF. The output holds the model, its tokenizer and,
for a hybrid, report.json / report.md.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from hylo_jax.config_files import define_config_flag, load_config


def _define_config_flag():
    return define_config_flag(
        "convert", "ml_collections config file (get_config()). Fields and defaults:\n" + str(load_config("convert"))
    )


def convert(config) -> str:
    """Runs the conversion a config describes; returns the output directory."""
    # Imported here, not at the top: `--help` answers without loading JAX.
    import jax.numpy as jnp

    from hylo_jax.config import ModelConfig
    from hylo_jax.convert import job
    from hylo_jax.convert.export import export_model
    from hylo_jax.convert.hub import load_tokenizer, resolve
    from hylo_jax.convert.loading import load_model, open_source
    from hylo_jax.convert.report import write_report

    if not config.output_dir:
        raise ValueError("config.output_dir is required (--config.output_dir=/path/to/out)")
    source = resolve(config.source or None)

    def export(model) -> str:
        return export_model(
            model,
            config.output_dir,
            tokenizer_from=source.path,
            dtype=config.export_dtype or None,
            max_shard_bytes=int(config.max_shard_size_gb * 1024**3),
            overwrite=config.overwrite,
        )

    if not job.wants_upcycling(config.student):
        return export(load_model(source.path, dtype=jnp.dtype(config.dtype)))
    out = os.path.abspath(config.output_dir)
    if os.path.isdir(out) and os.listdir(out) and not config.overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty (--config.overwrite=true replaces it)")
    # Check the student config against the teacher's config.json before loading weights.
    hf_config, _ = open_source(source)
    job.student_config_from_settings(ModelConfig.from_hf_config(hf_config), config.student)
    teacher = load_model(source.path, dtype=jnp.dtype(config.dtype))
    student, report = job.upcycle_job(teacher, config.student, tokenizer=load_tokenizer(source))
    out = export(student)
    _, md = write_report(report, out)
    print(open(md).read())
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    try:
        out = convert(_CONFIG.value)
    except (FileNotFoundError, FileExistsError, ValueError, NotImplementedError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    _CONFIG = _define_config_flag()
    flags.declare_key_flag("config")  # --help lists it
    app.run(main)
