"""SmolLM2-135M -> all 30 layers MLA (no linear layers): the MLA init on its own.

With kv_lora_rank 96 + a 32-dim RoPE key, the cache is 30 x 128 elements per token,
1/3 of the teacher's. python -m hylo_jax.convert --config=configs/hylo_smollm2_mla.py
"""

from hylo_jax.config_files import load_config


def get_config():
    config = load_config("convert")
    config.output_dir = "outputs/hylo_smollm2_mla"
    config.student.mixer = "mla"
    return config
