"""Grouped-query causal self-attention (Llama, Qwen2, Qwen3) with an optional KV cache.

One code path serves training and inference: without a cache the block attends over
the input (causal, and within a segment when packed `segment_ids` are given); with a
cache the input is the next chunk after what the cache holds (chunked prefill, then
one token per step when decoding). Query heads are grouped per KV head in the einsums
([B, T, Hkv, G, d]), so K and V are never repeated in memory, the mask is one [T, S]
boolean per sequence broadcast over heads, and the softmax runs in float32.

Long sequences are processed in query chunks (`causal_attention`): each chunk builds
its own [chunk, S] mask and scores, under `jax.checkpoint`, so memory grows as
T * chunk rather than T * T, in the forward and the backward pass.

`causal_attention`, `dot_product_attention`, the mask helpers and `write_cache` are
shared with MLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hylo_jax.layers.linear import Linear
from hylo_jax.layers.norms import RMSNorm
from hylo_jax.layers.rope import RoPE, apply_rope


@struct.dataclass
class AttentionCache:
    """Keys/values of the tokens seen so far: k [B, S, Hkv, d], v [B, S, Hkv, dv];
    `index` (int32 scalar) is how many slots are filled, i.e. where the next chunk goes."""

    k: jax.Array
    v: jax.Array
    index: jax.Array


def cache_mask(index: jax.Array, length: int, max_length: int) -> jax.Array:
    """bool [1, T, S] for a chunk of `length` queries written at cache slot `index`:
    query t sees slot s iff s <= index + t (later slots are empty or in the future)."""
    q_slot = index + jnp.arange(length)
    return (jnp.arange(max_length)[None, :] <= q_slot[:, None])[None]


def write_cache(buffer: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes `new` [B, T, ...] into `buffer` [B, S, ...] at time slot `index`."""
    if new.shape[1] > buffer.shape[1]:
        raise ValueError(f"a chunk of {new.shape[1]} tokens does not fit a cache of {buffer.shape[1]}")
    start = (0, index) + (0,) * (buffer.ndim - 2)
    return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float
) -> jax.Array:
    """Masked softmax attention with grouped KV heads.

    q [B, T, H, d], k [B, S, Hkv, d], v [B, S, Hkv, dv], mask bool broadcastable to
    [B, T, S]; H must be a multiple of Hkv (query head h uses KV head h // (H / Hkv),
    as transformers' repeat_kv). Returns [B, T, H, dv] in v's dtype.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} KV heads")
    qg = q.reshape(b, t, hkv, h // hkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, v.shape[-1])


# Queries per chunk in `causal_attention`; below this length one block is cheaper.
DEFAULT_CHUNK_SIZE = 1024


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    segment_ids: jax.Array | None = None,
    cache_index: jax.Array | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> jax.Array:
    """Causal attention with masks built per query chunk. Shapes as `dot_product_attention`.

    Without `cache_index`, k and v are the same T tokens as q (training / full
    forward), optionally packed by `segment_ids` [B, T]. With `cache_index`, k and v
    are a cache of S slots and query t sits at slot cache_index + t. Queries are
    processed `chunk_size` at a time (None: all at once).
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    if cache_index is None:
        if s != t:
            raise ValueError(f"without a cache, keys ({s}) and queries ({t}) must have the same length")
        offset = jnp.zeros((), jnp.int32)
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
        offset = cache_index
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    kv_slot = jnp.arange(s)
    q_slot = jnp.broadcast_to(offset + jnp.arange(t), (b, t))

    def block(q_blk, q_slot, q_seg=None):
        mask = kv_slot[None, None, :] <= q_slot[:, :, None]  # [B, C, S]
        if q_seg is not None:
            mask = mask & (q_seg[:, :, None] == segment_ids[:, None, :])
        return dot_product_attention(q_blk, k, v, mask, scale=scale)

    xs = (q, q_slot) if segment_ids is None else (q, q_slot, segment_ids)
    return query_blocks(block, xs, chunk_size, remat=True)


def query_blocks(block, xs, chunk_size: int | None, *, remat: bool = False) -> jax.Array:
    """`block(*xs)` over blocks of `chunk_size` queries, so memory grows with the block,
    not with T. Every x is [B, T, ...] (queries on axis 1, padded at the end to whole
    blocks; the padded rows' outputs are dropped, so they only need to be harmless).
    Returns block's [B, T, ...] output. One call when T <= chunk_size (or None);
    remat recomputes each block in the backward pass."""
    b, t = xs[0].shape[:2]
    if chunk_size is None or t <= chunk_size:
        return block(*xs)
    n = -(-t // chunk_size)

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((b, n, chunk_size) + x.shape[2:]).swapaxes(0, 1)

    fn = lambda a: block(*a)
    out = jax.lax.map(jax.checkpoint(fn) if remat else fn, tuple(split(x) for x in xs))
    return out.swapaxes(0, 1).reshape((b, n * chunk_size) + out.shape[3:])[:, :t]


class Attention(nnx.Module):
    """Llama/Qwen attention: q/k/v/o projections (+ Qwen2 q/k/v biases, + Qwen3 q_norm
    and k_norm over each head), RoPE, GQA. Params mirror HF names."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        d_model, d = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.dtype = dtype
        self.scale = d**-0.5
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d_model, self.num_heads * d, axes=("embed", "heads"), use_bias=config.qkv_bias, **kw)
        self.k_proj = Linear(d_model, self.num_kv_heads * d, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **kw)
        self.v_proj = Linear(d_model, self.num_kv_heads * d, axes=("embed", "kv_heads"), use_bias=config.qkv_bias, **kw)
        self.o_proj = Linear(self.num_heads * d, d_model, axes=("heads", "embed"), use_bias=config.o_bias, **kw)
        if config.qk_norm:
            norm_kw = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
            self.q_norm = RMSNorm(d, **norm_kw)
            self.k_norm = RMSNorm(d, **norm_kw)
        else:
            self.q_norm = self.k_norm = None
        self.rope = RoPE.from_config(config)
        self.chunk_size = DEFAULT_CHUNK_SIZE  # queries per attention block (memory bound)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> AttentionCache:
        shape = (batch, max_length, self.num_kv_heads, self.head_dim)
        dtype = dtype or self.dtype
        return AttentionCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32))

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: AttentionCache | None = None,
    ) -> tuple[jax.Array, AttentionCache | None]:
        b, t, _ = x.shape
        if positions.shape != (b, t):
            raise ValueError(f"positions must be [B, T] = {(b, t)}, got {positions.shape}")
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rope(positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is None:
            new_cache = None
            out = causal_attention(q, k, v, scale=self.scale, segment_ids=segment_ids, chunk_size=self.chunk_size)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
            new_cache = AttentionCache(
                k=write_cache(cache.k, k, cache.index),
                v=write_cache(cache.v, v, cache.index),
                index=cache.index + t,
            )
            out = causal_attention(
                q,
                new_cache.k.astype(self.dtype),
                new_cache.v.astype(self.dtype),
                scale=self.scale,
                cache_index=cache.index,
                chunk_size=self.chunk_size,
            )
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache
