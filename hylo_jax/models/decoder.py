"""The decoder-only language model: embed -> blocks -> final norm -> lm_head.

Each block is pre-norm: h + mixer(norm(h)), then h + mlp(norm(h)). The mixer of layer
i is chosen by `config.layer_types[i]` and stored under the attribute name its
checkpoint uses ("attention"/"mla" -> self_attn, "mamba2" -> mixer, "gdn" ->
linear_attn), so NNX paths equal Hugging Face parameter names. A teacher (Llama,
Qwen2, Qwen3) is the all-"attention" case.

Every mixer has the signature `y, new_cache = mixer(x, positions, segment_ids, cache)`
and an `init_cache(batch, max_length, dtype)`; the model's cache is the tuple of the
layers' caches, a pytree.

Without a cache, each run of consecutive layers of the same kind and parameter shapes
goes through one `lax.scan` over their stacked states (`run_layers`): XLA then compiles
one layer body per run instead of one per layer. The 30 layers of a Llama teacher are
one scan; the parameters stay per layer, under their Hugging Face names.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from flax import nnx

from hylo_jax import sharding as shd
from hylo_jax.config import ModelConfig
from hylo_jax.layers.linear import Embed, Linear
from hylo_jax.layers.mlp import MLP
from hylo_jax.layers.norms import RMSNorm

# layer kind -> (module that defines the mixer, class name, attribute name in the block)
MIXER_CLASSES = {
    "attention": ("hylo_jax.layers.attention", "Attention", "self_attn"),
    "mla": ("hylo_jax.layers.mla", "MLA", "self_attn"),
    "mamba2": ("hylo_jax.layers.mamba2", "Mamba2", "mixer"),
    "gdn": ("hylo_jax.layers.gated_deltanet", "GatedDeltaNet", "linear_attn"),
}


def mixer_class(kind: str):
    """The mixer class for a layer kind, imported on first use (so a teacher needs
    none of the hybrid modules)."""
    if kind not in MIXER_CLASSES:
        raise ValueError(f"unknown layer kind {kind!r}; choose from {tuple(MIXER_CLASSES)}")
    module_name, class_name, _ = MIXER_CLASSES[kind]
    return getattr(importlib.import_module(module_name), class_name)


def default_positions(input_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """0, 1, 2, ... along T, restarting at 0 wherever the segment id changes."""
    b, t = input_ids.shape
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
        return idx
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def layer_groups(layers, *, consecutive: bool = True) -> list[tuple[list[int], nnx.GraphDef, nnx.State]]:
    """[(layer indices, graphdef, states stacked on a new leading axis)] for `layers`.

    A group holds layers of one kind with the same state tree, shapes and dtypes, so
    one traced body serves them all (a layer's computation depends only on its kind,
    the shared config and its state). consecutive=True groups only neighbours (for
    running layers in order); False groups all alike layers wherever they are.
    """
    groups, keys = [], []
    for i, layer in enumerate(layers):
        graphdef, state = nnx.split(layer)
        leaves, treedef = jax.tree.flatten(state)
        key = (layer.kind, treedef, tuple((x.shape, x.dtype) for x in leaves))
        if consecutive:
            j = len(groups) - 1 if keys and keys[-1] == key else None
        else:
            j = keys.index(key) if key in keys else None
        if j is None:
            keys.append(key)
            groups.append(([], graphdef, []))
            j = len(groups) - 1
        groups[j][0].append(i)
        groups[j][2].append(state)
    return [
        (idx, graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)) for idx, graphdef, states in groups
    ]


def run_layers(layers, h, positions, segment_ids=None, *, remat_policy=None, remat: bool = False, collect=False):
    """h [B, T, D] through `layers` in order, without caches; each run of alike layers
    is one `lax.scan`. remat=True wraps each layer in `jax.checkpoint(policy=remat_policy)`.

    Returns (h, hidden_states, mixer_outputs): with collect, the lists of each layer's
    output and mixer output (before the residual add), else None, None.
    """
    hidden_states, mixer_outputs = [], []
    for idx, graphdef, stacked in layer_groups(layers):

        def body(h, state, graphdef=graphdef):
            h, mixer_out, _ = nnx.merge(graphdef, state)(h, positions, segment_ids)
            return h, ((h, mixer_out) if collect else None)

        if remat:
            body = jax.checkpoint(body, policy=remat_policy)
        h, ys = jax.lax.scan(body, h, stacked)
        if collect:
            hidden_states += [ys[0][n] for n in range(len(idx))]
            mixer_outputs += [ys[1][n] for n in range(len(idx))]
    return (h, hidden_states, mixer_outputs) if collect else (h, None, None)


class DecoderLayer(nnx.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.layer_idx = layer_idx
        self.kind = config.layer_types[layer_idx]
        cls = mixer_class(self.kind)
        self.mixer_attr = MIXER_CLASSES[self.kind][2]
        norm_kw = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        setattr(self, self.mixer_attr, cls(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm_kw)
        self.mlp = MLP(
            config.hidden_size,
            config.intermediate_size,
            use_bias=config.mlp_bias,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    @property
    def token_mixer(self) -> nnx.Module:
        """This layer's mixer, whichever attribute name it lives under."""
        return getattr(self, self.mixer_attr)

    def init_cache(self, batch: int, max_length: int, dtype=None):
        return self.token_mixer.init_cache(batch, max_length, dtype)

    def __call__(self, h, positions, segment_ids=None, cache=None):
        """-> (h_out, mixer_out, new_cache); mixer_out is before the residual add."""
        mixer_out, new_cache = self.token_mixer(self.input_layernorm(h), positions, segment_ids, cache)
        h = h + mixer_out
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, mixer_out, new_cache


