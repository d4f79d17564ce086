"""Conversion between checkpoints and hylo_jax models.

Readers (safetensors, GGUF), the one HF-name <-> NNX-path mapping table that drives
both import and export, path resolution (local dir / .gguf / hub id) and the HF
directory exporter. `hylo_jax.load_model` is the import entry point; the CLI is
`python -m hylo_jax.convert`.
"""

from hylo_jax.convert.export import export_model

__all__ = ["export_model"]
