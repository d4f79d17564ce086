"""Llama-3.2-3B -> 6 MLA (layers 0, 5, 10, 16, 21, 26) + 22 GDN, HyLo's published sizes
(q_lora 1536, kv_lora 128, qk_rope 64, qk_nope 64, v_head 128; docs/DESIGN.md "Recipe facts").

  python -m hylo_jax.convert --config=configs/hylo_llama32_3b.py --config.source=/path/to/Llama-3.2-3B
"""

from hylo_jax.config_files import load_config


def get_config():
    config = load_config("convert")
    config.source = "meta-llama/Llama-3.2-3B"
    config.output_dir = "outputs/hylo_llama32_3b"
    config.student.mla_layers = "llama32_3b"
    config.student.mixer = "gdn"
    config.student.q_lora_rank = 1536
    config.student.kv_lora_rank = 128
    config.student.qk_rope_head_dim = 64
    return config
