"""LoRA: low-rank adapters on the attention projections and on every routed expert's w1 / w3 / w2.

    lora.add_adapters(model, LoRAConfig(rank=16, alpha=32, targets=ALL_TARGETS), seed=0)
    model(tokens)                    # each adapted projection: base + (x @ A) @ B * alpha / rank
    lora.adapter_arrays(model)       # {'layers.0.attn.wq_lora_a': ..., ...}: what LoRA training updates
    placement.merge_adapters(model)  # a plain Mixtral with W + A @ B * alpha / rank (for export)

The adapters are `LoRAParam`s (an `nnx.Param` subclass: `nnx.state(model, LoRAParam)` is the adapter
state, the base is the rest), attributes `<weight>_lora_a` / `<weight>_lora_b` of a layer's `attn` or
`moe` module beside the frozen base weight, which may be float or int8 (QLoRA-style: int8 base, float
adapters). They are applied, never merged, on every step: in the attention projections here (`plus`),
and inside every MoE strategy and the expert-parallel `shard_map` as `ExpertLoRA`
(`mixtral_jax.model.moe`), the experts' adapters carrying a leading expert axis.

Shapes (l = rank; PEFT's `lora_A.weight` is a transposed, `lora_B.weight` b transposed, see
`mixtral_jax.convert.peft`):

| target | weight | a | b |
| --- | --- | --- | --- |
| q_proj | wq (d, h, x) | (d, l) | (l, h, x) |
| k_proj, v_proj | wk, wv (d, k, x) | (d, l) | (l, k, x) |
| o_proj | wo (h, x, d) | (h, x, l) | (l, d) |
| w1, w3 | (e, d, f) | (e, d, l) | (e, l, f) |
| w2 | (e, f, d) | (e, f, l) | (e, l, d) |

A new adapter starts as PEFT's does: a uniform in +-1/sqrt(fan_in) (kaiming-uniform with a = sqrt(5)),
b zero, so the adapted model starts equal to the base.

Several adapters at once (multi-adapter serving):

    lora.stack_adapters(model, {"sql": (cfg1, arrays1), "chat": (cfg2, arrays2)})
    model(tokens, adapter_ids=jnp.array([1, 0, 2]))   # row 0 with "sql", row 1 the base, row 2 "chat"

stacks them along the rank into one wide adapter of rank R = r1 + r2 (a target an adapter lacks: zero
columns; each adapter's alpha / r folded into its b, so the wide scale is 1), and each token carries a
mask over the R columns (ones on its own adapter's, `LoRAStack.mask`): `((x @ a) * mask) @ b` is exactly
each token's own adapter, in one batched low-rank product for a batch that mixes adapters, with no
gather of per-row weights. The mask travels with the tokens through every MoE strategy and the
expert-parallel all_to_all (`ExpertLoRA.mask`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import ConfigError
from mixtral_jax.model.moe import ExpertLoRA
from mixtral_jax.sharding.rules import DEFAULT_RULES, Rule, param_shardings

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("w1", "w2", "w3")
ALL_TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS
WEIGHT_OF = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "w1": "w1", "w2": "w2", "w3": "w3"}
MODULE_OF = {**dict.fromkeys(ATTENTION_TARGETS, "attn"), **dict.fromkeys(EXPERT_TARGETS, "moe")}
A_SUFFIX, B_SUFFIX = "_lora_a", "_lora_b"

# the attention's low-rank products: x -> (x @ a) -> (.. @ b), letters as in mixtral.py
_WEIGHT_INDEX = {"wq": 0, "wk": 1, "wv": 2, "wo": 3}  # each projection's own dropout mask (fold_in)
_ATTENTION_SPECS = {"wq": ("btd,dl->btl", "btl,lhx->bthx"), "wk": ("btd,dl->btl", "btl,lkx->btkx"),
                    "wv": ("btd,dl->btl", "btl,lkx->btkx"), "wo": ("bthx,hxl->btl", "btl,ld->btd")}


@dataclasses.dataclass(frozen=True)
class LoRAStack:
    """Which adapters a stacked model carries: their names (adapter i + 1 is `names[i]`; 0 is the base)
    and ranks, in the order their columns sit along the wide rank axis. Static (hashable): it is part of
    the model's graph, not its state."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    def index(self, name: str | None) -> int:
        """0 for the base (None), i + 1 for `names[i]`; ConfigError for a name not stacked."""
        if name is None:
            return 0
        if name not in self.names:
            raise ConfigError(f"no LoRA adapter {name!r}; loaded: {', '.join(self.names) or '(none)'}")
        return self.names.index(name) + 1

    def mask(self, adapter_ids: jax.Array, dtype=jnp.float32) -> jax.Array:
        """(..., R): 1 on the rank columns of each id's adapter, 0 elsewhere (every 0 for id 0, the base)."""
        owner = np.repeat(np.arange(1, len(self.ranks) + 1, dtype=np.int32), self.ranks)  # column -> adapter
        return (jnp.asarray(adapter_ids, jnp.int32)[..., None] == owner).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Rank, alpha (the update is scaled by alpha / rank, as PEFT without rsLoRA), dropout (PEFT's
    `lora_dropout` on the adapter's input while training; the attention targets only, as PEFT, which
    refuses it on Mixtral's fused experts) and the targets, named as
    PEFT names Mixtral's modules."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS
    stack: LoRAStack | None = None  # several adapters side by side along the rank (`stack_adapters`)

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown or not targets:
            raise ConfigError(f"unknown LoRA targets {unknown or '(none)'}; choose from {', '.join(ALL_TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in ALL_TARGETS if t in targets))  # canonical order
        if self.stack is not None and (self.stack.rank != self.rank or self.alpha != self.rank):
            raise ConfigError(f"stacked adapters of ranks {list(self.stack.ranks)} need rank = alpha = "
                              f"{self.stack.rank}, got {self.rank} and {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        if self.stack is not None:
            raise ConfigError("stacked adapters are not one adapter: save each of them on its own")
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping) -> LoRAConfig:
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)), tuple(d["targets"]))


