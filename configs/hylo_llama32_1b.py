"""Llama-3.2-1B -> 4 MLA (layers 1, 5, 10, 14) + 12 GDN, HyLo's published sizes
(q_lora 1344, kv_lora 128, qk_rope 32, qk_nope 32, v_head 64; docs/DESIGN.md "Recipe facts").

  python -m hylo_jax.convert --config=configs/hylo_llama32_1b.py --config.source=/path/to/Llama-3.2-1B
"""

from hylo_jax.config_files import load_config


def get_config():
    config = load_config("convert")
    config.source = "meta-llama/Llama-3.2-1B"
    config.output_dir = "outputs/hylo_llama32_1b"
    config.student.mla_layers = "llama32_1b"
    config.student.mixer = "gdn"
    config.student.q_lora_rank = 1344
    config.student.kv_lora_rank = 128
    config.student.qk_rope_head_dim = 32
    return config
