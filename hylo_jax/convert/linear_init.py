"""Initialise Mamba2 and Gated DeltaNet mixers from a teacher's attention weights.

The HyLo recipe (after Zebra-Llama) reads linear attention as attention without the
softmax: the query, key and value projections keep their roles.

- Mamba2: in_proj rows [z, x, B, C, dt] with x <- W_V, B <- W_K, C <- W_Q, and
  out_proj <- W_O. K and V are repeated over the query heads (GQA, as HF's
  repeat_kv: query head h reads KV head h // (H_q / H_kv)), so the block has one head
  and one B/C group per teacher query head. A_log = log U(1, 16), dt log-uniform in
  [1e-3, 0.1] (dt_bias = softplus^-1(dt)), D = 1; z, dt rows and the conv keep their
  default init.
- GDN: q/k/v/o projections from the teacher's (K, V heads repeated likewise); the
  gates (a, b, g projections), A_log, dt_bias and the short convs keep their default
  init.

Biases of q/k/v and o (Qwen2) go to the same places. A Qwen3 teacher normalises each
q and k head (q_norm, k_norm); the normalisation has no linear counterpart, but its
weight, which sets how much each head dimension counts in the scores, is folded into
the q / k projection columns (GDN L2-normalises q and k itself).

Everything here is a pure function on parameter pytrees: `attn_params` is the pure
dict of a teacher Attention block (`nnx.to_pure_dict(nnx.state(attn, nnx.Param))`:
{"q_proj": {"kernel": [D, Hq*d], "bias"?: ...}, "k_proj", "v_proj", "o_proj", ...}),
and the result is the pure dict of the student mixer, ready for
`nnx.replace_by_pure_dict` / `nnx.update`. The default-initialised parts come from
constructing the mixer once with `key`, so they are exactly the mixer's own defaults.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from hylo_jax.config import ModelConfig, check_linear_sizes
from hylo_jax.layers.gated_deltanet import GatedDeltaNet
from hylo_jax.layers.mamba2 import Mamba2


# ---------------------------------------------------------------- helpers
def _teacher_qkvo(attn_params: Mapping[str, Any], config: ModelConfig) -> dict[str, dict[str, jax.Array]]:
    """The teacher's q/k/v/o kernels (and biases), shape-checked, K and V repeated to Hq heads."""
    hq, hkv, d, hidden = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    expected = {"q_proj": (hidden, hq * d), "k_proj": (hidden, hkv * d), "v_proj": (hidden, hkv * d),
                "o_proj": (hq * d, hidden)}
    out = {}
    for name, shape in expected.items():
        if name not in attn_params or "kernel" not in attn_params[name]:
            raise ValueError(f"teacher attention params lack {name}.kernel (have {sorted(attn_params)})")
        kernel = jnp.asarray(attn_params[name]["kernel"])
        if kernel.shape != shape:
            raise ValueError(f"teacher {name}.kernel has shape {kernel.shape}, expected {shape} for this config")
        bias = attn_params[name].get("bias")
        want_bias = config.o_bias if name == "o_proj" else config.qkv_bias
        if (bias is not None) != want_bias:
            raise ValueError(
                f"teacher {name} {'has' if bias is not None else 'lacks'} a bias but the config says "
                f"{'o_bias' if name == 'o_proj' else 'qkv_bias'}={want_bias}"
            )
        out[name] = {"kernel": kernel, "bias": None if bias is None else jnp.asarray(bias)}
    if config.qk_norm:
        for name, norm in (("q_proj", "q_norm"), ("k_proj", "k_norm")):
            if norm not in attn_params:
                raise ValueError(f"teacher attention params lack {norm} (config.qk_norm is set)")
            heads = hq if name == "q_proj" else hkv
            scale = jnp.tile(jnp.asarray(attn_params[norm]["weight"]), heads)
            out[name] = {key: None if w is None else w * scale.astype(w.dtype) for key, w in out[name].items()}
    for name in ("k_proj", "v_proj"):
        out[name] = {key: None if w is None else _repeat_kv_heads(w, hkv, hq // hkv) for key, w in out[name].items()}
    return out


def _repeat_kv_heads(w: jax.Array, kv_heads: int, rep: int) -> jax.Array:
    """[..., Hkv*d] -> [..., Hq*d], each KV head's columns repeated `rep` times in place."""
    lead, cols = w.shape[:-1], w.shape[-1]
    heads = w.reshape(*lead, kv_heads, cols // kv_heads)
    return jnp.repeat(heads, rep, axis=-2).reshape(*lead, cols * rep)


def _default_state(module_cls, config: ModelConfig, key: jax.Array, param_dtype) -> dict:
    module = module_cls(config, rngs=nnx.Rngs(params=key), param_dtype=param_dtype)
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


# ---------------------------------------------------------------- Mamba2
def init_mamba2_from_attention(attn_params: Mapping[str, Any], config: ModelConfig, *, key: jax.Array) -> dict:
    """Pure dict of a Mamba2 mixer for `config` (the student config; `config.mamba2`
    set, teacher sizes unchanged) with x <- V, B <- K, C <- Q, out_proj <- O."""
    cfg = config.mamba2
    if cfg is None:
        raise ValueError("init_mamba2_from_attention needs config.mamba2; see hylo_jax.config.default_mamba2_config")
    check_linear_sizes("mamba2", config)
    teacher = _teacher_qkvo(attn_params, config)
    dtype = teacher["q_proj"]["kernel"].dtype
    params = _default_state(Mamba2, config, key, dtype)
    d_inner = cfg.num_heads * cfg.head_dim
    # in_proj output columns: [z | x | B | C | dt]; x, B, C are each d_inner wide here.
    x_cols = slice(d_inner, 2 * d_inner)
    b_cols = slice(2 * d_inner, 3 * d_inner)
    c_cols = slice(3 * d_inner, 4 * d_inner)
    for part in ("kernel", "bias"):
        if teacher["q_proj"][part] is None:
            continue
        w = params["in_proj"][part]
        w = w.at[..., x_cols].set(teacher["v_proj"][part].astype(dtype))
        w = w.at[..., b_cols].set(teacher["k_proj"][part].astype(dtype))
        w = w.at[..., c_cols].set(teacher["q_proj"][part].astype(dtype))
        params["in_proj"][part] = w
    params["out_proj"] = {k: v.astype(dtype) for k, v in teacher["o_proj"].items() if v is not None}
    return params


# ---------------------------------------------------------------- GDN
def init_gdn_from_attention(attn_params: Mapping[str, Any], config: ModelConfig, *, key: jax.Array) -> dict:
    """Pure dict of a GatedDeltaNet mixer for `config` (the student config; `config.gdn`
    set, teacher sizes unchanged) with q/k/v/o from the teacher's attention."""
    if config.gdn is None:
        raise ValueError("init_gdn_from_attention needs config.gdn; see hylo_jax.config.default_gdn_config")
    check_linear_sizes("gdn", config)
    teacher = _teacher_qkvo(attn_params, config)
    dtype = teacher["q_proj"]["kernel"].dtype
    params = _default_state(GatedDeltaNet, config, key, dtype)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        params[name] = {k: v.astype(dtype) for k, v in teacher[name].items() if v is not None}
    return params
