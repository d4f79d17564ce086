"""Initialise an MLA layer from a teacher's attention layer by truncated SVD.

Recipe (HyLo / Zebra-Llama; docs/DESIGN.md "Recipe facts"):
  * Query: SVD W_Q = U S V^T, q_a = diag(S_r) V_r^T, q_b = U_r (or W_Q as is when
    q_lora_rank == 0).
  * Keys/values: one joint SVD of the stacked per-query-head [W_K(nope dims); W_V]
    (KV heads repeated to the query heads as GQA does), kv_a = diag(S_r) V_r^T,
    kv_b = U_r, so kv_b . kv_a is the best rank-r approximation of the stack.
  * RoPE key: the teacher's K rows of the chosen rotary pairs, one per KV head
    (rope_per_kv_head) or averaged over the KV heads (shared).
  * o_proj copied.

Rows are reordered per head to MLA's layout [nope dims | rope dims], where the rope
dims are rotate_half ordered (`rope.rope_pair_dims`), so q . k is unchanged for the
rope part and exact up to the SVD truncation for the nope part (which loses RoPE:
that, the truncation and the shared RoPE key are the only approximations).
With qk_rope_head_dim == head_dim, rope_per_kv_head and full ranks the layer is the
teacher's attention exactly.

Qwen3's q_norm/k_norm (RMSNorm over each head) cannot survive the latent: their
weights are folded into the Q/K rows and the normalisation itself is dropped
(reported as `qk_norm_dropped`); distillation has to recover it.

Everything is float64 numpy on plain arrays: pure functions, no model is touched.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from hylo_jax.config import MLAConfig, ModelConfig
from hylo_jax.layers.rope import rope_pair_dims

ROPE_PAIR_CRITERIA = ("lowest", "k_energy")


def _head_rows(w: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Weight [heads * head_dim, D] (HF [out, in]) -> [heads, head_dim, D]."""
    return w.reshape(heads, head_dim, w.shape[-1])


