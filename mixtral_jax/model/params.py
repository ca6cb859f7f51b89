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

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.quant import SCALE_SUFFIX, contracted_axes, quantize


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


def quantized_weights(specs: Mapping[str, ParamSpec]) -> dict[str, tuple[int, ...]]:
    """`{weight name: contracted axes}` of the quantized weights in `specs` (those with a `_scale`)."""
    return {name: contracted_axes(spec.logical_axes, specs[name + SCALE_SUFFIX].logical_axes)
            for name, spec in specs.items() if name + SCALE_SUFFIX in specs}


def quantizing(config: MixtralConfig, runtime: RuntimeConfig,
               get_float: Callable[[str, ParamSpec], np.ndarray]) -> Callable[[str, ParamSpec], np.ndarray]:
    """A `get_array` for `assemble_model(config, runtime, ...)` from one that returns the unquantized
    parameters (by the unquantized specs): each quantized weight is read once, as float, and quantized
    (`mixtral_jax.model.quant.quantize`), its int8 values and scales handed out in turn; one weight at a time."""
    specs = param_specs(config, runtime)
    float_specs = param_specs(config, dataclasses.replace(runtime, quantize=None, quantize_lm_head=False))
    contract = quantized_weights(specs)
    pending: dict[str, list] = {}

    def get(name: str, spec: ParamSpec):
        base = name[:-len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in contract \
            else name
        if base not in contract:
            return get_float(name, spec)
        if base not in pending:
            pending[base] = list(quantize(np.asarray(get_float(base, float_specs[base])), contract[base]))
        pair = pending[base]
        i = 1 if name != base else 0
        value, pair[i] = pair[i], None
        if pair[0] is None and pair[1] is None:
            del pending[base]
        return value

    return get
