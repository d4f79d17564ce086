"""hylo_jax: upcycle pretrained Llama/Qwen Transformers into long-context MLA +
linear-attention hybrids (HyLo), JAX-native."""

from hylo_jax.convert.loading import load_model

__all__ = ["load_model"]
