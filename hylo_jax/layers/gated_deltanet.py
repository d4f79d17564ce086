"""Gated DeltaNet block (the `linear_attn.` of a "gdn" layer), as flash-linear-attention's
GatedDeltaNet layer (use_gate=True, use_short_conv=True, one key head per value head).

    q, k, v = silu(conv(q_proj(u))), silu(conv(k_proj(u))), silu(conv(v_proj(u)))
    q, k    = l2norm(q), l2norm(k)                      per head
    beta    = sigmoid(b_proj(u));  g = -exp(A_log) * softplus(a_proj(u) + dt_bias)
    S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t     = K^-1/2 S_t^T q_t                          (pallas_kernels.gated_delta_rule)
    out     = o_proj(o_norm(o, g_proj(u)))              RMSNorm per head, then * silu(gate)

Parameter names follow fla (q_proj, k_proj, v_proj, a_proj, b_proj, g_proj, q_conv1d,
k_conv1d, v_conv1d, A_log, dt_bias, o_norm, o_proj). Upcycled from attention
(hylo_jax/convert/linear_init.py), q/k/v/o start as the teacher's; q/k/v and o carry a
bias iff the teacher's do (Qwen2). The three short convs run as one conv over the
concatenated channels [q | k | v], which is also the layout of the cache's conv state.

The same call serves training (cache=None, chunked kernel), chunked prefill (cache, T >
1) and decode (cache, T == 1: one recurrence step). The recurrent state in the cache is
float32 whatever the model dtype, because it accumulates over the whole context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hylo_jax.config import ModelConfig
from hylo_jax.layers.linear import Linear, init_param
from hylo_jax.layers.mamba2 import a_log_init, dt_bias_init
from hylo_jax.layers.norms import RMSNormGated
from hylo_jax.layers.short_conv import ShortConv, causal_conv1d
from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule_step

# fla's l2norm epsilon (x / sqrt(sum x^2 + eps)).
L2NORM_EPS = 1e-6


@struct.dataclass
class GDNCache:
    """conv [B, K-1, 2*H*Dk + H*Dv]: last inputs of the q|k|v convs; state [B, H, Dk, Dv] float32."""

    conv: jax.Array
    state: jax.Array


def l2norm(x: jax.Array) -> jax.Array:
    """x / sqrt(sum(x^2) + eps) over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + L2NORM_EPS)).astype(x.dtype)


class GatedDeltaNet(nnx.Module):
    """GDN mixer for `config.gdn`; `y, cache = block(x, positions, segment_ids, cache)`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = config.gdn
        if cfg is None:
            raise ValueError("GatedDeltaNet needs config.gdn (a GDNConfig); the config has none")
        self.cfg = cfg
        self.dtype = dtype
        self.key_dim = cfg.num_heads * cfg.head_k_dim
        self.value_dim = cfg.num_heads * cfg.head_v_dim
        d, h = config.hidden_size, cfg.num_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        qkv_bias = dict(use_bias=config.qkv_bias, **kw)
        self.q_proj = Linear(d, self.key_dim, axes=("embed", "heads"), **qkv_bias)
        self.k_proj = Linear(d, self.key_dim, axes=("embed", "heads"), **qkv_bias)
        self.v_proj = Linear(d, self.value_dim, axes=("embed", "heads"), **qkv_bias)
        # One output per head: too small to shard, and the head count need not divide the mesh.
        self.a_proj = Linear(d, h, axes=("embed", None), **kw)
        self.b_proj = Linear(d, h, axes=("embed", None), **kw)
        self.g_proj = Linear(d, self.value_dim, axes=("embed", "heads"), **kw)
        conv = dict(use_bias=False, rngs=rngs, param_dtype=param_dtype)
        self.q_conv1d = ShortConv(self.key_dim, cfg.conv_kernel, **conv)
        self.k_conv1d = ShortConv(self.key_dim, cfg.conv_kernel, **conv)
        self.v_conv1d = ShortConv(self.value_dim, cfg.conv_kernel, **conv)
        self.A_log = init_param(rngs, a_log_init, (h,), (None,), param_dtype)
        self.dt_bias = init_param(rngs, dt_bias_init, (h,), (None,), param_dtype)
        self.o_norm = RMSNormGated(
            cfg.head_v_dim, eps=cfg.norm_eps, norm_before_gate=True, dtype=dtype, param_dtype=param_dtype
        )
        self.o_proj = Linear(self.value_dim, d, axes=("heads", "embed"), use_bias=config.o_bias, **kw)

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def init_cache(self, batch: int, max_length: int, dtype=None) -> GDNCache:
        """Empty state (constant size: `max_length` is not needed and only kept for the
        common mixer signature). Conv inputs are kept in `dtype`, the state in float32."""
        del max_length
        cfg = self.cfg
        return GDNCache(
            conv=jnp.zeros((batch, cfg.conv_kernel - 1, self.conv_dim), dtype or self.dtype),
            state=jnp.zeros((batch, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim), jnp.float32),
        )

    def __call__(self, x_btd, positions_bt=None, segment_ids_bt=None, cache: GDNCache | None = None):
        """x [B, T, D] -> (y [B, T, D], updated cache or None). `positions_bt` is unused
        (no positional encoding), accepted for the common mixer signature."""
        del positions_bt
        cfg = self.cfg
        b, t, _ = x_btd.shape
        h, dk, dv = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim
        qkv = jnp.concatenate([self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)], axis=-1)
        kernel = jnp.concatenate(
            [self.q_conv1d.kernel[...], self.k_conv1d.kernel[...], self.v_conv1d.kernel[...]], axis=-1
        )
        qkv, conv_state = causal_conv1d(qkv, kernel, None, None if cache is None else cache.conv, segment_ids_bt)
        q, k, v = jnp.split(qkv, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2norm(q.reshape(b, t, h, dk))
        k = l2norm(k.reshape(b, t, h, dk))
        v = v.reshape(b, t, h, dv)
        beta = jax.nn.sigmoid(self.b_proj(x_btd).astype(jnp.float32))
        a = self.a_proj(x_btd).astype(jnp.float32)
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            a + self.dt_bias[...].astype(jnp.float32)
        )
        if cache is not None and t == 1:
            o, state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.state)
            o = o[:, None]
        else:
            o, state = chunk_gated_delta_rule(
                q,
                k,
                v,
                g,
                beta,
                initial_state=None if cache is None else cache.state,
                output_final_state=cache is not None,
                segment_ids=segment_ids_bt,
                chunk_size=cfg.chunk_size,
            )
        gate = self.g_proj(x_btd).reshape(b, t, h, dv)
        o = self.o_norm(o, gate).reshape(b, t, self.value_dim)
        out = self.o_proj(o)
        if cache is None:
            return out, None
        return out, GDNCache(conv=conv_state.astype(cache.conv.dtype), state=state.astype(cache.state.dtype))
