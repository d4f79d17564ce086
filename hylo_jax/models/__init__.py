"""Models: the decoder-only CausalLM shared by teachers and hybrid students."""

from hylo_jax.models.decoder import CausalLM, DecoderLayer, DecoderModel, default_positions

__all__ = ["CausalLM", "DecoderLayer", "DecoderModel", "default_positions"]
