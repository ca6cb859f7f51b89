"""The TPU chips' HBM in `topologies.CHIPS` is what XLA:TPU itself allows a program: a serving plan sizes its
KV pages to fill that figure, so one above XLA's (v4 at its nominal 32 GiB, XLA allows 30.75) makes XLA
refuse the first size and the retry under-counts the pages. Each generation's figure is read from XLA's
refusal of a program twice the table's HBM, compiled for one chip (libtpu, no TPU)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.planning.topologies import GIB, get_topology

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
pytestmark = pytest.mark.tpu

_AVAILABLE_RE = re.compile(r"exceeds available HBM \(([\d.]+)G\)")


def xla_available_hbm(slice_name: str) -> float:
    """GiB XLA:TPU says a chip of `slice_name` has, from its refusal of an over-sized program."""
    topo = get_topology(slice_name)
    sharding = NamedSharding(Mesh(np.array(topo.devices()[:1]), ("x",)), PartitionSpec())
    n = 2 * topo.chip.hbm_bytes // 4
    lowered = jax.jit(lambda a: a * 2 + 1, out_shardings=sharding).lower(
        jax.ShapeDtypeStruct((n,), jnp.float32, sharding=sharding))
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED") as e:
        lowered.compile()
    m = _AVAILABLE_RE.search(str(e.value))
    assert m, str(e.value)[:500]
    return float(m[1])


@pytest.mark.parametrize("slice_name", ["v4-8", "v5e-8", "v5p-8", "v6e-8"])
def test_chip_hbm_is_what_xla_allows(slice_name):
    hbm = get_topology(slice_name).chip.hbm_bytes
    assert xla_available_hbm(slice_name) == pytest.approx(hbm / GIB, abs=0.005)
