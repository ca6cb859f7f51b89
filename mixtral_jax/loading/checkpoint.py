"""Checkpoints into a (sharded) `Mixtral`: `load` (ours), `load_hf` (Hugging Face), `load_checkpoint` (either).

    model = mixtral_jax.load("mixtral-8x7b-orbax", mesh="expert=4,tensor=2")
    model = mixtral_jax.load_hf("Mixtral-8x7B-v0.1/", dtype="bfloat16")

Every parameter goes straight into the sharding `mixtral_jax.sharding.param_shardings` gives it on the
mesh: Orbax restores only the chunks a process's own devices hold, and the Hugging Face reader reads, from
the memory-mapped files, only the experts they hold. No device ever holds a full copy first. Our checkpoints
carry their config and the name of their tokenizer, which `load` hands to the model (`tokenizer_name`).
Paths may be local or `gs://` URLs (`convert.paths`): Orbax reads a bucket through tensorstore.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh

from mixtral_jax.config import RuntimeConfig, as_dtype, check_quantize
from mixtral_jax.convert import orbax_io, paths
from mixtral_jax.convert.hf import HFCheckpoint
from mixtral_jax.convert.keymap import HF_RULES, assemble, match_keys
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.params import assemble_model, param_specs, quantized_weights, quantizing
from mixtral_jax.model.placement import sharded_runtime
from mixtral_jax.model.quant import SCALE_SUFFIX
from mixtral_jax.progress import progress
from mixtral_jax.sharding import param_shardings


def load(path: str | os.PathLike, mesh: Mesh | str | dict | None = None, dtype=None, moe_strategy: str = "auto",
         *, compute_dtype=None, quantize: str | None = None) -> Mixtral:
    """Load a checkpoint written by `mixtral-jax convert` (see `mixtral_jax.convert.orbax_io`).

    `mesh`: a `jax.sharding.Mesh`, or a spec such as `"expert=4,tensor=2"` for `make_mesh`; None puts
    everything on the default device. `dtype`: the parameter dtype (default: the checkpoint's own, so
    bf16 stays bf16; anything else is cast while reading). `compute_dtype`: the matmul dtype (default:
    `dtype`). `moe_strategy`: see `RuntimeConfig`. `quantize='int8'`: int8 weights (`mixtral_jax.model.quant`),
    quantized while reading, one weight at a time (a checkpoint converted with `--quantize int8` is
    read as it is, quantized or not).
    """
    check_quantize(quantize)
    info = orbax_io.read_info(path)
    runtime = RuntimeConfig(param_dtype=as_dtype(dtype) if dtype is not None else info.dtype,
                            compute_dtype=compute_dtype, moe_strategy=moe_strategy,
                            quantize=info.quantize or quantize, quantize_lm_head=info.quantize_lm_head)
    if mesh is not None:  # checks the mesh can hold this model; the MoE then runs expert-parallel
        runtime = sharded_runtime(info.config, runtime, mesh)
    specs = param_specs(info.config, runtime)
    quantizing_now = runtime.quantize is not None and info.quantize is None  # a float checkpoint, to quantize
    orbax_io.check_specs(info, param_specs(info.config, dataclasses.replace(runtime, quantize=None,
                                                                            quantize_lm_head=False))
                         if quantizing_now else specs)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {name: device for name in specs}
    else:
        shardings = param_shardings(specs, runtime.mesh)
    if quantizing_now:
        return _load_quantizing(info, runtime, shardings)
    abstract = {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=shardings[name])
                for name, spec in specs.items()}
    arrays = orbax_io.restore(info.path, abstract)
    model = assemble_model(info.config, runtime, lambda name, spec: arrays.pop(name))
    model.tokenizer_name = info.tokenizer  # what `generate`/`chat` encode with (`tokenizer_for`)
    return model


def _load_quantizing(info, runtime: RuntimeConfig, shardings) -> Mixtral:
    """A float checkpoint into an int8 model: the unquantized parameters in one restore, each weight to
    quantize on its own (as numpy, then placed), so one float weight at a time is in memory."""
    specs = param_specs(info.config, runtime)
    stored = orbax_io.stored_tree(info.path)
    weights = quantized_weights(specs)
    plain = {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=shardings[name])
             for name, spec in specs.items() if name in stored and name not in weights}
    arrays = orbax_io.restore(info.path, plain, partial=True)

    def get_float(name, spec):
        if name in arrays:
            return arrays.pop(name)
        value = np.asarray(orbax_io.restore(info.path, {name: stored[name]}, partial=True)[name])
        return value.astype(spec.dtype)

    get = quantizing(info.config, runtime, get_float)
    def get_array(name, spec):
        value = get(name, spec)
        return value if isinstance(value, jax.Array) else _place(value, shardings[name])  # restored already placed

    model = assemble_model(info.config, runtime, get_array)
    model.tokenizer_name = info.tokenizer
    return model


def load_hf(path: str | os.PathLike, dtype=None, *, compute_dtype=None, moe_strategy: str = "auto",
            mesh: Mesh | str | dict | None = None, show_progress: bool = True,
            quantize: str | None = None) -> Mixtral:
    """Build a `Mixtral` from a Hugging Face checkpoint, one tensor at a time.

    `dtype` is the parameter dtype (default: the checkpoint's own, so bf16 stays bf16);
    `compute_dtype` the matmul dtype (default: `dtype`). With `mesh` (a Mesh or a spec such as
    "expert=4,tensor=2") each parameter is placed as the sharding rules say and each process reads,
    from the memory-mapped files, only the slices its own devices hold. `quantize='int8'`: int8 weights,
    each quantized as it is read (on a mesh each process then reads every expert of the weights it
    quantizes: a scale needs the whole output channel).
    """
    check_quantize(quantize)
    ckpt = HFCheckpoint(path)
    param_dtype = as_dtype(dtype) if dtype is not None else ckpt.floating_dtype()
    runtime = RuntimeConfig(param_dtype=param_dtype, compute_dtype=compute_dtype, moe_strategy=moe_strategy,
                            quantize=quantize)
    if mesh is not None:
        runtime = sharded_runtime(ckpt.config, runtime, mesh)
    specs = param_specs(ckpt.config, runtime)
    shardings = param_shardings(specs, runtime.mesh) if mesh is not None else None
    float_specs = param_specs(ckpt.config, dataclasses.replace(runtime, quantize=None))
    by_target = match_keys(ckpt, HF_RULES, ckpt.config, float_specs)
    bar = progress(total=len(specs), description="loading", unit="tensors", enabled=show_progress)
    to_quantize = {n for w in quantized_weights(specs) for n in (w, w + SCALE_SUFFIX)}
    quantized = quantizing(ckpt.config, runtime, lambda name, spec: assemble(ckpt, by_target[name], spec.shape,
                                                                             spec.dtype))

    def get_array(name, spec):
        if name in to_quantize:
            value = quantized(name, spec)  # an int8 weight or its scales
            array = jax.device_put(value) if shardings is None else _place(value, shardings[name])
            bar.advance()
            return array
        parts = by_target[name]
        if shardings is None:
            array = jax.device_put(assemble(ckpt, parts, spec.shape, spec.dtype))
        elif len(parts) > 1:  # per-expert tensors: read only the experts this process's devices hold
            array = jax.make_array_from_callback(
                spec.shape, shardings[name], lambda idx: _slice_experts(ckpt, parts, spec, idx))
        else:
            full = assemble(ckpt, parts, spec.shape, spec.dtype)
            array = jax.make_array_from_callback(spec.shape, shardings[name], lambda idx: full[idx])
        bar.advance()
        return array

    with bar:
        return assemble_model(ckpt.config, runtime, get_array)


def _place(value, sharding) -> jax.Array:
    """A host array (the same on every process) into `sharding`: each process puts only its own blocks."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _slice_experts(ckpt, parts, spec, idx):
    """The block `idx` of a stacked expert parameter, reading only the experts it covers."""
    experts = range(*idx[0].indices(spec.shape[0]))
    rest = tuple(idx[1:])
    by_expert = {p.index[0]: (key, p) for key, p in parts}
    return np.stack([np.asarray(by_expert[e][1].transform(ckpt.get(by_expert[e][0])))[rest].astype(spec.dtype)
                     for e in experts])


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    return paths.is_file(paths.join(path, "config.json"))


def load_checkpoint(path: str | os.PathLike, *, dtype=None, mesh: Mesh | str | dict | None = None,
                    moe_strategy: str = "auto", quantize: str | None = None) -> Mixtral:
    """A Hugging Face directory (it has `config.json`) with `load_hf`, else one of ours with `load`."""
    if is_hf_checkpoint(path):
        return load_hf(path, dtype=dtype, mesh=mesh, moe_strategy=moe_strategy, quantize=quantize)
    return load(path, mesh=mesh, dtype=dtype, moe_strategy=moe_strategy, quantize=quantize)
