"""Dense building blocks (Linear, Embed) and the helpers that create parameters.

Every parameter carries logical axis names (metadata `out_sharding`, formerly `sharding_names`), e.g. ("embed", "heads");
hylo_jax/sharding.py maps them onto a mesh. Layers never name mesh axes themselves.
Weights are stored in `param_dtype` and cast to the compute `dtype` at use.
Layouts follow the checkpoint names: `kernel` is [in, out] (= the HF weight, transposed).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

# Hugging Face models initialise linear and embedding weights with N(0, 0.02).
default_kernel_init: Initializer = nnx.initializers.normal(stddev=0.02)
default_embed_init: Initializer = nnx.initializers.normal(stddev=0.02)


def make_param(value, axes: Sequence[str | None]) -> nnx.Param:
    """Wraps `value` as an nnx.Param annotated with one logical axis name per dim.

    The names are metadata only (Flax's eager sharding is off): hylo_jax.sharding maps
    them onto a mesh, so a model builds the same with or without a mesh in context.
    """
    axes = tuple(axes)
    if len(axes) != len(value.shape):
        raise ValueError(f"axes {axes} do not match parameter shape {tuple(value.shape)}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def init_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    param_dtype=jnp.float32,
) -> nnx.Param:
    """A freshly initialised parameter with logical axis names."""
    return make_param(init(rngs.params(), tuple(shape), param_dtype), axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out] with logical `axes=(in_axis, out_axis)`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = False,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = nnx.initializers.zeros_init(),
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.kernel = init_param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = init_param(rngs, bias_init, (out_features,), axes[1:], param_dtype) if use_bias else None

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        """`out_dtype` (e.g. float32 for logits) sets the accumulation/result type."""
        out_dtype = out_dtype or self.dtype
        y = jnp.einsum(
            "...i,io->...o",
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            preferred_element_type=out_dtype,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(out_dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table `embedding` [vocab, embed]; `attend` is the tied lm_head."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        embedding_init: Initializer = default_embed_init,
    ):
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.embedding = init_param(
            rngs, embedding_init, (num_embeddings, features), ("vocab", "embed"), param_dtype
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, *, out_dtype=jnp.float32) -> jax.Array:
        """x [..., D] -> logits [..., V] against the embedding table (tied weights)."""
        return jnp.einsum(
            "...d,vd->...v",
            x.astype(self.dtype),
            self.embedding[...].astype(self.dtype),
            preferred_element_type=out_dtype,
        )
