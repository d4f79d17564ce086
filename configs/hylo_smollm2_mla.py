"""SmolLM2-135M -> all 30 layers MLA (no linear layers): the MLA init on its own.

With kv_lora_rank 96 + a 32-dim RoPE key, the cache is 30 x 128 elements per token,
1/3 of the teacher's. python -m hylo_jax.convert --config=configs/hylo_smollm2_mla.py
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
    config.output_dir = "outputs/hylo_smollm2_mla"
    config.student.mixer = "mla"
    return config
