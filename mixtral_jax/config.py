"""Configuration: the architecture (`MixtralConfig`) apart from how it runs (`RuntimeConfig`).

`MixtralConfig` describes the checkpoint and never changes for a given set of weights; its defaults are
Mixtral-8x7B (Mistral's `params.json`). `RuntimeConfig` holds the choices a user makes per run: parameter
and compute dtypes and the MoE strategy. Both are frozen so they can be static arguments under `jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from mixtral_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 14336  # each expert's SwiGLU width
    n_experts: int = 8
    top_k: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    sliding_window: int | None = None  # tokens a query sees, itself included (HF semantics)
    router_aux_loss_coef: float = 0.02
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "n_experts", "top_k", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError("norm_eps and rope_theta must be positive")
        for name in ("bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(f"{name} ({getattr(self, name)}) is outside the vocabulary of {self.vocab_size}")

    # ----------------------------------------------------------------------------------------- sizes
    def param_count(self) -> int:
        d, n_layers, e, f, v = self.dim, self.n_layers, self.n_experts, self.hidden_dim, self.vocab_size
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + d * e + 3 * e * d * f + 2 * d
        return n_layers * per_layer + 2 * v * d + d

    def active_param_count(self) -> int:
        """Parameters one token touches: attention, router, its top_k experts, embeddings row, LM head."""
        d, f = self.dim, self.hidden_dim
        attn = d * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + d * self.n_experts + 3 * self.top_k * d * f + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + d

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def mixtral_8x22b(cls) -> MixtralConfig:
        return cls.from_preset("8x22b")

    @classmethod
    def from_preset(cls, name: str) -> MixtralConfig:
        """A released Mixtral by name: "8x7b" or "8x22b" (a "mixtral-" prefix and any case accepted)."""
        key = str(name).lower().removeprefix("mixtral-").removeprefix("mixtral_")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**PRESETS[key])

    def preset_name(self) -> str | None:
        """The preset whose architecture this is (context length and training settings aside), if any."""
        for name, fields in PRESETS.items():
            preset = MixtralConfig(**fields)
            if all(getattr(self, f) == getattr(preset, f) for f in _SHAPE_FIELDS):
                return name
        return None

    @classmethod
    def tiny(cls, **overrides) -> MixtralConfig:
        """A few-kilobyte model for CPU tests; same structure as the real one."""
        base = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                    n_experts=8, top_k=2, max_seq_len=256)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> MixtralConfig:
        """From a Hugging Face `config.json` (a path to it, its directory, or the parsed dict).

        Reads both shapes of the rope setting: the hub's top-level `rope_theta` and transformers 5's
        `rope_parameters: {"rope_theta": ...}`.
        """
        raw = read_json(source, "config.json")
        model_type = raw.get("model_type", "mixtral")
        if model_type not in ("mixtral", "mistral"):
            raise ConfigError(f"config.json describes a {model_type!r} model, not Mixtral")
        if raw.get("tie_word_embeddings"):
            raise ConfigError("tied embeddings are not part of the Mixtral architecture (tie_word_embeddings=true)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"only the SiLU activation is supported, config.json has {raw['hidden_act']!r}")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported (only the default RoPE)")
        theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
        need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in need if k not in raw]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        n_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
        eos = raw.get("eos_token_id", 2)
        return cls(
            vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=raw.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            hidden_dim=raw["intermediate_size"], n_experts=raw.get("num_local_experts", 8),
            top_k=raw.get("num_experts_per_tok", 2), norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta), max_seq_len=raw.get("max_position_embeddings", 32768),
            sliding_window=raw.get("sliding_window"),
            router_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.02)),
            bos_id=raw.get("bos_token_id", 1) if raw.get("bos_token_id") is not None else 1,
            eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        )

    @classmethod
    def from_mistral(cls, source: str | os.PathLike | Mapping[str, Any]) -> MixtralConfig:
        """From Mistral's original `params.json`; a missing `rope_theta` means 1e6 as in mistral-inference."""
        raw = read_json(source, "params.json")
        need = ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size")
        missing = [k for k in need if k not in raw]
        if missing:
            raise ConfigError(f"params.json lacks required field(s): {', '.join(missing)}")
        moe = raw.get("moe") or {}
        n_heads = raw["n_heads"]
        config = cls(
            vocab_size=raw["vocab_size"], dim=raw["dim"], n_layers=raw["n_layers"], n_heads=n_heads,
            n_kv_heads=raw.get("n_kv_heads") or n_heads, head_dim=raw.get("head_dim") or raw["dim"] // n_heads,
            hidden_dim=raw["hidden_dim"], n_experts=moe.get("num_experts", 8),
            top_k=moe.get("num_experts_per_tok", 2), norm_eps=float(raw.get("norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta") or 1e6),
            max_seq_len=raw.get("max_seq_len", raw.get("max_position_embeddings", _MISTRAL_DEFAULT_CONTEXT)),
            sliding_window=raw.get("sliding_window"),
        )
        if "max_seq_len" not in raw and "max_position_embeddings" not in raw and config.preset_name():
            # Mistral's params.json does not state the context; a released model's is known (8x22B: 65536)
            config = dataclasses.replace(config, max_seq_len=PRESETS[config.preset_name()]["max_seq_len"])
        return config

    def to_hf(self) -> dict:
        """The `config.json` fields transformers' `MixtralConfig` takes (used by tests and the converter)."""
        return dict(
            model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=self.vocab_size,
            hidden_size=self.dim, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim, intermediate_size=self.hidden_dim,
            num_local_experts=self.n_experts, num_experts_per_tok=self.top_k, rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_seq_len,
            sliding_window=self.sliding_window, router_aux_loss_coef=self.router_aux_loss_coef,
            bos_token_id=self.bos_id, eos_token_id=self.eos_id, tie_word_embeddings=False, hidden_act="silu",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MixtralConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown MixtralConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> MixtralConfig:
        """From a JSON file in any of the three shapes (a HF `config.json`, Mistral's `params.json`, a
        `MixtralConfig` dict), or a checkpoint directory holding `config.json` or `params.json`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            has = {n: os.path.isfile(os.path.join(path, n)) for n in ("config.json", "params.json")}
            if has["params.json"] and not has["config.json"]:
                return cls.from_mistral(path)
            return cls.from_hf(path)
        raw = read_json(path, "config.json")
        if "hidden_size" in raw:
            return cls.from_hf(raw)
        if "n_layers" in raw and "dim" in raw and "hidden_dim" in raw and "n_experts" not in raw:
            return cls.from_mistral(raw)
        return cls.from_dict(raw)


# Released Mixtral models (`from_preset`): Mistral's `params.json` plus the context of the HF `config.json`.
PRESETS: dict[str, dict[str, Any]] = {
    "8x7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                 n_experts=8, top_k=2, rope_theta=1e6, max_seq_len=32768),
    "8x22b": dict(vocab_size=32768, dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, hidden_dim=16384,
                  n_experts=8, top_k=2, rope_theta=1e6, max_seq_len=65536),
}
_SHAPE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "n_experts",
                 "top_k")
_MISTRAL_DEFAULT_CONTEXT = 32768


MOE_STRATEGIES = ("auto", "dense", "ragged", "capacity", "gather", "grouped", "gmm")
KV_CACHE_DTYPES = ("bfloat16", "float16", "float32", "int8")  # int8: per token and head scales (KVCache)
ATTENTION_IMPLEMENTATIONS = ("auto", "plain", "blockwise", "splash", "cudnn")  # see mixtral_jax.model.attention
QUANTIZE_MODES = ("int8",)  # weight-only, see mixtral_jax.model.quant


def check_quantize(value: str | None) -> str | None:
    """None (no quantization) or one of `QUANTIZE_MODES`; anything else is a one-line `ConfigError`."""
    if value is None or value in QUANTIZE_MODES:
        return value
    raise ConfigError(f"unknown quantize {value!r}; choose from {', '.join(QUANTIZE_MODES)} (or leave it out)")
_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(dtype) -> jnp.dtype:
    """`'bf16'`, `'bfloat16'`, `jnp.bfloat16` or a numpy dtype -> a canonical numpy dtype."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype.lower()]
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ConfigError(f"unsupported dtype {dt}; use float32, bfloat16 or float16")
    return dt


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How to run a model: storage dtype of the weights, dtype of the matmuls, and the MoE strategy.

    `compute_dtype=None` computes in the parameter dtype. Norms, softmaxes, the router and the logits are
    always float32. `moe_strategy='auto'` picks the fastest exact strategy for the backend and shape
    (see `mixtral_jax.model.moe.resolve_strategy`). `capacity_factor` sizes the buckets of the 'capacity'
    strategy, which falls back to an exact path whenever a bucket would overflow.
    `attention` picks the attention implementation (`mixtral_jax.model.attention`; 'auto': splash on TPU, cuDNN
    on GPU, blockwise for long sequences elsewhere, all exact). `mesh` (a
    `jax.sharding.Mesh`, e.g. from `mixtral_jax.sharding.make_mesh("expert=4,tensor=2")`, checked against
    the model by `mixtral_jax.model.placement.sharded_runtime`) runs the MoE expert-parallel
    (`mixtral_jax.sharding.expert_parallel`); None runs it on one device. `quantize='int8'` stores the
    experts' and attention projections' weights as int8 with per-output-channel scales
    (`mixtral_jax.model.quant`); `quantize_lm_head` the LM head too.
    """

    param_dtype: Any = jnp.float32
    compute_dtype: Any = None
    moe_strategy: str = "auto"
    capacity_factor: float = 2.0
    mesh: Any = None
    attention: str = "auto"
    quantize: str | None = None
    quantize_lm_head: bool = False

    def __post_init__(self):
        check_quantize(self.quantize)
        if self.quantize_lm_head and self.quantize is None:
            raise ConfigError("quantize_lm_head needs quantize (e.g. quantize='int8')")
        if self.mesh is not None and not isinstance(self.mesh, Mesh):
            raise ConfigError(f"RuntimeConfig.mesh must be a jax.sharding.Mesh or None, got {self.mesh!r}; "
                              f"build one with mixtral_jax.sharding.make_mesh(spec)")
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", as_dtype(self.compute_dtype))
        if self.moe_strategy not in MOE_STRATEGIES:
            raise ConfigError(f"unknown moe_strategy {self.moe_strategy!r}; choose from {', '.join(MOE_STRATEGIES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"unknown attention {self.attention!r}; "
                              f"choose from {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be positive, got {self.capacity_factor}")

    @property
    def dtype(self) -> jnp.dtype:
        return self.compute_dtype if self.compute_dtype is not None else self.param_dtype


def read_json(source: str | os.PathLike | Mapping[str, Any], filename: str) -> dict:
    """A JSON object from a file, or from `filename` inside a directory (a mapping passes through);
    every failure is one `ConfigError` line naming the file."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, filename)
    if not os.path.isfile(path):
        raise ConfigError(f"{filename} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return raw