class DecoderModel(nnx.Module):
    """embed_tokens -> layers -> norm (HF's `model.` prefix)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.embed_tokens = Embed(
            config.vocab_size, config.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.layers = nnx.List(
            [
                DecoderLayer(config, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids, positions, segment_ids=None, cache=None, *, collect=False):
        """-> (final-normed hidden [B, T, D], new cache tuple or None, collected).

        collect=True also returns {"hidden_states": [embeddings, after layer 0, ...],
        "mixer_outputs": [layer 0, ...]} (for layer-alignment distillation); else None.
        """
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} entries for {len(self.layers)} layers")
        h = self.embed_tokens(input_ids)
        if cache is None:
            out, hidden_states, mixer_outputs = run_layers(self.layers, h, positions, segment_ids, collect=collect)
            collected = {"hidden_states": [h, *hidden_states], "mixer_outputs": mixer_outputs} if collect else None
            return self.norm(out), None, collected
        hidden_states, mixer_outputs, new_cache = [h], [], []
        for i, layer in enumerate(self.layers):
            h, mixer_out, layer_cache = layer(h, positions, segment_ids, cache[i])
            if collect:
                hidden_states.append(h)
                mixer_outputs.append(mixer_out)
            new_cache.append(layer_cache)
        collected = {"hidden_states": hidden_states, "mixer_outputs": mixer_outputs} if collect else None
        return self.norm(h), tuple(new_cache), collected


class CausalLM(nnx.Module):
    """Decoder + lm_head (tied to embed_tokens when config.tie_word_embeddings)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.model = DecoderModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def _check_ids(self, input_ids):
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")

    def hidden(self, input_ids, positions=None, segment_ids=None):
        """Final-normed hidden states [B, T, D] (no cache)."""
        self._check_ids(input_ids)
        if positions is None:
            positions = default_positions(input_ids, segment_ids)
        h, _, _ = self.model(input_ids, positions, segment_ids)
        return h

    def logits_from_hidden(self, h):
        """h [..., D] -> float32 logits [..., V] through the (tied) lm_head."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(h, out_dtype=jnp.float32)
        return self.lm_head(h, out_dtype=jnp.float32)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """input_ids int [B, T] -> float32 logits [B, T, V]. With packed `segment_ids`
        and no positions, positions restart at 0 in each segment."""
        return self.logits_from_hidden(self.hidden(input_ids, positions, segment_ids))

    def init_cache(self, batch: int, max_length: int, dtype=None):
        """Empty caches for every layer (a tuple); KV caches hold `max_length` tokens."""
        return tuple(layer.init_cache(batch, max_length, dtype or self.dtype) for layer in self.model.layers)

    def step(self, input_ids, positions, cache):
        """Feeds the next chunk (T >= 1 tokens) after what `cache` holds.
        -> (float32 logits [B, T, V], updated cache)."""
        self._check_ids(input_ids)
        h, cache, _ = self.model(input_ids, positions, None, cache)
        return self.logits_from_hidden(h), cache


def abstract_model(config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32) -> CausalLM:
    """The CausalLM as shapes only: no parameter memory is allocated.

    Under `jax.set_mesh(mesh)` every parameter's abstract value carries the NamedSharding
    that hylo_jax.sharding's rules table gives its logical axes, so hylo_jax.load_model
    reads each tensor straight onto its shards.
    """
    mesh = jax.sharding.get_mesh()
    # Flax would turn the logical axis names into mesh axes verbatim; the rules table does it here.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    if mesh.empty:
        return model
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda var, sharding: var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding.get_value())),
        state,
        shd.state_shardings(state, mesh),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, state)
