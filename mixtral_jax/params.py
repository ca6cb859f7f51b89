"""The one description of every weight (path, shape, dtype, logical axes), derived from the model itself.

`param_specs` traces the model's constructor with `nnx.eval_shape`, so nothing is allocated even for the
full 46.7B-parameter config. Loaders, converters and sharding rules all work from these specs, and
`assemble_model` puts arrays back into a real `Mixtral` without ever initialising random weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from .config import MixtralConfig, RuntimeConfig
from .model import Mixtral


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: np.dtype
    logical_axes: tuple[str | None, ...]


def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def _abstract_model(config: MixtralConfig, runtime: RuntimeConfig):
    abstract = nnx.eval_shape(lambda: Mixtral(config, runtime, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def param_specs(config: MixtralConfig, runtime: RuntimeConfig | None = None) -> dict[str, ParamSpec]:
    """`{'layers.0.attn.wq': ParamSpec(...), ...}` in the model's own order."""
    _, state = _abstract_model(config, runtime or RuntimeConfig())
    specs = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value()
        specs[_path_name(path)] = ParamSpec(tuple(value.shape), np.dtype(value.dtype), tuple(var.logical_axes))
    return specs


def assemble_model(config: MixtralConfig, runtime: RuntimeConfig,
                   get_array: Callable[[str, ParamSpec], jax.Array]) -> Mixtral:
    """Build a `Mixtral` whose every parameter comes from `get_array(name, spec)`, called one at a time."""
    graphdef, state = _abstract_model(config, runtime)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        name = _path_name(path)
        spec = ParamSpec(tuple(var.get_value().shape), np.dtype(var.get_value().dtype), tuple(var.logical_axes))
        array = get_array(name, spec)
        if tuple(array.shape) != spec.shape or np.dtype(array.dtype) != spec.dtype:
            raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, expected {spec.dtype}{list(spec.shape)}")
        var.set_value(array)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_arrays(model: Mixtral) -> Mapping[str, jax.Array]:
    """The model's parameters by name (the inverse of `assemble_model`)."""
    return {_path_name(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
