"""Layers: dense blocks, norms, RoPE, MLP, attention (MLA and linear mixers in their own modules)."""

from hylo_jax.layers.attention import Attention, AttentionCache, causal_attention, dot_product_attention
from hylo_jax.layers.linear import Embed, Linear, init_param, make_param
from hylo_jax.layers.mlp import MLP
from hylo_jax.layers.norms import RMSNorm, RMSNormGated
from hylo_jax.layers.rope import RoPE, apply_rope, compute_inv_freq, rope_cos_sin, rope_pair_dims

__all__ = [
    "Attention",
    "AttentionCache",
    "Embed",
    "Linear",
    "MLP",
    "RMSNorm",
    "RMSNormGated",
    "RoPE",
    "apply_rope",
    "causal_attention",
    "compute_inv_freq",
    "dot_product_attention",
    "init_param",
    "make_param",
    "rope_cos_sin",
    "rope_pair_dims",
]
