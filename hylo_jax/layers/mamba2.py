"""Mamba2 block (the `mixer.` of a "mamba2" layer), laid out as Hugging Face's Mamba2Mixer.

    [z, xBC, dt] = in_proj(u)                  z, x: d_inner = H*P; B, C: G*N each; dt: H
    x, B, C      = split(silu(conv1d(xBC)))    short causal depthwise conv
    dt           = softplus(dt + dt_bias);  A = -exp(A_log)
    y            = SSD(x, dt, A, B, C) + D * x  (pallas_kernels.ssd; one token: ssd_step)
    out          = out_proj(norm(y, z))        gated RMSNorm, gate before norm, per group

Parameter names follow HF Mamba2 (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj),
so the checkpoint map is the identity up to transposes. Upcycled from attention
(hylo_jax/convert/linear_init.py), x, B, C start as the teacher's V, K, Q and out_proj
as its O. in_proj / out_proj carry a bias iff the teacher's q/k/v / o projections do
(Qwen2), so those biases survive the upcycling.

The same call serves training (cache=None, chunked SSD over the whole sequence),
chunked prefill (cache given, T > 1) and decode (cache given, T == 1: one recurrence
step). The SSM state in the cache is float32 whatever the model dtype, because it
accumulates over the whole context.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hylo_jax.config import ModelConfig
from hylo_jax.layers.linear import Linear, init_param
from hylo_jax.layers.norms import RMSNormGated
from hylo_jax.layers.short_conv import ShortConv, causal_conv1d
from pallas_kernels.ssd import ssd, ssd_step

# mamba_ssm / HF Mamba2 defaults for the time-step initialisation.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
# Range of A = exp(A_log) at init (mamba_ssm A_init_range; the HyLo recipe's U(1, 16)).
A_INIT_RANGE = (1.0, 16.0)


@struct.dataclass
class Mamba2Cache:
    """conv [B, K-1, conv_dim]: the last inputs of the conv; ssm [B, H, P, N] float32."""

    conv: jax.Array
    ssm: jax.Array


def dt_bias_init(key, shape, dtype):
    """softplus^-1(dt) with dt log-uniform in [DT_MIN, DT_MAX] (floored at DT_FLOOR)."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = jnp.maximum(dt, DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def a_log_init(key, shape, dtype):
    """log U(A_INIT_RANGE)."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, *A_INIT_RANGE)).astype(dtype)


class Mamba2(nnx.Module):
    """Mamba2 mixer for `config.mamba2`; `y, cache = block(x, positions, segment_ids, cache)`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        cfg = config.mamba2
        if cfg is None:
            raise ValueError("Mamba2 needs config.mamba2 (a Mamba2Config); the config has none")
        if cfg.num_heads % cfg.n_groups:
            raise ValueError(f"mamba2 num_heads={cfg.num_heads} is not a multiple of n_groups={cfg.n_groups}")
        self.cfg = cfg
        self.dtype = dtype
        self.d_inner = cfg.num_heads * cfg.head_dim
        self.conv_dim = self.d_inner + 2 * cfg.n_groups * cfg.state_size
        proj = 2 * self.d_inner + 2 * cfg.n_groups * cfg.state_size + cfg.num_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(config.hidden_size, proj, axes=("embed", "heads"), use_bias=config.qkv_bias, **kw)
        self.conv1d = ShortConv(self.conv_dim, cfg.conv_kernel, use_bias=True, rngs=rngs, param_dtype=param_dtype)
        # Per-head vectors are tiny and the head count need not divide the mesh: replicated.
        self.dt_bias = init_param(rngs, dt_bias_init, (cfg.num_heads,), (None,), param_dtype)
        self.A_log = init_param(rngs, a_log_init, (cfg.num_heads,), (None,), param_dtype)
        self.D = init_param(rngs, nnx.initializers.ones_init(), (cfg.num_heads,), (None,), param_dtype)
        self.norm = RMSNormGated(
            self.d_inner,
            eps=cfg.norm_eps,
            group_size=self.d_inner // cfg.n_groups,
            norm_before_gate=False,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        self.out_proj = Linear(self.d_inner, config.hidden_size, axes=("heads", "embed"), use_bias=config.o_bias, **kw)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> Mamba2Cache:
        """Empty state (constant size: `max_length` is not needed and only kept for the
        common mixer signature). The conv inputs are kept in `dtype`, the SSM state in float32."""
        del max_length
        cfg = self.cfg
        return Mamba2Cache(
            conv=jnp.zeros((batch, cfg.conv_kernel - 1, self.conv_dim), dtype or self.dtype),
            ssm=jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.state_size), jnp.float32),
        )

    def __call__(self, x_btd, positions_bt=None, segment_ids_bt=None, cache: Mamba2Cache | None = None):
        """x [B, T, D] -> (y [B, T, D], updated cache or None). `positions_bt` is unused
        (no positional encoding), accepted for the common mixer signature."""
        del positions_bt
        cfg = self.cfg
        b, t, _ = x_btd.shape
        h, p, g, n = cfg.num_heads, cfg.head_dim, cfg.n_groups, cfg.state_size
        z, xbc, dt = jnp.split(self.in_proj(x_btd), [self.d_inner, self.d_inner + self.conv_dim], axis=-1)
        xbc, conv_state = causal_conv1d(
            xbc,
            self.conv1d.kernel[...],
            self.conv1d.bias[...],
            None if cache is None else cache.conv,
            segment_ids_bt,
        )
        xs, bs, cs = jnp.split(xbc, [self.d_inner, self.d_inner + g * n], axis=-1)
        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        common = dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_softplus=True)
        if cache is not None and t == 1:
            y, ssm_state = ssd_step(
                xs.reshape(b, h, p), dt[:, 0], A, bs.reshape(b, g, n), cs.reshape(b, g, n), cache.ssm, **common
            )
        else:
            y, ssm_state = ssd(
                xs.reshape(b, t, h, p),
                dt,
                A,
                bs.reshape(b, t, g, n),
                cs.reshape(b, t, g, n),
                initial_state=None if cache is None else cache.ssm,
                output_final_state=cache is not None,
                segment_ids=segment_ids_bt,
                chunk_size=cfg.chunk_size,
                **common,
            )
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        out = self.out_proj(y)
        if cache is None:
            return out, None
        return out, Mamba2Cache(conv=conv_state.astype(cache.conv.dtype), ssm=ssm_state.astype(cache.ssm.dtype))