class LoRAParam(nnx.Param):
    """A trainable adapter weight; every other `nnx.Param` of an adapted model stays frozen."""


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    logical_axes: tuple[str | None, ...]


def _shapes(config: MixtralConfig, target: str, rank: int):
    """((a shape, a axes), (b shape, b axes)) of one target's adapter."""
    d, h, k, x, e, f, r = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.n_experts,
                           config.hidden_dim, rank)
    return {
        "q_proj": (((d, r), ("embed", "lora_rank")), ((r, h, x), ("lora_rank", "q_heads", "head_dim"))),
        "k_proj": (((d, r), ("embed", "lora_rank")), ((r, k, x), ("lora_rank", "kv_heads", "head_dim"))),
        "v_proj": (((d, r), ("embed", "lora_rank")), ((r, k, x), ("lora_rank", "kv_heads", "head_dim"))),
        "o_proj": (((h, x, r), ("q_heads", "head_dim", "lora_rank")), ((r, d), ("lora_rank", "embed"))),
        "w1": (((e, d, r), ("expert", "embed", "lora_rank")), ((e, r, f), ("expert", "lora_rank", "mlp"))),
        "w3": (((e, d, r), ("expert", "embed", "lora_rank")), ((e, r, f), ("expert", "lora_rank", "mlp"))),
        "w2": (((e, f, r), ("expert", "mlp", "lora_rank")), ((e, r, d), ("expert", "lora_rank", "embed"))),
    }[target]


def adapter_name(layer: int, target: str, part: str) -> str:
    """'layers.3.moe.w1_lora_a': the flat name (as `param_specs` names parameters) of an adapter array."""
    return f"layers.{layer}.{MODULE_OF[target]}.{WEIGHT_OF[target]}{A_SUFFIX if part == 'a' else B_SUFFIX}"


def adapter_specs(config: MixtralConfig, lora: LoRAConfig, dtype=jnp.float32) -> dict[str, AdapterSpec]:
    """`{name: AdapterSpec}` of every adapter array, layer by layer (what `add_adapters` creates)."""
    specs = {}
    for i in range(config.n_layers):
        for target in lora.targets:
            for part, (shape, axes) in zip("ab", _shapes(config, target, lora.rank), strict=True):
                specs[adapter_name(i, target, part)] = AdapterSpec(shape, np.dtype(dtype), axes)
    return specs


