"""Which teacher layers stay attention-like (MLA) and which become linear mixers.

Three ways to say it:
  * an explicit list of layer indices;
  * a named preset: "hylo" (1:3 spacing, layers 1, 5, 9, ...) or the lists published
    with HyLo for Llama-3.2-1B, Llama-3.2-3B and Qwen3-1.7B (docs/DESIGN.md "Recipe facts");
  * "auto": on calibration text, convert one layer at a time to the target linear
    mixer (with its upcycling init, all other layers the teacher's) and measure how
    much the loss rises; the layers where it rises most stay MLA ("where the base
    model is most sensitive").
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.config import ModelConfig, check_student_config, make_student_config
from hylo_jax.convert import upcycle as up
from hylo_jax.eval.perplexity import nll_from_hidden
from hylo_jax.models.decoder import DecoderLayer, default_positions

# name -> (layer indices, the number of layers the list was published for, or None = any)
PUBLISHED = {
    "llama32_1b": ((1, 5, 10, 14), 16),
    "llama32_3b": ((0, 5, 10, 16, 21, 26), 28),
    "qwen3_1p7b": (tuple(range(1, 26, 4)), 28),
}
PRESETS = ("hylo",) + tuple(PUBLISHED)


def preset_layers(name: str, num_layers: int) -> tuple[int, ...]:
    """Layer indices of a named preset for a model with `num_layers` layers."""
    if name == "hylo":
        return tuple(range(1, num_layers, 4))
    if name not in PUBLISHED:
        raise ValueError(f"unknown layer preset {name!r}; choose from {PRESETS}, 'auto' or a list of indices")
    layers, published_for = PUBLISHED[name]
    if num_layers != published_for:
        raise ValueError(f"preset {name!r} is for a {published_for}-layer model, this one has {num_layers}")
    return layers


def check_layers(indices: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Sorted, validated layer indices (ints in [0, num_layers), no repeats)."""
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise ValueError(f"layer index {i!r} is not an integer")
        if not 0 <= i < num_layers:
            raise ValueError(f"layer index {i} is out of range for a model with {num_layers} layers (0..{num_layers - 1})")
        out.append(int(i))
    if len(set(out)) != len(out):
        raise ValueError(f"layer indices {list(indices)} contain repeats")
    return tuple(sorted(out))


def layer_types(attention_layers: Sequence[int], num_layers: int, kept: str = "mla", other: str = "gdn") -> tuple[str, ...]:
    """`kept` at the given indices, `other` everywhere else."""
    keep = set(check_layers(attention_layers, num_layers))
    return tuple(kept if i in keep else other for i in range(num_layers))


def layer_sensitivity(teacher, student_config: ModelConfig, calib_ids: np.ndarray, target: str, *, seed: int = 0) -> dict:
    """Loss rise on `calib_ids` [B, T] when each single layer alone becomes `target`.

    `student_config` supplies the target's sub-config (its layer_types are ignored).
    -> {"base_loss": teacher loss (nats/token), "loss": [L], "rise": [L]}.
    """
    cfg_t = teacher.config
    n = cfg_t.num_hidden_layers
    ids = jnp.asarray(calib_ids, jnp.int32)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"calibration ids must be [B, T] with T >= 2, got {ids.shape}")
    positions = default_positions(ids)
    weight = jnp.ones(ids[:, 1:].shape, jnp.float32)
    n_tokens = float(weight.size)
    chunk = min(128, ids.shape[1] - 1)

    def loss_from(h, start):
        """Run teacher layers start.. on h, then the final norm and lm_head loss."""
        for layer in teacher.model.layers[start:]:
            h, _, _ = layer(h, positions)
        h = teacher.model.norm(h)[:, :-1]
        return float(nll_from_hidden(teacher, h, ids[:, 1:], weight, chunk)) / n_tokens

    _, _, collected = teacher.model(ids, positions, collect=True)
    inputs = collected["hidden_states"]  # inputs[i] = input of layer i
    base = loss_from(inputs[-1], n)
    teacher_params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
    key = jax.random.key(seed)
    losses = []
    for i in range(n):
        cfg_i = make_student_config(
            cfg_t, tuple(target if j == i else "attention" for j in range(n)),
            mla=student_config.mla, mamba2=student_config.mamba2, gdn=student_config.gdn,
        )
        check_student_config(cfg_t, cfg_i)
        cfg_i = up.resolve_rope_pairs(teacher_params, cfg_t, cfg_i)
        params, _ = up.upcycle_layer(teacher_params["model"]["layers"][i], cfg_t, cfg_i, i, jax.random.fold_in(key, i))
        abstract = nnx.eval_shape(lambda: DecoderLayer(cfg_i, i, rngs=nnx.Rngs(0), dtype=teacher.dtype))
        layer = up.fill_module(abstract, params, f"layer {i}")
        h, _, _ = layer(inputs[i], positions)
        losses.append(loss_from(h, i + 1))
    losses = np.asarray(losses)
    return {"base_loss": base, "loss": losses.tolist(), "rise": (losses - base).tolist()}


def most_sensitive(rise: Sequence[float], k: int) -> tuple[int, ...]:
    """The k layers with the largest loss rise, sorted by index."""
    if not 0 < k <= len(rise):
        raise ValueError(f"cannot keep {k} of {len(rise)} layers")
    return tuple(sorted(int(i) for i in np.argsort(-np.asarray(rise), kind="stable")[:k]))
