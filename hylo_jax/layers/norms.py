"""RMS normalisation layers, computed in float32 like Hugging Face's.

`RMSNorm` is LlamaRMSNorm / Qwen2RMSNorm / Qwen3RMSNorm. `RMSNormGated` is the gated
output norm of the linear mixers: Mamba2 gates *before* normalising (mamba_ssm
`norm_before_gate=False`, optionally per group of channels); Gated DeltaNet normalises
*before* gating (flash-linear-attention FusedRMSNormGated, Qwen3-Next).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hylo_jax.layers.linear import make_param


def _rms_normalize(x32: jax.Array, eps: float) -> jax.Array:
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """weight * x / sqrt(mean(x^2) + eps) over the last axis; param `weight` [dim]."""

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32, param_dtype=jnp.float32):
        self.dim = dim
        self.eps = eps
        self.dtype = dtype
        self.weight = make_param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm over {self.dim} features got input of shape {x.shape}")
        # As in HF: normalise in float32, cast back, then scale.
        y = _rms_normalize(x.astype(jnp.float32), self.eps).astype(self.dtype)
        return self.weight[...].astype(self.dtype) * y


class RMSNormGated(nnx.Module):
    """Gated RMSNorm `norm(x, z)`; param `weight` [dim].

    norm_before_gate=False (Mamba2):  weight * RMSNorm_groups(x * silu(z))
    norm_before_gate=True  (GDN):     weight * RMSNorm(x) * silu(z)
    `group_size` normalises each consecutive group of channels on its own (Mamba2 with
    n_groups > 1); None means one group over the whole last axis.
    """

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-6,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        group_size = group_size or dim
        if dim % group_size:
            raise ValueError(f"RMSNormGated: dim={dim} is not a multiple of group_size={group_size}")
        self.dim = dim
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.dtype = dtype
        self.weight = make_param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        if x.shape[-1] != self.dim or z.shape != x.shape:
            raise ValueError(f"RMSNormGated({self.dim}) got x {x.shape} and gate z {z.shape}")
        weight = self.weight[...].astype(self.dtype)
        gate = jax.nn.silu(z.astype(jnp.float32))
        x32 = x.astype(jnp.float32)
        if self.norm_before_gate:
            y = weight * _rms_normalize(x32, self.eps).astype(self.dtype)
            return (y.astype(jnp.float32) * gate).astype(self.dtype)
        h = x32 * gate
        groups = h.reshape(*h.shape[:-1], self.dim // self.group_size, self.group_size)
        h = _rms_normalize(groups, self.eps).reshape(h.shape)
        return weight * h.astype(self.dtype)