def init_adapters(config: MixtralConfig, lora: LoRAConfig, seed: int = 0, dtype=jnp.float32) -> dict[str, np.ndarray]:
    """Fresh adapters as PEFT makes them: a ~ U(+-1/sqrt(fan_in)), b = 0 (numpy, float32 by default)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in adapter_specs(config, lora, dtype).items():
        if name.endswith(A_SUFFIX):
            fan_in = int(np.prod(spec.shape[1:-1] if ".moe." in name else spec.shape[:-1]))
            bound = 1.0 / np.sqrt(fan_in)
            out[name] = rng.uniform(-bound, bound, spec.shape).astype(spec.dtype)
        else:
            out[name] = np.zeros(spec.shape, spec.dtype)
    return out


def add_adapters(model, lora: LoRAConfig, arrays: Mapping[str, np.ndarray | jax.Array] | None = None, *,
                 seed: int = 0, rules: Mapping[str, Rule] = DEFAULT_RULES):
    """Attach adapters to `model` in place (and return it): `arrays` by `adapter_name` (e.g. read from a
    PEFT file), else `init_adapters(seed)`. On a mesh they are laid out by the rules table (experts'
    adapters over the expert axis). Replaces adapters the model already has."""
    remove_adapters(model)
    specs = adapter_specs(model.config, lora)
    arrays = init_adapters(model.config, lora, seed) if arrays is None else arrays
    missing = [n for n in specs if n not in arrays]
    extra = [n for n in arrays if n not in specs]
    if missing or extra:
        raise ConfigError(f"adapter arrays do not match the LoRA config: missing {missing[:3]}, unexpected {extra[:3]}")
    mesh = model.runtime.mesh
    shardings = param_shardings(specs, mesh, rules) if mesh is not None else {}
    for name, spec in specs.items():
        value = jnp.asarray(arrays[name])
        if tuple(value.shape) != spec.shape:
            raise ConfigError(f"{name}: adapter of shape {list(value.shape)}, expected {list(spec.shape)}")
        value = value.astype(spec.dtype)
        value = jax.device_put(value, shardings[name]) if mesh is not None else value
        _, layer, module, attr = name.split(".")
        owner = getattr(model.layers[int(layer)], module)
        setattr(owner, attr, LoRAParam(value, logical_axes=spec.logical_axes))
        owner.lora_scale = lora.scale
        if module == "attn":
            owner.lora_dropout = lora.dropout
    model.lora = lora
    return model


def stack_adapters(model, adapters: Mapping[str, tuple[LoRAConfig, Mapping[str, np.ndarray]]], *,
                   rules: Mapping[str, Rule] = DEFAULT_RULES):
    """Attach several adapters at once, `{name: (LoRAConfig, arrays by adapter_name)}` (e.g. from
    `read_peft`), stacked along the rank (see the module docstring); `lora_stack(model)` names them.
    A forward pass then takes `adapter_ids` (0: the base, i + 1: the i-th name); without them every row
    is the base. Replaces adapters the model already has."""
    if not adapters:
        raise ConfigError("stack_adapters needs at least one adapter")
    config = model.config
    targets = tuple(t for t in ALL_TARGETS if any(t in cfg.targets for cfg, _ in adapters.values()))
    wide_rank = sum(cfg.rank for cfg, _ in adapters.values())
    stack = LoRAStack(tuple(adapters), tuple(cfg.rank for cfg, _ in adapters.values()))
    wide = LoRAConfig(wide_rank, float(wide_rank), 0.0, targets, stack)  # scale 1: folded into each b
    arrays = {}
    for name, (cfg, own) in adapters.items():
        specs = adapter_specs(config, cfg)
        missing = [n for n in specs if n not in own]
        if missing or len(own) != len(specs):
            raise ConfigError(f"adapter {name!r}: arrays do not match its LoRA config (missing {missing[:3]})")
        for n, spec in specs.items():
            if tuple(np.shape(own[n])) != spec.shape:
                raise ConfigError(f"adapter {name!r}: {n} of shape {list(np.shape(own[n]))}, expected "
                                  f"{list(spec.shape)} for this model")
    for i in range(config.n_layers):
        for target in targets:
            for part, (shape, _) in zip("ab", _shapes(config, target, wide_rank), strict=True):
                key = adapter_name(i, target, part)
                axis = len(shape) - 1 if part == "a" else (1 if target in EXPERT_TARGETS else 0)  # the rank axis
                pieces = []
                for cfg, own in adapters.values():
                    piece_shape = list(shape)
                    piece_shape[axis] = cfg.rank
                    if target not in cfg.targets:
                        pieces.append(np.zeros(piece_shape, np.float32))
                    else:
                        value = np.asarray(own[key], np.float32)
                        pieces.append(value if part == "a" else value * np.float32(cfg.scale))
                arrays[key] = np.concatenate(pieces, axis=axis)
    return add_adapters(model, wide, arrays, rules=rules)


def lora_stack(model) -> LoRAStack | None:
    """The `LoRAStack` of a model with stacked adapters (its `lora_config().stack`; copies made with
    `add_adapters(out, lora_config(model), ...)`, as `shard_model` does, keep it), or None."""
    cfg = lora_config(model)
    return None if cfg is None else cfg.stack


def token_mask(model, adapter_ids, shape: tuple[int, ...], dtype) -> jax.Array | None:
    """The (*shape, R) rank mask of tokens (`shape`, e.g. (b, t)) whose adapters are `adapter_ids`
    (broadcast onto `shape`; None: every token the base) on a stacked model; None on any other (its
    adapter, if any, acts on every token)."""
    stack = lora_stack(model)
    if stack is None:
        if adapter_ids is not None:
            raise ConfigError("adapter_ids need a model with stacked adapters (lora.stack_adapters)")
        return None
    ids = jnp.zeros(shape, jnp.int32) if adapter_ids is None else jnp.broadcast_to(adapter_ids, shape)
    return stack.mask(ids, dtype)


def remove_adapters(model):
    """Drop every adapter from `model` in place (and return it): the base model again."""
    for layer in model.layers:
        for module in (layer.attn, layer.moe):
            for weight in ("wq", "wk", "wv", "wo", "w1", "w2", "w3"):
                for suffix in (A_SUFFIX, B_SUFFIX):
                    if hasattr(module, weight + suffix):
                        delattr(module, weight + suffix)
            for attr in ("lora_scale", "lora_dropout"):
                if hasattr(module, attr):
                    delattr(module, attr)
    if getattr(model, "lora", None) is not None:
        model.lora = None
    return model


def lora_config(model) -> LoRAConfig | None:
    """The `LoRAConfig` of the adapters `model` carries, or None."""
    return getattr(model, "lora", None)


def adapter_arrays(model) -> dict[str, jax.Array]:
    """The model's adapters by name, in `adapter_specs` order ({} without adapters)."""
    lora = lora_config(model)
    if lora is None:
        return {}
    out = {}
    for name in adapter_specs(model.config, lora):
        _, layer, module, attr = name.split(".")
        out[name] = getattr(getattr(model.layers[int(layer)], module), attr)[...]
    return out


