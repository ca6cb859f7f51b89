"""Put a model's parameters on a mesh as the rules say, after checking the mesh can hold this model.

Above the model in the import graph (it builds models); the rules and meshes it applies live in
`mixtral_jax.sharding`, below the model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.errors import ConfigError
from mixtral_jax.model import lora as lora_lib
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.params import assemble_model, model_arrays, param_specs, quantizing
from mixtral_jax.sharding import DEFAULT_RULES, Rule, ShardingError, make_mesh, param_shardings


def check_mesh(config: MixtralConfig, mesh: Mesh) -> None:
    """Fail before any work, saying what to change, if `mesh` cannot lay out `config`."""
    experts, tensor = mesh.shape.get("expert", 1), mesh.shape.get("tensor", 1)
    if config.n_experts % experts:
        divisors = [d for d in range(1, config.n_experts + 1) if config.n_experts % d == 0]
        raise ShardingError(f"{config.n_experts} experts cannot be split over expert={experts}; "
                            f"use an expert axis of {divisors} and put the other devices on data or tensor")
    for name, size in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                       ("hidden_dim", config.hidden_dim), ("vocab_size", config.vocab_size)):
        if size % tensor:
            raise ShardingError(f"{name} ({size}) is not divisible by tensor={tensor}; use a tensor axis that "
                                f"divides {name} (and the others: heads {config.n_heads}, kv heads "
                                f"{config.n_kv_heads}, hidden {config.hidden_dim}, vocab {config.vocab_size})")


def sharded_runtime(config: MixtralConfig, runtime: RuntimeConfig, mesh: Mesh | str | dict) -> RuntimeConfig:
    """`runtime` on `mesh` (a Mesh or a spec for `make_mesh`), once `check_mesh` accepts it."""
    mesh = make_mesh(mesh)
    check_mesh(config, mesh)
    return dataclasses.replace(runtime, mesh=mesh)


def shard_model(model: Mixtral, mesh: Mesh | str | dict, rules: Mapping[str, Rule] = DEFAULT_RULES) -> Mixtral:
    """A copy of `model` whose parameters live on `mesh` per the rules and whose MoE runs expert-parallel."""
    runtime = sharded_runtime(model.config, model.runtime, mesh)
    shardings = param_shardings(param_specs(model.config, runtime), runtime.mesh, rules)
    arrays = model_arrays(model)
    out = assemble_model(model.config, runtime, lambda name, spec: jax.device_put(arrays[name], shardings[name]))
    return _with_adapters_of(model, out, rules)


def _with_adapters_of(model: Mixtral, out: Mixtral, rules: Mapping[str, Rule] = DEFAULT_RULES) -> Mixtral:
    """`out` with `model`'s LoRA adapters (if any), laid out for `out`'s mesh."""
    lora = lora_lib.lora_config(model)
    if lora is not None:
        lora_lib.add_adapters(out, lora, {k: np.asarray(v) for k, v in lora_lib.adapter_arrays(model).items()},
                              rules=rules)
    return out


def merge_adapters(model: Mixtral) -> Mixtral:
    """A copy of `model` without adapters whose adapted weights are `W + alpha / rank * a @ b` (summed in
    float32, cast back to W's dtype), laid out as `model` is: what an export of a LoRA run writes. An int8
    base is refused (merging would quantize the update away): load the base in float to merge."""
    lora = lora_lib.lora_config(model)
    if lora is None:
        raise ConfigError("the model has no LoRA adapters to merge")
    if model.runtime.quantize is not None:
        raise ConfigError("cannot merge adapters into int8 weights (the update would be rounded away); load the "
                          "base model in float32 or bfloat16 to merge")
    arrays, adapters = model_arrays(model), lora_lib.adapter_arrays(model)
    deltas = {}
    for i in range(model.config.n_layers):
        for target in lora.targets:
            weight = lora_lib.WEIGHT_OF[target]
            deltas[f"layers.{i}.{lora_lib.MODULE_OF[target]}.{weight}"] = (
                weight, lora_lib.adapter_name(i, target, "a"), lora_lib.adapter_name(i, target, "b"))

    def get(name, spec):
        base = arrays[name]
        if name not in deltas:
            return base
        weight, a, b = deltas[name]
        merged = np.asarray(base, np.float32) + lora_lib.delta(weight, adapters[a], adapters[b], lora.scale)
        return jax.device_put(merged.astype(spec.dtype), base.sharding)

    out = assemble_model(model.config, model.runtime, get)
    if hasattr(model, "tokenizer_name"):
        out.tokenizer_name = model.tokenizer_name
    return out


def quantize_model(model: Mixtral, quantize: str = "int8", *, lm_head: bool = False) -> Mixtral:
    """A copy of `model` with int8 weights (experts and attention projections; the LM head with
    `lm_head`), laid out as `model` is (same device or mesh). One weight at a time, on the host."""
    runtime = dataclasses.replace(model.runtime, quantize=quantize, quantize_lm_head=lm_head)
    arrays = model_arrays(model)
    get = quantizing(model.config, runtime, lambda name, spec: np.asarray(arrays[name]))
    if runtime.mesh is None:
        device = next(iter(arrays.values())).sharding
        out = assemble_model(model.config, runtime, lambda name, spec: jax.device_put(get(name, spec), device))
    else:
        shardings = param_shardings(param_specs(model.config, runtime), runtime.mesh)
        out = assemble_model(model.config, runtime,
                             lambda name, spec: jax.device_put(get(name, spec), shardings[name]))
    if hasattr(model, "tokenizer_name"):
        out.tokenizer_name = model.tokenizer_name
    return _with_adapters_of(model, out)
