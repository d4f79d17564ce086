"""The one table between Hugging Face checkpoint names and NNX parameter paths.

Each `Row` pairs a checkpoint name with a parameter path (both relative to a layer
for per-layer rows) and a reversible `Transform`; the same rows drive import
(`to_nnx`) and export (`to_hf`). `param_table(config)` expands the rows for a model
config into {checkpoint name: Entry}; `check_against_model` compares that table with
the parameters an NNX model really has and fails on any parameter without a row
(or a row without a parameter), so nothing is renamed by guesswork.

Adding a mixer (MLA, Mamba2, GDN): write its rows, relative to the layer, e.g.

    MLA_ROWS = (
        Row("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.kernel", TRANSPOSE),
        Row("self_attn.q_proj.weight", "self_attn.q_proj.kernel", TRANSPOSE,
            when=lambda c: c.mla.q_lora_rank == 0),
        ...
    )

and register them in `MIXER_ROWS["mla"]`. A new layout change gets a new `Transform`
(e.g. a conv1d weight [C, 1, K] <-> [K, C]) with both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

from hylo_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """A layout change and its inverse (both numpy -> numpy)."""

    name: str
    to_nnx: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# Linear: HF weight [out, in] <-> NNX kernel [in, out].
TRANSPOSE = Transform("transpose", lambda a: a.T, lambda a: a.T)


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str  # checkpoint name; per-layer rows are relative to "model.layers.{i}."
    nnx: str  # dotted NNX path, relative the same way
    transform: Transform = IDENTITY
    when: Callable[[ModelConfig], bool] | None = None  # row applies only if this holds


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str
    nnx: str  # dotted full path, e.g. "model.layers.3.self_attn.q_proj.kernel"
    transform: Transform


# ------------------------------------------------------------------ the table
MODEL_ROWS = (
    Row("model.embed_tokens.weight", "model.embed_tokens.embedding"),
    Row("model.norm.weight", "model.norm.weight"),
    Row("lm_head.weight", "lm_head.kernel", TRANSPOSE, when=lambda c: not c.tie_word_embeddings),
)

LAYER_ROWS = (
    Row("input_layernorm.weight", "input_layernorm.weight"),
    Row("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    Row("mlp.gate_proj.weight", "mlp.gate_proj.kernel", TRANSPOSE),
    Row("mlp.up_proj.weight", "mlp.up_proj.kernel", TRANSPOSE),
    Row("mlp.down_proj.weight", "mlp.down_proj.kernel", TRANSPOSE),
    Row("mlp.gate_proj.bias", "mlp.gate_proj.bias", when=lambda c: c.mlp_bias),
    Row("mlp.up_proj.bias", "mlp.up_proj.bias", when=lambda c: c.mlp_bias),
    Row("mlp.down_proj.bias", "mlp.down_proj.bias", when=lambda c: c.mlp_bias),
)

ATTENTION_ROWS = (
    Row("self_attn.q_proj.weight", "self_attn.q_proj.kernel", TRANSPOSE),
    Row("self_attn.k_proj.weight", "self_attn.k_proj.kernel", TRANSPOSE),
    Row("self_attn.v_proj.weight", "self_attn.v_proj.kernel", TRANSPOSE),
    Row("self_attn.o_proj.weight", "self_attn.o_proj.kernel", TRANSPOSE),
    Row("self_attn.q_proj.bias", "self_attn.q_proj.bias", when=lambda c: c.qkv_bias),
    Row("self_attn.k_proj.bias", "self_attn.k_proj.bias", when=lambda c: c.qkv_bias),
    Row("self_attn.v_proj.bias", "self_attn.v_proj.bias", when=lambda c: c.qkv_bias),
    Row("self_attn.o_proj.bias", "self_attn.o_proj.bias", when=lambda c: c.o_bias),
    Row("self_attn.q_norm.weight", "self_attn.q_norm.weight", when=lambda c: c.qk_norm),
    Row("self_attn.k_norm.weight", "self_attn.k_norm.weight", when=lambda c: c.qk_norm),
)

# MLA with DeepSeek-V2 names (no latent layernorms; hylo_jax/layers/mla.py).
MLA_ROWS = (
    Row("self_attn.q_proj.weight", "self_attn.q_proj.kernel", TRANSPOSE, when=lambda c: c.mla.q_lora_rank == 0),
    Row("self_attn.q_a_proj.weight", "self_attn.q_a_proj.kernel", TRANSPOSE, when=lambda c: c.mla.q_lora_rank > 0),
    Row("self_attn.q_b_proj.weight", "self_attn.q_b_proj.kernel", TRANSPOSE, when=lambda c: c.mla.q_lora_rank > 0),
    Row("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.kernel", TRANSPOSE),
    Row("self_attn.kv_b_proj.weight", "self_attn.kv_b_proj.kernel", TRANSPOSE),
    Row("self_attn.o_proj.weight", "self_attn.o_proj.kernel", TRANSPOSE),
    Row("self_attn.o_proj.bias", "self_attn.o_proj.bias", when=lambda c: c.o_bias),
)

# Depthwise conv1d: HF / fla weight [C, 1, K] <-> NNX kernel [K, C] (hylo_jax/layers/short_conv.py).
CONV1D = Transform("conv1d", lambda a: a[:, 0, :].T, lambda a: a.T[:, None, :])

# Mamba2 with HF Mamba2 names (hylo_jax/layers/mamba2.py); in_proj/out_proj carry the
# teacher's q/k/v and o biases when it has them.
MAMBA2_ROWS = (
    Row("mixer.in_proj.weight", "mixer.in_proj.kernel", TRANSPOSE),
    Row("mixer.in_proj.bias", "mixer.in_proj.bias", when=lambda c: c.qkv_bias),
    Row("mixer.conv1d.weight", "mixer.conv1d.kernel", CONV1D),
    Row("mixer.conv1d.bias", "mixer.conv1d.bias"),
    Row("mixer.dt_bias", "mixer.dt_bias"),
    Row("mixer.A_log", "mixer.A_log"),
    Row("mixer.D", "mixer.D"),
    Row("mixer.norm.weight", "mixer.norm.weight"),
    Row("mixer.out_proj.weight", "mixer.out_proj.kernel", TRANSPOSE),
    Row("mixer.out_proj.bias", "mixer.out_proj.bias", when=lambda c: c.o_bias),
)

# Gated DeltaNet with flash-linear-attention names (hylo_jax/layers/gated_deltanet.py).
GDN_ROWS = (
    *(Row(f"linear_attn.{n}.weight", f"linear_attn.{n}.kernel", TRANSPOSE)
      for n in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj")),
    *(Row(f"linear_attn.{n}.bias", f"linear_attn.{n}.bias", when=lambda c: c.qkv_bias)
      for n in ("q_proj", "k_proj", "v_proj")),
    Row("linear_attn.o_proj.bias", "linear_attn.o_proj.bias", when=lambda c: c.o_bias),
    *(Row(f"linear_attn.{n}.weight", f"linear_attn.{n}.kernel", CONV1D)
      for n in ("q_conv1d", "k_conv1d", "v_conv1d")),
    Row("linear_attn.A_log", "linear_attn.A_log"),
    Row("linear_attn.dt_bias", "linear_attn.dt_bias"),
    Row("linear_attn.o_norm.weight", "linear_attn.o_norm.weight"),
)

# Rows of each mixer kind (config.layer_types).
MIXER_ROWS: dict[str, tuple[Row, ...]] = {
    "attention": ATTENTION_ROWS,
    "mla": MLA_ROWS,
    "mamba2": MAMBA2_ROWS,
    "gdn": GDN_ROWS,
}

# Checkpoint tensors that carry no parameter and are skipped on import: RoPE
# frequencies that old transformers versions saved, and a tied lm_head that some
# writers store although it is the embedding.
def _ignored(name: str, config: ModelConfig) -> bool:
    if name.endswith(".rotary_emb.inv_freq"):
        return True
    return config.tie_word_embeddings and name == "lm_head.weight"


# ------------------------------------------------------------------ expansion
def param_table(config: ModelConfig) -> dict[str, Entry]:
    """{checkpoint name: Entry} for every parameter a model of `config` has."""
    table: dict[str, Entry] = {}

    def add(row: Row, prefix: str) -> None:
        if row.when is None or row.when(config):
            entry = Entry(prefix + row.hf, prefix + row.nnx, row.transform)
            if entry.hf in table:
                raise ValueError(f"mapping table has two rows for {entry.hf!r}")
            table[entry.hf] = entry

    for row in MODEL_ROWS:
        add(row, "")
    for i, kind in enumerate(config.layer_types):
        if kind not in MIXER_ROWS:
            raise NotImplementedError(
                f"layer {i} is {kind!r}, which has no rows in hylo_jax/convert/mapping.py MIXER_ROWS"
            )
        for row in LAYER_ROWS + MIXER_ROWS[kind]:
            add(row, f"model.layers.{i}.")
    return table


def path_str(path: tuple) -> str:
    """NNX state path tuple -> dotted string: ('model', 'layers', 3, 'mlp') -> 'model.layers.3.mlp'."""
    return ".".join(str(p) for p in path)


def check_against_model(table: Mapping[str, Entry], model_paths: Iterable[str]) -> None:
    """Fail unless the table's NNX paths are exactly the model's parameters."""
    model_paths = set(model_paths)
    mapped = {e.nnx for e in table.values()}
    unmapped = sorted(model_paths - mapped)
    if unmapped:
        raise ValueError(
            f"model parameters without a row in hylo_jax/convert/mapping.py: {unmapped[:8]}"
            + (f" and {len(unmapped) - 8} more" if len(unmapped) > 8 else "")
        )
    stray = sorted((e.hf, e.nnx) for e in table.values() if e.nnx not in model_paths)
    if stray:
        raise ValueError(f"mapping rows point at parameters the model does not have: {stray[:8]}")


def check_checkpoint(table: Mapping[str, Entry], names: Iterable[str], config: ModelConfig, source: str) -> None:
    """Fail on checkpoint tensors without a row and on rows without a tensor."""
    names = set(names)
    unknown = sorted(n for n in names - set(table) if not _ignored(n, config))
    if unknown:
        raise ValueError(
            f"{source}: tensors with no mapping row for model_type={config.model_type!r}: {unknown[:8]}"
            + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        )
    missing = sorted(set(table) - names)
    if missing:
        raise ValueError(
            f"{source}: missing tensors {missing[:8]}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        )
