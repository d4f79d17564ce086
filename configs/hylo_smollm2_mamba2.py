"""SmolLM2-135M -> 8 MLA + 22 Mamba2 (the default MLA + GDN recipe with Mamba2 instead).

  python -m hylo_jax.convert --config=configs/hylo_smollm2_mamba2.py
"""

import importlib.util
import os


def _base():
    spec = importlib.util.spec_from_file_location("convert_base", os.path.join(os.path.dirname(__file__), "convert.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = _base()
    config.output_dir = "outputs/hylo_smollm2_mamba2"
    config.student.mixer = "mamba2"
    return config
