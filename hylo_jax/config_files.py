"""The ml_collections files in the repository's configs/ folder, by name.

Config files are loaded by path (absl's DEFINE_config_file), so a variant cannot import
its base as a module; it calls `load_config("convert")` and changes only what differs.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

CONFIG_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "configs"))


def config_path(name: str) -> str:
    path = os.path.join(CONFIG_DIR, f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file {path}")
    return path


def load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"hylo_configs_{name}", config_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str):
    """`configs/<name>.py`'s get_config()."""
    return load_module(name).get_config()


def _unknown_overrides(argv: list[str], default_name: str) -> list[str]:
    """The `--config.a.b=v` flags in argv whose field does not exist in the config, each
    with the fields that do exist at that level."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), config_path(default_name))
    try:
        spec = importlib.util.spec_from_file_location("hylo_configs_cli", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception:  # the flag itself will report a bad config file
        return []
    unknown = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node = config
        for key in arg[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or key not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                unknown.append(f"{arg.split('=', 1)[0][2:]} (fields there: {known})")
                break
            node = node[key]
    return unknown


def define_config_flag(default_name: str, help_string: str):
    """absl's `--config` flag (locked ml_collections file, `--config.x=y` overrides).

    ml_collections applies the overrides while the flag is defined and names only the
    last key of a misspelt field; this exits with the whole field path instead.
    """
    import sys

    from ml_collections import config_flags

    try:
        return config_flags.DEFINE_config_file(
            "config", default=config_path(default_name), help_string=help_string, lock_config=True
        )
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        unknown = _unknown_overrides(sys.argv[1:], default_name)
        what = f"unknown config field(s) {'; '.join(unknown)}" if unknown else f"bad --config override ({e})"
        sys.exit(f"error: {what}; run with --help to list the fields and their defaults")


def run_cli(main) -> None:
    """absl's `app.run(main)`, except that `--help` exits with status 0 (absl exits 1)."""
    import sys

    from absl import app

    try:
        app.run(main)
    except SystemExit as e:
        if e.code == 1 and any(a in ("--help", "-?", "--helpshort", "--helpfull") for a in sys.argv[1:]):
            sys.exit(0)
        raise
