"""`serve`'s start-up check: the paged engine's step compiled for the model as loaded, refused (before the
engine allocates its pages) when it needs more than a device holds, with what would fit."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.errors import PlanError
from mixtral_jax.inference.paged_step import EngineConfig
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.placement import shard_model
from mixtral_jax.planning import serve_plan
from mixtral_jax.sharding.mesh import make_mesh


def _cpu_model(mesh_spec=None):
    model = Mixtral(MixtralConfig.tiny(max_seq_len=128), RuntimeConfig(param_dtype="float32"), rngs=nnx.Rngs(0))
    return shard_model(model, make_mesh(mesh_spec, jax.devices()[:8])) if mesh_spec else model


@pytest.mark.parametrize("mesh_spec", [None, "data=2,expert=2,tensor=2"])
def test_serve_refuses_a_step_larger_than_the_device(mesh_spec):
    """The engine's step compiled for the model as loaded (here on CPU, with a device size given: CPU has no
    limit to read); a memory one byte short of what XLA says the step needs is refused, naming the
    sequences the pages hold and those the memory would."""
    model = _cpu_model(mesh_spec)
    engine = EngineConfig(max_batch=8, max_context=64, prefill_chunk=16, page_size=8)
    assert serve_plan.engine_fit(model, engine) is None  # CPU: nothing to check against
    fit = serve_plan.check_engine_fits(model, engine, device_bytes=1 << 40)
    assert fit.fits and fit.sequences == 8 and fit.sequences_that_fit > 1000
    page = fit.need_bytes - serve_plan.engine_fit(
        model, EngineConfig(max_batch=8, max_context=64, prefill_chunk=16, page_size=8, num_pages=8 * 8 - 8),
        device_bytes=1 << 40).need_bytes
    assert page > 0  # one sequence's pages fewer (8 pages of every layer) needs less
    with pytest.raises(PlanError, match=r"pages hold 8 sequences of 64, this memory holds [0-7] "):
        serve_plan.check_engine_fits(model, engine, device_bytes=fit.need_bytes - 1)
