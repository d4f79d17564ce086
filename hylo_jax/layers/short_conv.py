"""Short causal depthwise convolution shared by the Mamba2 and Gated DeltaNet blocks.

Both blocks run a width-K (typically 4) depthwise conv along time, followed by SiLU,
before their recurrence. One function covers every use: a full sequence (training),
a chunk after a cache (chunked prefill) and a single token (decode). The cache is the
last K-1 *inputs* seen, as in Hugging Face's and causal-conv1d's conv state.

With packed `segment_ids` a tap that reaches into an earlier segment is dropped, so
documents never see each other through the conv (the recurrence restarts there too).
Inputs taken from a cache count as part of the chunk's first segment (the cache
continues that document), and the returned cache keeps only inputs of the chunk's
last segment.

Kernel layout is [K, C] (tap k multiplies x[t - (K-1) + k]); Hugging Face and
flash-linear-attention store the same numbers as conv1d weight [C, 1, K].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hylo_jax.layers.linear import init_param
from pallas_kernels._common import segment_index


def _torch_conv_init(key, shape, dtype):
    """U(-1/sqrt(K), 1/sqrt(K)): PyTorch's default for a depthwise Conv1d (fan_in = K)."""
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class ShortConv(nnx.Module):
    """Depthwise causal conv1d over `channels`; params `kernel` [K, C] and optional `bias` [C]."""

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        use_bias: bool,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        if kernel_size < 1:
            raise ValueError(f"conv kernel_size must be >= 1, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.kernel = init_param(rngs, _torch_conv_init, (kernel_size, channels), ("conv", "heads"), param_dtype)
        # Mamba2 zero-initialises its conv bias (HF Mamba2PreTrainedModel._init_weights).
        self.bias = (
            init_param(rngs, nnx.initializers.zeros_init(), (channels,), ("heads",), param_dtype)
            if use_bias
            else None
        )


def causal_conv1d(
    x_btc: jax.Array,
    kernel_kc: jax.Array,
    bias_c: jax.Array | None = None,
    conv_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """silu(depthwise causal conv) of x [B, T, C] -> (y [B, T, C] in x.dtype, new conv state).

    conv_state: [B, K-1, C] inputs that precede x (None: zeros, i.e. a fresh sequence).
    The new state [B, K-1, C] is the last K-1 inputs (state then x), in x.dtype.
    Accumulates in float32.
    """
    b, t, c = x_btc.shape
    k = kernel_kc.shape[0]
    if kernel_kc.shape != (k, c):
        raise ValueError(f"conv kernel must be [K, {c}] for {c} channels, got {kernel_kc.shape}")
    if conv_state is None:
        conv_state = jnp.zeros((b, k - 1, c), x_btc.dtype)
    if conv_state.shape != (b, k - 1, c):
        raise ValueError(f"conv state must be [batch, K-1, channels] = {(b, k - 1, c)}, got {conv_state.shape}")
    xpad = jnp.concatenate([conv_state.astype(x_btc.dtype), x_btc], axis=1)  # [B, K-1+T, C]
    w = kernel_kc.astype(jnp.float32)
    if segment_ids is not None:
        if segment_ids.shape != (b, t):
            raise ValueError(f"segment_ids must be [batch, time] = {(b, t)}, got {segment_ids.shape}")
        seg = segment_index(segment_ids)
        # The cached inputs belong to the chunk's first segment (index 0).
        segpad = jnp.concatenate([jnp.zeros((b, k - 1), seg.dtype), seg], axis=1)
    y = jnp.zeros((b, t, c), jnp.float32)
    for j in range(k):  # K is tiny (4): an unrolled sum of shifted slices
        tap = xpad[:, j : j + t].astype(jnp.float32)
        if segment_ids is not None:
            tap = jnp.where((segpad[:, j : j + t] == seg)[..., None], tap, 0.0)
        y = y + tap * w[j]
    if bias_c is not None:
        y = y + bias_c.astype(jnp.float32)
    new_state = xpad[:, t:]
    if segment_ids is not None:
        # Only the last document continues into the next chunk.
        new_state = jnp.where((segpad[:, t:] == seg[:, -1:])[..., None], new_state, 0)
    return jax.nn.silu(y).astype(x_btc.dtype), new_state
