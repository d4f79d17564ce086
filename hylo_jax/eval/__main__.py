"""Command line: `python -m hylo_jax.eval [--config=configs/eval.py] [--config.x=y ...]`.

  python -m hylo_jax.eval --config.models=,outputs/hylo_smollm2 --config.lengths=1024,4096,16384
  python -m hylo_jax.eval --config.tasks=niah_single_number --config.lengths=1024,2048 --config.samples=20

Evaluates the models of --config.models (an empty entry is the default teacher) side
by side on RULER-style tasks over real text, the loss by position and short-context
quality, and writes results.json / results.md / results.png / samples.jsonl to
--config.output_dir (hylo_jax/eval/suite.py). Every field can be overridden with
--config.<field>=<value>; unknown fields are errors.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from hylo_jax.config_files import define_config_flag, load_config, run_cli


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from hylo_jax.eval import suite

    try:
        suite.run(_CONFIG.value)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    out = _CONFIG.value.output_dir
    print(open(f"{out}/results.md").read())
    print(f"wrote {out}/results.json, results.md, results.png, samples.jsonl")


if __name__ == "__main__":
    _CONFIG = define_config_flag(
        "eval", "ml_collections config file (get_config()). Fields and defaults:\n" + str(load_config("eval"))
    )
    flags.declare_key_flag("config")  # --help lists it
    run_cli(main)
