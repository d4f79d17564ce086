"""Rotary position embeddings in Hugging Face's `rotate_half` layout.

Rotary pair i of a head of size d is the dims (i, i + d/2), rotated by angle
position * inv_freq[i]. The inverse frequencies and the attention scaling (YaRN's
mscale, applied to cos and sin) follow transformers' ROPE_INIT_FUNCTIONS for the
"default", "linear", "llama3" and "yarn" rope types.

MLA keeps RoPE on only a few dims per head: `RoPE(..., pairs=(...))` uses a subset of
the teacher's rotary pairs, laid out again as rotate_half over 2 * len(pairs) dims;
`rope_pair_dims` gives the matching indices into a full head so that the converter
can pick the teacher's rows for those pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _as_dict(scaling: Any) -> dict | None:
    """A dict, or the frozen tuple of (key, value) items that hylo_jax.config stores."""
    return None if scaling is None else dict(scaling)


def _required(scaling: dict, key: str, rope_type: str):
    if scaling.get(key) is None:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {key!r}; got {scaling}")
    return scaling[key]


def _rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def compute_inv_freq(
    head_dim: int,
    theta: float,
    scaling: Mapping | tuple | None = None,
    max_position_embeddings: int = 2048,
) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim // 2], attention_scaling) as transformers computes them."""
    return _compute_inv_freq(head_dim, float(theta), _freeze(scaling), max_position_embeddings)


def _freeze(scaling) -> tuple | None:
    d = _as_dict(scaling)
    return None if not d else tuple(sorted(d.items()))


@functools.lru_cache(maxsize=64)
def _compute_inv_freq(head_dim, theta, frozen_scaling, max_position_embeddings):
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    scaling = dict(frozen_scaling) if frozen_scaling else {}
    rope_type = _rope_type(scaling)
    dim = head_dim
    if "partial_rotary_factor" in scaling and scaling["partial_rotary_factor"] != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported (Llama/Qwen do not use it)")
    # float32 throughout, as transformers computes them (they agree to about one ulp).
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.float32(theta) ** exponents
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    attention_scaling = 1.0

    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / np.float32(_required(scaling, "factor", rope_type))
    elif rope_type == "llama3":
        factor = _required(scaling, "factor", rope_type)
        low_freq_factor = _required(scaling, "low_freq_factor", rope_type)
        high_freq_factor = _required(scaling, "high_freq_factor", rope_type)
        old_context_len = scaling.get("original_max_position_embeddings", max_position_embeddings)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        original = scaling.get("original_max_position_embeddings", max_position_embeddings)
        factor = scaling.get("factor")
        if factor is None:
            factor = max_position_embeddings / original
        attention_factor = scaling.get("attention_factor")
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)
        attention_scaling = float(attention_factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(num_rotations):
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)
        interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
        inv_freq = interpolation * (1 - extrapolation) + inv_freq * extrapolation
    else:
        raise ValueError(f"unsupported rope_type {rope_type!r}; hylo_jax implements {ROPE_TYPES}")
    inv_freq = np.asarray(inv_freq, dtype=np.float32)
    inv_freq.setflags(write=False)
    return inv_freq, attention_scaling


def rope_pair_dims(pairs, head_dim: int) -> np.ndarray:
    """Indices into a head of size `head_dim` of the given rotary pairs, rotate_half
    ordered: [p_0, ..., p_{r-1}, p_0 + d/2, ..., p_{r-1} + d/2]."""
    pairs = np.asarray(pairs, dtype=np.int64)
    half = head_dim // 2
    if pairs.ndim != 1 or len(pairs) == 0 or pairs.min() < 0 or pairs.max() >= half:
        raise ValueError(f"rotary pairs must be a non-empty list of ints in [0, {half}), got {pairs.tolist()}")
    if len(set(pairs.tolist())) != len(pairs):
        raise ValueError(f"rotary pairs must be distinct, got {pairs.tolist()}")
    return np.concatenate([pairs, pairs + half])


def rope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray | jax.Array, attention_scaling: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """positions [...] -> (cos, sin) float32 [..., 2 * len(inv_freq)] (rotate_half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_scaling, jnp.sin(emb) * attention_scaling


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, d] with cos/sin [B, T, d] -> rotated x (computed in float32)."""
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"RoPE tables have {cos.shape[-1]} dims but the input has {x.shape[-1]}")
    cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Static (hashable) rotary embedding settings; call with positions to get cos/sin.

    `pairs` selects a subset of the rotary pairs of a `head_dim`-sized head (MLA's
    decoupled RoPE key); the resulting tables cover 2 * len(pairs) dims.
    """

    head_dim: int
    theta: float = 10000.0
    scaling: tuple | None = None
    max_position_embeddings: int = 2048
    pairs: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "scaling", _freeze(self.scaling))
        if self.pairs is not None:
            object.__setattr__(self, "pairs", tuple(int(p) for p in self.pairs))
            rope_pair_dims(self.pairs, self.head_dim)  # validates
        self.inv_freq  # validate the scaling eagerly, with a clear error

    @classmethod
    def from_config(cls, config, *, scaling: Any = "config", pairs=None) -> "RoPE":
        """From a ModelConfig; `scaling` overrides config.rope_scaling (None = default)."""
        return cls(
            head_dim=config.head_dim,
            theta=config.rope_theta,
            scaling=config.rope_scaling if scaling == "config" else scaling,
            max_position_embeddings=config.max_position_embeddings,
            pairs=pairs,
        )

    @property
    def inv_freq(self) -> np.ndarray:
        inv_freq, _ = compute_inv_freq(self.head_dim, self.theta, self.scaling, self.max_position_embeddings)
        return inv_freq if self.pairs is None else inv_freq[list(self.pairs)]

    @property
    def attention_scaling(self) -> float:
        return compute_inv_freq(self.head_dim, self.theta, self.scaling, self.max_position_embeddings)[1]

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def __call__(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        return rope_cos_sin(positions, self.inv_freq, self.attention_scaling)
