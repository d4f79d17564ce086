"""Read a llama.cpp GGUF file as a Hugging Face checkpoint (names, layout, config).

Tensors are read one at a time with the `gguf` package's memory-mapped GGUFReader
and dequantized to float32 with `gguf.quants.dequantize` (numpy only). Names are
mapped from llama.cpp's (`token_embd`, `blk.N.attn_q`, ...) to Hugging Face's, and for
the "llama" architecture the query/key rows are put back in HF order: llama.cpp's
converter permutes them so that its interleaved RoPE (pairs (2i, 2i+1)) equals HF's
rotate_half RoPE (pairs (i, i + d/2)). Qwen2/Qwen3 GGUFs use NeoX RoPE and are not
permuted. The HF config dict is built from the GGUF metadata.
"""

from __future__ import annotations

import os
import re

import numpy as np

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class GGUFError(ValueError):
    """A GGUF file that cannot be read or is not a supported model."""


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> Hugging Face name; unknown names raise."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no Hugging Face name in hylo_jax.convert.gguf_io")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (the inverse of its converter's `permute`).

    Per head, llama.cpp stores row 2j+k (k in {0, 1}) = HF row j + k*d/2, which is
    the same rotation for its interleaved RoPE. Works for weights [rows, in] and biases.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF order -> llama.cpp order (what its converter does); used to write test files."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """A GGUF file seen as {HF name: float32 array in HF layout} plus an HF config dict."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises assorted errors on malformed files
            raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._gguf = gguf
        self.arch = self._field("general.architecture")
        if self.arch not in SUPPORTED_GGUF_ARCHS:
            raise GGUFError(
                f"{self.path}: unsupported GGUF architecture {self.arch!r}; "
                f"hylo_jax supports {', '.join(SUPPORTED_GGUF_ARCHS)}"
            )
        self._tensors = {}
        for t in self._reader.tensors:
            if t.name == "rope_freqs.weight":
                raise GGUFError(
                    f"{self.path}: has rope_freqs (llama3-style RoPE scaling), whose parameters "
                    "GGUF does not store; import the Hugging Face checkpoint instead"
                )
            self._tensors[hf_name(t.name)] = t
        self.hf_config = self._build_config()

    # ------------------------------------------------------------- metadata
    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _require(self, key: str):
        value = self._field(f"{self.arch}.{key}")
        if value is None:
            raise GGUFError(f"{self.path}: GGUF metadata lacks {self.arch}.{key}")
        return value

    def _build_config(self) -> dict:
        heads = int(self._require("attention.head_count"))
        hidden = int(self._require("embedding_length"))
        head_dim = int(self._field(f"{self.arch}.attention.key_length", hidden // heads))
        rope_dim = self._field(f"{self.arch}.rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise GGUFError(f"{self.path}: partial RoPE (rope.dimension_count={rope_dim}, head_dim={head_dim}) is not supported")
        vocab = self._field(f"{self.arch}.vocab_size")
        if vocab is None:
            vocab = len(self._reader.fields["tokenizer.ggml.tokens"].data)
        arch_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        config = {
            "architectures": [arch_class[self.arch]],
            "model_type": self.arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._require("feed_forward_length")),
            "num_hidden_layers": int(self._require("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._field(f"{self.arch}.attention.head_count_kv", heads)),
            "head_dim": head_dim,
            "rms_norm_eps": float(self._require("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._field(f"{self.arch}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._field(f"{self.arch}.context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "hidden_act": "silu",
            "torch_dtype": "float32",  # tensors are dequantized to float32
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self._field("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self._field("tokenizer.ggml.padding_token_id"),
        }
        if self.arch == "llama":
            config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        scaling = self._field(f"{self.arch}.rope.scaling.type")
        if scaling not in (None, "none"):
            factor = float(self._require("rope.scaling.factor"))
            if scaling == "linear":
                config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
            elif scaling == "yarn":
                original = int(self._require("rope.scaling.original_context_length"))
                config["rope_scaling"] = {
                    "rope_type": "yarn",
                    "factor": factor,
                    "original_max_position_embeddings": original,
                }
            else:
                raise GGUFError(f"{self.path}: unsupported RoPE scaling type {scaling!r}")
        return config

    # -------------------------------------------------------------- tensors
    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; numpy/HF order is the reverse.
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            w = self._gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise GGUFError(f"{self.path}: cannot dequantize tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
        w = np.asarray(w, dtype=np.float32).reshape(self.shape(name))
        if self.arch == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            n = self.hf_config["num_attention_heads"] if ".q_proj." in name else self.hf_config["num_key_value_heads"]
            w = unpermute_rope_rows(w, n)
        return w
