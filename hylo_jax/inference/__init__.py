"""Inference: cached prefill and greedy generation."""

from hylo_jax.inference.generate import generate, prefill

__all__ = ["generate", "prefill"]
