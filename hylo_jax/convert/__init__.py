"""Conversion between checkpoints and hylo_jax models.

Readers (safetensors, GGUF), the one HF-name <-> NNX-path mapping table that drives
both import (`loading`, whose `load_model` is `hylo_jax.load_model`) and export, path
resolution and tokenizer loading (`hub`), upcycling a teacher into a hybrid student
(`upcycle`, `layer_selection`, `mla_init`, `linear_init`) and the convert job around it
(`job`, `report`). The CLI is `python -m hylo_jax.convert`.
"""

from hylo_jax.convert.export import export_model

__all__ = ["export_model"]