def _folded_qk(attn: Mapping, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Teacher W_Q [H, d, D] and W_K [Hkv, d, D] in float64, qk-norm weights folded in."""
    d = config.head_dim
    wq = _head_rows(np.asarray(attn["q_proj"]["kernel"], np.float64).T, config.num_attention_heads, d)
    wk = _head_rows(np.asarray(attn["k_proj"]["kernel"], np.float64).T, config.num_key_value_heads, d)
    if config.qk_norm:
        wq = wq * np.asarray(attn["q_norm"]["weight"], np.float64)[None, :, None]
        wk = wk * np.asarray(attn["k_norm"]["weight"], np.float64)[None, :, None]
    return wq, wk


def rope_pair_energy(k_kernels: Sequence[np.ndarray], config: ModelConfig) -> np.ndarray:
    """Share of the teacher's key energy per rotary pair, averaged over layers.

    For each layer, ||W_K rows (i, i + d/2)||^2 summed over KV heads, divided by the
    layer's total so every layer counts the same. Returns float64 [head_dim // 2].
    """
    d, half = config.head_dim, config.head_dim // 2
    total = np.zeros(half)
    for kernel in k_kernels:
        wk = _head_rows(np.asarray(kernel, np.float64).T, config.num_key_value_heads, d)
        per_dim = np.sum(wk**2, axis=(0, 2))
        per_pair = per_dim[:half] + per_dim[half:]
        total += per_pair / per_pair.sum()
    return total / max(len(k_kernels), 1)


def choose_rope_pairs(
    k_kernels: Sequence[np.ndarray], config: ModelConfig, n_pairs: int, criterion: str = "lowest"
) -> tuple[int, ...]:
    """The `n_pairs` rotary pairs to keep in MLA's RoPE key, sorted.

    "lowest": pairs 0..n_pairs-1 (the highest frequencies);
    "k_energy": the pairs that carry the most teacher key energy (rope_pair_energy).

    On SmolLM2-135M "lowest" gives the lower held-out perplexity (BENCHMARKS.md
    "Upcycling", "Which rotary pairs MLA keeps"). The key energy sits in the
    low-frequency pairs, which barely rotate over a few thousand positions and so lose
    little as nope dims; the high-frequency pairs carry the positional signal. Hence
    "lowest" is the default.
    """
    half = config.head_dim // 2
    if not 0 < n_pairs <= half:
        raise ValueError(f"cannot keep {n_pairs} rotary pairs of a head with {half}")
    if criterion == "lowest":
        return tuple(range(n_pairs))
    if criterion != "k_energy":
        raise ValueError(f"unknown rope pair criterion {criterion!r}; choose from {ROPE_PAIR_CRITERIA}")
    energy = rope_pair_energy(k_kernels, config)
    # Stable sort on -energy: ties go to the lower (higher-frequency) pair.
    return tuple(sorted(int(p) for p in np.argsort(-energy, kind="stable")[:n_pairs]))


def _truncated_svd(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """w [out, in] ~= b @ a with b = U_r [out, r], a = diag(S_r) V_r^T [r, in]."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    if rank > len(s):
        raise ValueError(f"rank {rank} exceeds min(matrix dims) = {len(s)} of a {w.shape} matrix")
    b, a = u[:, :rank], s[:rank, None] * vt[:rank]
    energy = float(np.sum(s[:rank] ** 2) / np.sum(s**2)) if np.any(s) else 1.0
    err = float(np.linalg.norm(w - b @ a) / max(np.linalg.norm(w), 1e-300))
    return b, a, {"energy_kept": energy, "rel_error": err}


def init_mla_from_attention(
    attn: Mapping, teacher: ModelConfig, mla: MLAConfig, rope_pairs: Sequence[int]
) -> tuple[dict, dict]:
    """Teacher attention params {q_proj: {kernel}, k_proj, v_proj, o_proj[, q_norm, k_norm]}
    -> (MLA params with the same nesting and HF names, stats).

    Kernels are [in, out] as in the NNX modules. Stats: per projection the share of
    singular-value energy kept and the relative Frobenius error of the low-rank factor,
    plus the relative error of the student's effective per-head Q, K and V maps against
    the teacher's (GQA-repeated), which also counts the averaged RoPE key.
    """
    d, h, hkv = teacher.head_dim, teacher.num_attention_heads, teacher.num_key_value_heads
    group = h // hkv
    rope_pairs = tuple(int(p) for p in rope_pairs)
    if 2 * len(rope_pairs) != mla.qk_rope_head_dim:
        raise ValueError(f"{len(rope_pairs)} rope pairs do not make qk_rope_head_dim={mla.qk_rope_head_dim}")
    if mla.qk_nope_head_dim + mla.qk_rope_head_dim != d or mla.v_head_dim != d:
        raise ValueError(
            f"upcycling needs qk_nope + qk_rope = v_head_dim = teacher head_dim {d}; got "
            f"{mla.qk_nope_head_dim} + {mla.qk_rope_head_dim} and {mla.v_head_dim}"
        )
    if teacher.qkv_bias:
        raise ValueError("cannot convert attention with q/k/v biases (Qwen2) to MLA")
    rope_dims = rope_pair_dims(rope_pairs, d)
    nope_dims = np.setdiff1d(np.arange(d), rope_dims)  # ascending
    order = np.concatenate([nope_dims, rope_dims])

    wq, wk = _folded_qk(attn, teacher)  # [H, d, D], [Hkv, d, D]
    wv = _head_rows(np.asarray(attn["v_proj"]["kernel"], np.float64).T, hkv, d)
    wq = wq[:, order]
    wk = wk[:, order]
    n_nope = len(nope_dims)
    wk_rep = np.repeat(wk, group, axis=0)  # [H, d, D], query head h -> KV head h // group
    wv_rep = np.repeat(wv, group, axis=0)

    stats: dict = {"qk_norm_dropped": bool(teacher.qk_norm)}
    params: dict = {"o_proj": {k: np.asarray(v) for k, v in attn["o_proj"].items()}}
    dtype = np.asarray(attn["q_proj"]["kernel"]).dtype

    wq_flat = wq.reshape(h * d, -1)
    if mla.q_lora_rank:
        q_b, q_a, stats["q"] = _truncated_svd(wq_flat, mla.q_lora_rank)
        params["q_a_proj"] = {"kernel": q_a.T.astype(dtype)}
        params["q_b_proj"] = {"kernel": q_b.T.astype(dtype)}
        wq_student = q_b @ q_a
    else:
        params["q_proj"] = {"kernel": wq_flat.T.astype(dtype)}
        stats["q"] = {"energy_kept": 1.0, "rel_error": 0.0}
        wq_student = wq_flat

    # Per query head [k_nope; v] rows, heads concatenated: kv_b_proj's output layout.
    stacked = np.concatenate([wk_rep[:, :n_nope], wv_rep], axis=1).reshape(h * (n_nope + d), -1)
    kv_b, kv_a, stats["kv"] = _truncated_svd(stacked, mla.kv_lora_rank)
    k_rope = wk[:, n_nope:]  # [Hkv, rope, D]
    if not mla.rope_per_kv_head:
        k_rope = k_rope.mean(axis=0, keepdims=True)
    kv_a_full = np.concatenate([kv_a, k_rope.reshape(-1, k_rope.shape[-1])], axis=0)
    params["kv_a_proj_with_mqa"] = {"kernel": kv_a_full.T.astype(dtype)}
    params["kv_b_proj"] = {"kernel": kv_b.T.astype(dtype)}

    # Effective per-query-head maps of the student vs the teacher's.
    kv_eff = (kv_b @ kv_a).reshape(h, n_nope + d, -1)
    k_student = np.concatenate([kv_eff[:, :n_nope], np.repeat(k_rope, h // k_rope.shape[0], axis=0)], axis=1)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    stats["q_rel_error"] = rel(wq_student, wq_flat)
    stats["k_rel_error"] = rel(k_student, wk_rep)
    stats["v_rel_error"] = rel(kv_eff[:, n_nope:], wv_rep)
    return params, stats
