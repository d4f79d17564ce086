"""Multi-Head Latent Attention (DeepSeek-V2 style, without latent norms).

Keys and values of all heads come from one small latent per token, so the decode
cache holds only that latent plus a decoupled RoPE key:

    q       = q_b_proj(q_a_proj(x))        (or q_proj(x) when q_lora_rank == 0)
              per head [q_nope (qk_nope_head_dim) | q_rope (qk_rope_head_dim)]
    [c | kr] = kv_a_proj_with_mqa(x)        c: latent [kv_lora_rank]
                                            kr: RoPE key, one shared by all heads or
                                                one per teacher KV head (rope_per_kv_head)
    [k_nope | v] = kv_b_proj(c)             per head
    score(t, s) = scale * (q_nope_t . k_nope_s + rope(q_rope_t) . rope(kr_s))

Two forms compute the same thing. The training form (no cache) expands the latent to
per-head K and V. The absorbed form (with an `MLACache`) never expands it: the K part
of kv_b_proj is folded into the query (q_nope . W_uk c = (W_uk^T q_nope) . c) and the
V part is applied after the attention weights have averaged the latents.

RoPE uses a subset of the teacher's rotary pairs (`MLAConfig.rope_pairs`, frequencies
of the teacher's head_dim) laid out as rotate_half over qk_rope_head_dim dims, and the
softmax scale stays the teacher's 1/sqrt(head_dim), so an upcycled layer starts from
the teacher's attention logits. `MLAConfig.rope_scaling` (e.g. YaRN) applies here only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from hylo_jax.config import ModelConfig, mla_rope_pairs, validate_mla_config
from hylo_jax.layers.attention import DEFAULT_CHUNK_SIZE, cache_mask, causal_attention, query_blocks, write_cache
from hylo_jax.layers.linear import Linear
from hylo_jax.layers.rope import RoPE, apply_rope


@struct.dataclass
class MLACache:
    """latent [B, S, kv_lora_rank], k_rope [B, S, n_rope_heads, qk_rope_head_dim] (already
    rotated), `index` int32 scalar = number of filled slots (where the next chunk goes)."""

    latent: jax.Array
    k_rope: jax.Array
    index: jax.Array


class MLA(nnx.Module):
    """DeepSeek-V2 MLA with HF parameter names under `self_attn.`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        validate_mla_config(config)
        m = config.mla
        d_model = config.hidden_size
        self.num_heads = h = config.num_attention_heads
        self.nope_dim = m.qk_nope_head_dim
        self.rope_dim = m.qk_rope_head_dim
        self.v_dim = m.v_head_dim
        self.kv_lora_rank = m.kv_lora_rank
        self.n_rope_heads = config.num_key_value_heads if m.rope_per_kv_head else 1
        self.dtype = dtype
        self.scale = config.head_dim**-0.5  # the teacher's; qk_nope + qk_rope == head_dim
        q_dim = h * (self.nope_dim + self.rope_dim)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if m.q_lora_rank:
            self.q_a_proj = Linear(d_model, m.q_lora_rank, axes=("embed", "latent"), **kw)
            self.q_b_proj = Linear(m.q_lora_rank, q_dim, axes=("latent", "heads"), **kw)
            self.q_proj = None
        else:
            self.q_proj = Linear(d_model, q_dim, axes=("embed", "heads"), **kw)
            self.q_a_proj = self.q_b_proj = None
        self.kv_a_proj_with_mqa = Linear(
            d_model, m.kv_lora_rank + self.n_rope_heads * self.rope_dim, axes=("embed", "latent"), **kw
        )
        self.kv_b_proj = Linear(m.kv_lora_rank, h * (self.nope_dim + self.v_dim), axes=("latent", "heads"), **kw)
        self.o_proj = Linear(h * self.v_dim, d_model, axes=("heads", "embed"), use_bias=config.o_bias, **kw)
        self.rope = RoPE(
            head_dim=config.head_dim,
            theta=config.rope_theta,
            # None inherits the teacher's scaling (e.g. Llama 3's), so conversion keeps its frequencies.
            scaling=m.rope_scaling if m.rope_scaling is not None else config.rope_scaling,
            max_position_embeddings=config.max_position_embeddings,
            pairs=mla_rope_pairs(config),
        )

    def init_cache(self, batch: int, max_length: int, dtype=None) -> MLACache:
        dtype = dtype or self.dtype
        return MLACache(
            latent=jnp.zeros((batch, max_length, self.kv_lora_rank), dtype),
            k_rope=jnp.zeros((batch, max_length, self.n_rope_heads, self.rope_dim), dtype),
            index=jnp.zeros((), jnp.int32),
        )

    def _queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_proj(x))
        q = q.reshape(b, t, self.num_heads, self.nope_dim + self.rope_dim)
        return q[..., : self.nope_dim], apply_rope(q[..., self.nope_dim :], cos, sin)

    def _latent_and_rope_key(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, t, _ = x.shape
        kv = self.kv_a_proj_with_mqa(x)
        latent = kv[..., : self.kv_lora_rank]
        k_rope = kv[..., self.kv_lora_rank :].reshape(b, t, self.n_rope_heads, self.rope_dim)
        return latent, apply_rope(k_rope, cos, sin)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: MLACache | None = None,
    ) -> tuple[jax.Array, MLACache | None]:
        b, t, _ = x.shape
        if positions.shape != (b, t):
            raise ValueError(f"positions must be [B, T] = {(b, t)}, got {positions.shape}")
        cos, sin = self.rope(positions)
        q_nope, q_rope = self._queries(x, cos, sin)
        latent, k_rope = self._latent_and_rope_key(x, cos, sin)
        if cache is None:
            out = self._expanded(q_nope, q_rope, latent, k_rope, segment_ids)
            new_cache = None
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed documents) cannot be combined with a KV cache")
            new_cache = MLACache(
                latent=write_cache(cache.latent, latent, cache.index),
                k_rope=write_cache(cache.k_rope, k_rope, cache.index),
                index=cache.index + t,
            )
            mask = cache_mask(cache.index, t, new_cache.latent.shape[1])
            out = self._absorbed(
                q_nope, q_rope, new_cache.latent.astype(self.dtype), new_cache.k_rope.astype(self.dtype), mask
            )
        return self.o_proj(out.reshape(b, t, self.num_heads * self.v_dim)), new_cache

    def _expanded(self, q_nope, q_rope, latent, k_rope, segment_ids) -> jax.Array:
        """Training form: expand the latent into per-head keys and values."""
        b, s, _ = latent.shape
        h = self.num_heads
        kv = self.kv_b_proj(latent).reshape(b, s, h, self.nope_dim + self.v_dim)
        k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim :]
        # Query head h uses RoPE key h // (H / n_rope_heads), as GQA groups its heads.
        k_rope = jnp.repeat(k_rope, h // self.n_rope_heads, axis=2)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1)
        return causal_attention(q, k, v, scale=self.scale, segment_ids=segment_ids)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> jax.Array:
        """Decode form: attend over the cached latents; kv_b_proj folded into q and out.
        Queries go DEFAULT_CHUNK_SIZE at a time, so a long prefill chunk holds scores of
        [B, H, chunk, S], not [B, H, T, S]."""
        b, t, h, _ = q_nope.shape
        w = self.kv_b_proj.kernel[...].astype(self.dtype).reshape(self.kv_lora_rank, h, self.nope_dim + self.v_dim)
        w_uk, w_uv = w[..., : self.nope_dim], w[..., self.nope_dim :]
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk, preferred_element_type=jnp.float32)
        q_rope = q_rope.reshape(b, t, self.n_rope_heads, h // self.n_rope_heads, self.rope_dim)
        mask = jnp.broadcast_to(mask, (b,) + mask.shape[1:])

        def block(q_latent, q_rope, mask):
            tb = q_latent.shape[1]
            scores = jnp.einsum("bthr,bsr->bhts", q_latent, latent, preferred_element_type=jnp.float32)
            scores_rope = jnp.einsum("btkgd,bskd->bkgts", q_rope, k_rope, preferred_element_type=jnp.float32)
            scores = (scores + scores_rope.reshape(b, h, tb, -1)) * self.scale
            scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1)
            return jnp.einsum("bhts,bsr->bthr", probs, latent.astype(jnp.float32))

        out_latent = query_blocks(block, (q_latent, q_rope, mask), DEFAULT_CHUNK_SIZE)
        out = jnp.einsum("bthr,rhv->bthv", out_latent, w_uv.astype(jnp.float32))
        return out.astype(self.dtype)
