"""Model configuration: one frozen dataclass, symmetric with Hugging Face config.json.

`ModelConfig.from_hf_config` reads a Llama / Qwen2 / Qwen3 config.json dict;
`to_hf_config` writes it back. A hybrid student carries the same fields plus
`layer_types` (one mixer name per layer) and the per-mixer sub-configs, stored in
config.json under the key "hylo" so that transformers ignores them.

Every check of a config is here: `ModelConfig.validate` (run on construction),
`validate_mla_config` (run by each MLA layer) and, for a hybrid student upcycled from a
teacher, `make_student_config` / `check_student_config` with the default Mamba2 and GDN
sizes that take the teacher's attention heads whole.

Configs are hashable (tuples, no dicts) because NNX keeps them in the graph
definition, which jit uses as a cache key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

MIXERS = ("attention", "mla", "mamba2", "gdn")
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Which mixers cache keys and values (grow with T) versus a constant-size state.
KV_MIXERS = ("attention", "mla")


def _freeze(value: Any) -> Any:
    """Dict/list -> sorted tuple of items / tuple, recursively (hashable)."""
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and all(
        isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) for item in value
    ):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """DeepSeek-V2 style Multi-Head Latent Attention sizes (no latent norms)."""

    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int = 0  # 0: full-rank query projection
    # One decoupled RoPE key per teacher KV head instead of one shared by all heads.
    # With full ranks this makes the conversion exact.
    rope_per_kv_head: bool = False
    # RoPE scaling of the MLA layers only (e.g. YaRN for long context); None = the model's.
    rope_scaling: tuple | None = None
    # The teacher's rotary pairs (pair i = head dims (i, i + head_dim/2)) that keep RoPE,
    # qk_rope_head_dim // 2 of them; None = the lowest-index pairs 0, 1, ...
    rope_pairs: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.rope_pairs is not None:  # lists from config.json -> hashable tuple
            object.__setattr__(self, "rope_pairs", tuple(int(p) for p in self.rope_pairs))


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """Mamba2 block sizes. Upcycled: heads = teacher heads, head_dim = teacher head_dim,
    n_groups = teacher heads, state_size = teacher head_dim (B <- K, C <- Q)."""

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int = 4
    # 128: the chunk with the fastest fwd+bwd of the GPU SSD kernels in BENCHMARKS.md "Kernels: SSD".
    chunk_size: int = 128
    norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class GDNConfig:
    """Gated DeltaNet block sizes. Upcycled: heads = teacher query heads, key/value
    head dims = teacher head_dim (q, k, v, o copied from attention)."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int = 4
    chunk_size: int = 64
    norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # frozen HF rope_scaling dict
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each q and k head
    hidden_act: str = "silu"
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    torch_dtype: str = "float32"  # dtype of the source checkpoint, written back on export
    # Hybrid student fields; a teacher has every layer "attention".
    layer_types: tuple[str, ...] = ()
    mla: MLAConfig | None = None
    mamba2: Mamba2Config | None = None
    gdn: GDNConfig | None = None

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("attention",) * self.num_hidden_layers)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture model_type={self.model_type!r}; "
                f"hylo_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act={self.hidden_act!r}; only 'silu' is implemented")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but the model has "
                f"{self.num_hidden_layers} layers"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in MIXERS:
                raise ValueError(f"layer {i}: unknown mixer {kind!r}; choose from {MIXERS}")
            if kind != "attention" and getattr(self, kind) is None:
                raise ValueError(f"layer {i} is {kind!r} but the config has no {kind} sub-config")

    # ------------------------------------------------------------- properties
    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else _thaw(self.rope_scaling)

    @property
    def is_hybrid(self) -> bool:
        return any(kind != "attention" for kind in self.layer_types)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------- HF config
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures")
            raise ValueError(
                f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"hylo_jax supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if hf.get("use_sliding_window"):
            raise ValueError("Qwen sliding-window attention (use_sliding_window=true) is not supported")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        attention_bias = bool(hf.get("attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        # transformers >= 5 nests RoPE settings under "rope_parameters".
        rope_params = hf.get("rope_parameters")
        if rope_params:
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        hylo = hf.get("hylo") or {}
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=_freeze(rope_scaling) if rope_scaling else None,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=_freeze(hf.get("bos_token_id")),
            eos_token_id=_freeze(hf.get("eos_token_id")),
            pad_token_id=_freeze(hf.get("pad_token_id")),
            torch_dtype=str(dtype).replace("torch.", ""),
            layer_types=tuple(hylo.get("layer_types", ())),
            mla=_sub(MLAConfig, hylo.get("mla")),
            mamba2=_sub(Mamba2Config, hylo.get("mamba2")),
            gdn=_sub(GDNConfig, hylo.get("gdn")),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict. Teacher models round-trip to what transformers writes."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": _thaw(self.bos_token_id),
            "eos_token_id": _thaw(self.eos_token_id),
            "pad_token_id": _thaw(self.pad_token_id),
            "torch_dtype": self.torch_dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        elif self.model_type == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.is_hybrid:
            out["hylo"] = {
                "layer_types": list(self.layer_types),
                **{
                    name: _thaw(dataclasses.asdict(sub)) if name != "mla" else _mla_dict(sub)
                    for name in ("mla", "mamba2", "gdn")
                    if (sub := getattr(self, name)) is not None
                },
            }
        return out

    # -------------------------------------------------------------- KV cache
    def cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """Bytes of cache that grow with each token, summed over layers.

        Attention caches K and V for every KV head; MLA caches the KV latent and the
        RoPE key; Mamba2 and GDN keep a constant-size state (0 per token).
        """
        per_layer = {
            "attention": 2 * self.num_key_value_heads * self.head_dim,
            "mla": 0
            if self.mla is None
            else self.mla.kv_lora_rank
            + self.mla.qk_rope_head_dim * (self.num_key_value_heads if self.mla.rope_per_kv_head else 1),
            "mamba2": 0,
            "gdn": 0,
        }
        return bytes_per_element * sum(per_layer[kind] for kind in self.layer_types)

    def state_bytes(self, bytes_per_element: int = 4) -> int:
        """Constant-size recurrent state of the linear layers (per sequence), incl. conv."""
        total = 0
        for kind in self.layer_types:
            if kind == "mamba2":
                m = self.mamba2
                conv_dim = m.num_heads * m.head_dim + 2 * m.n_groups * m.state_size
                total += m.num_heads * m.head_dim * m.state_size + conv_dim * (m.conv_kernel - 1)
            elif kind == "gdn":
                g = self.gdn
                conv_dim = g.num_heads * (2 * g.head_k_dim + g.head_v_dim)
                total += g.num_heads * g.head_k_dim * g.head_v_dim + conv_dim * (g.conv_kernel - 1)
        return bytes_per_element * total


def _mla_dict(mla: MLAConfig) -> dict:
    d = dataclasses.asdict(mla)
    d["rope_scaling"] = _thaw(mla.rope_scaling) if mla.rope_scaling else None
    return d


def _sub(cls, d: Mapping[str, Any] | None):
    if not d:
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
    d = dict(d)
    if "rope_scaling" in d and d["rope_scaling"]:
        d["rope_scaling"] = _freeze(d["rope_scaling"])
    return cls(**d)


# ------------------------------------------------------- hybrid student configs
# Every check of a student config lives here: its own consistency (ModelConfig.validate,
# validate_mla_config) and its fit to the teacher it is upcycled from (check_student_config).

# Fields a student config adds to its teacher's; every other field must be equal.
HYBRID_FIELDS = ("layer_types", "mla", "mamba2", "gdn")


def mla_rope_pairs(config: ModelConfig) -> tuple[int, ...]:
    """The teacher rotary pairs MLA keeps: config.mla.rope_pairs or the lowest ones."""
    m = config.mla
    return m.rope_pairs if m.rope_pairs is not None else tuple(range(m.qk_rope_head_dim // 2))


def validate_mla_config(config: ModelConfig) -> None:
    """Raise ValueError naming the problem if `config.mla` cannot describe an MLA layer."""
    m = config.mla
    if m is None:
        raise ValueError("an MLA layer needs config.mla (MLAConfig)")
    d, half = config.head_dim, config.head_dim // 2
    if m.qk_rope_head_dim <= 0 or m.qk_rope_head_dim % 2:
        raise ValueError(f"mla.qk_rope_head_dim={m.qk_rope_head_dim} must be a positive even number (whole rotary pairs)")
    if m.qk_nope_head_dim < 0 or m.qk_nope_head_dim + m.qk_rope_head_dim != d:
        raise ValueError(
            f"mla.qk_nope_head_dim + mla.qk_rope_head_dim = {m.qk_nope_head_dim} + {m.qk_rope_head_dim} "
            f"must equal the teacher head_dim {d}"
        )
    if m.v_head_dim <= 0:
        raise ValueError(f"mla.v_head_dim={m.v_head_dim} must be positive")
    if m.kv_lora_rank <= 0:
        raise ValueError(f"mla.kv_lora_rank={m.kv_lora_rank} must be positive")
    if m.q_lora_rank < 0:
        raise ValueError(f"mla.q_lora_rank={m.q_lora_rank} must be >= 0 (0 = full-rank q_proj)")
    pairs = mla_rope_pairs(config)
    if len(pairs) != m.qk_rope_head_dim // 2:
        raise ValueError(
            f"mla.rope_pairs has {len(pairs)} pairs but qk_rope_head_dim={m.qk_rope_head_dim} needs "
            f"{m.qk_rope_head_dim // 2}"
        )
    if len(set(pairs)) != len(pairs) or min(pairs) < 0 or max(pairs) >= half:
        raise ValueError(f"mla.rope_pairs={list(pairs)} must be distinct rotary pair indices in [0, {half})")
    if config.qkv_bias:
        raise ValueError("MLA has no q/k/v biases; a teacher with attention biases (Qwen2) cannot use MLA layers")


def mla_max_ranks(teacher: ModelConfig, mla: MLAConfig) -> tuple[int, int]:
    """(largest q_lora_rank, largest kv_lora_rank) an SVD init can give (min matrix dims)."""
    h, d_model = teacher.num_attention_heads, teacher.hidden_size
    q_max = min(d_model, h * teacher.head_dim)
    # The stacked [K_nope; V] repeats each KV head's rows, so its rank is at most Hkv rows' worth.
    kv_max = min(d_model, h * (mla.qk_nope_head_dim + mla.v_head_dim))
    return q_max, kv_max


def default_mamba2_config(teacher: ModelConfig, **overrides) -> Mamba2Config:
    """One Mamba2 head and B/C group per teacher query head; head_dim = state_size =
    the teacher's head_dim (so x, B, C take V, K, Q whole)."""
    base = Mamba2Config(
        num_heads=teacher.num_attention_heads,
        head_dim=teacher.head_dim,
        n_groups=teacher.num_attention_heads,
        state_size=teacher.head_dim,
    )
    return dataclasses.replace(base, **overrides)


def default_gdn_config(teacher: ModelConfig, **overrides) -> GDNConfig:
    """One GDN head per teacher query head; key and value head dims = the teacher's head_dim."""
    base = GDNConfig(
        num_heads=teacher.num_attention_heads,
        head_k_dim=teacher.head_dim,
        head_v_dim=teacher.head_dim,
    )
    return dataclasses.replace(base, **overrides)


def check_linear_sizes(kind: str, config: ModelConfig) -> None:
    """Raise unless config.mamba2 / config.gdn (`kind`) takes the teacher's attention heads
    whole, which weight transfer from attention needs (see default_*_config)."""
    hq, d = config.num_attention_heads, config.head_dim
    expected = {"num_heads": hq, "head_dim": d, "n_groups": hq, "state_size": d, "head_k_dim": d, "head_v_dim": d}
    sub = getattr(config, kind)
    bad = {name: (getattr(sub, name), want) for name, want in expected.items() if getattr(sub, name, want) != want}
    if bad:
        detail = ", ".join(f"{name}={v} (needs {e})" for name, (v, e) in bad.items())
        raise ValueError(
            f"{kind} sizes do not fit the teacher's attention for weight transfer: {detail}; "
            f"use hylo_jax.config.default_{kind}_config(teacher)"
        )


def make_student_config(
    teacher: ModelConfig,
    layer_types: tuple[str, ...] | list[str],
    *,
    mla: MLAConfig | None = None,
    mamba2: Mamba2Config | None = None,
    gdn: GDNConfig | None = None,
) -> ModelConfig:
    """The teacher's config with per-layer mixers; Mamba2/GDN sizes default to the ones
    that take the teacher's heads whole (default_mamba2_config, default_gdn_config)."""
    layer_types = tuple(layer_types)
    bad = [(i, k) for i, k in enumerate(layer_types) if k not in MIXERS]
    if bad:
        raise ValueError(f"unknown mixer(s) {bad} (layer, name); choose from {MIXERS}")
    if len(layer_types) != teacher.num_hidden_layers:
        raise ValueError(f"{len(layer_types)} layer types for a teacher with {teacher.num_hidden_layers} layers")
    if "mla" in layer_types and mla is None:
        raise ValueError("layer_types has 'mla' layers but no MLAConfig was given")
    return teacher.replace(
        layer_types=layer_types,
        mla=mla if "mla" in layer_types else None,
        mamba2=(mamba2 or default_mamba2_config(teacher)) if "mamba2" in layer_types else None,
        gdn=(gdn or default_gdn_config(teacher)) if "gdn" in layer_types else None,
    )


def check_student_config(teacher: ModelConfig, student: ModelConfig) -> None:
    """Raise ValueError unless `student` can be upcycled from `teacher` (no work done)."""
    if teacher.is_hybrid:
        raise ValueError(f"the teacher must be a plain Transformer; it has layer types {set(teacher.layer_types)}")
    diff = [
        f"{f.name}: teacher {getattr(teacher, f.name)!r} vs student {getattr(student, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in HYBRID_FIELDS and getattr(teacher, f.name) != getattr(student, f.name)
    ]
    if diff:
        raise ValueError("the student config must equal the teacher's outside the hybrid fields; " + "; ".join(diff))
    kinds = set(student.layer_types)
    d, hq = teacher.head_dim, teacher.num_attention_heads
    if "mla" in kinds:
        validate_mla_config(student)
        m = student.mla
        if m.v_head_dim != d:
            raise ValueError(f"mla.v_head_dim={m.v_head_dim} must equal the teacher head_dim {d} (o_proj is copied)")
        q_max, kv_max = mla_max_ranks(teacher, m)
        if m.q_lora_rank > q_max:
            raise ValueError(f"mla.q_lora_rank={m.q_lora_rank} exceeds the dims of W_Q ({teacher.hidden_size} x {hq * d}): at most {q_max}")
        if m.kv_lora_rank > kv_max:
            raise ValueError(
                f"mla.kv_lora_rank={m.kv_lora_rank} exceeds the dims of the stacked [W_K; W_V] "
                f"({hq * (m.qk_nope_head_dim + m.v_head_dim)} x {teacher.hidden_size}): at most {kv_max}"
            )
    for kind in ("mamba2", "gdn"):
        if kind in kinds:
            check_linear_sizes(kind, student)
