"""Qwen3-1.7B -> 7 MLA (layers 1, 5, 9, ..., 25) + 21 GDN, HyLo's published sizes
(q_lora 1344, kv_lora 256, qk_rope 64, qk_nope 64, v_head 128; docs/DESIGN.md "Recipe facts").

Qwen3's per-head q_norm/k_norm cannot pass through the MLA latent: their weights are
folded into the projections and the normalisation is dropped (see mla_init), so this
student starts further from its teacher than a Llama one; distillation recovers it.

  python -m hylo_jax.convert --config=configs/hylo_qwen3_1p7b.py --config.source=/path/to/Qwen3-1.7B
"""

from hylo_jax.config_files import load_config


def get_config():
    config = load_config("convert")
    config.source = "Qwen/Qwen3-1.7B"
    config.output_dir = "outputs/hylo_qwen3_1p7b"
    config.student.mla_layers = "qwen3_1p7b"
    config.student.mixer = "gdn"
    config.student.q_lora_rank = 1344
    config.student.kv_lora_rank = 256
    config.student.qk_rope_head_dim = 64
    return config
