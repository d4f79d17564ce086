"""SmolLM2-135M -> 8 MLA + 22 Mamba2 (the default MLA + GDN recipe with Mamba2 instead).

  python -m hylo_jax.convert --config=configs/hylo_smollm2_mamba2.py
"""

from hylo_jax.config_files import load_config


def get_config():
    config = load_config("convert")
    config.output_dir = "outputs/hylo_smollm2_mamba2"
    config.student.mixer = "mamba2"
    return config
