"""The gated feed-forward block of Llama and Qwen: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hylo_jax.layers.linear import Linear


class MLP(nnx.Module):
    """params gate_proj, up_proj [D, F] ("embed", "mlp") and down_proj [F, D]."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        use_bias: bool = False,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
