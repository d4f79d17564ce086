"""Inference: chunked prefill, sampling and streaming generation, and the tokenizer,
chat template and special ids of a checkpoint."""

from hylo_jax.inference.generation import Generation, generate, prefill
from hylo_jax.inference.text import generation_defaults, load_tokenizer

__all__ = ["Generation", "generate", "generation_defaults", "load_tokenizer", "prefill"]
