"""`mixtral_jax.load`: a converted checkpoint straight into a (sharded) `Mixtral`.

    model = mixtral_jax.load("mixtral-8x7b-orbax", mesh="expert=4,tensor=2")

Every parameter is restored by Orbax directly into the sharding `mixtral_jax.sharding.param_shardings`
gives it on the mesh, so each process reads only the chunks its own devices hold and no device ever
holds a full copy first. The checkpoint carries its config and the name of its tokenizer, so nothing else
is needed.
"""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh

from .config import RuntimeConfig, as_dtype
from .model import Mixtral
from .params import assemble_model, param_specs


def load(path: str | os.PathLike, mesh: Mesh | str | dict | None = None, dtype=None, moe_strategy: str = "auto",
         *, compute_dtype=None) -> Mixtral:
    """Load a checkpoint written by `mixtral-jax convert` (see `mixtral_jax.convert.orbax_io`).

    `mesh`: a `jax.sharding.Mesh`, or a spec such as `"expert=4,tensor=2"` for `make_mesh`; None puts
    everything on the default device. `dtype`: the parameter dtype (default: the checkpoint's own, so
    bf16 stays bf16; anything else is cast while reading). `compute_dtype`: the matmul dtype (default:
    `dtype`). `moe_strategy`: see `RuntimeConfig`.
    """
    from mixtral_jax.convert import orbax_io
    from mixtral_jax.sharding import param_shardings
    from mixtral_jax.sharding.placement import sharded_runtime

    info = orbax_io.read_info(path)
    runtime = RuntimeConfig(param_dtype=as_dtype(dtype) if dtype is not None else info.dtype,
                            compute_dtype=compute_dtype, moe_strategy=moe_strategy)
    if mesh is not None:  # checks the mesh can hold this model; the MoE then runs expert-parallel
        runtime = sharded_runtime(info.config, runtime, mesh)
    specs = param_specs(info.config, runtime)
    orbax_io.check_specs(info, specs)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = {name: device for name in specs}
    else:
        shardings = param_shardings(specs, runtime.mesh)
    abstract = {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype, sharding=shardings[name])
                for name, spec in specs.items()}
    arrays = orbax_io.restore(info.path, abstract)
    model = assemble_model(info.config, runtime, lambda name, spec: arrays.pop(name))
    model.tokenizer_name = info.tokenizer  # what `generate`/`chat` encode with (`tokenizer_for`)
    return model