def plus(module, weight: str, x: jax.Array, y: jax.Array, mask: jax.Array | None = None,
         dropout_key: jax.Array | None = None) -> jax.Array:
    """`y` (the base projection of `x` by `module.<weight>`) plus its adapter's term, if it has one.
    `mask` (b, t, l): each token's rank columns (stacked adapters; see `stack_adapters`). `dropout_key`
    (training only): PEFT's `lora_dropout` on the adapter's input, `lora_B(lora_A(dropout(x)))`."""
    a = getattr(module, weight + A_SUFFIX, None)
    if a is None:
        return y
    b = getattr(module, weight + B_SUFFIX)
    down, up = _ATTENTION_SPECS[weight]
    rate = getattr(module, "lora_dropout", 0.0)
    if dropout_key is not None and rate > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, _WEIGHT_INDEX[weight]), 1.0 - rate, x.shape)
        x = jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))
    h = jnp.einsum(down, x, a[...].astype(x.dtype))
    if mask is not None:
        h = h * mask.astype(h.dtype)
    return y + (jnp.einsum(up, h, b[...].astype(x.dtype)) * jnp.asarray(module.lora_scale, x.dtype)).astype(y.dtype)


def experts(module, mask: jax.Array | None = None) -> ExpertLoRA | None:
    """The `ExpertLoRA` of a MoE module's adapters (None without any), for the MoE strategies; `mask`
    (tokens, l): the tokens' rank columns (stacked adapters)."""
    pairs = {}
    for weight in ("w1", "w3", "w2"):
        a = getattr(module, weight + A_SUFFIX, None)
        pairs[weight] = None if a is None else (a[...], getattr(module, weight + B_SUFFIX)[...])
    if all(p is None for p in pairs.values()):
        return None
    return ExpertLoRA(pairs["w1"], pairs["w3"], pairs["w2"], module.lora_scale, mask)


_MERGE_SPECS = {"wq": "dl,lhx->dhx", "wk": "dl,lkx->dkx", "wv": "dl,lkx->dkx", "wo": "hxl,ld->hxd",
                "w1": "edl,elf->edf", "w3": "edl,elf->edf", "w2": "efl,eld->efd"}


def delta(weight: str, a, b, scale: float) -> np.ndarray:
    """scale * a @ b in `weight`'s own layout (float32, on the host): what merging adds to it."""
    return np.einsum(_MERGE_SPECS[weight], np.asarray(a, np.float32), np.asarray(b, np.float32)) * np.float32(scale)
