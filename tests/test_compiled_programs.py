"""Why the whole suite fits in one process: compiled programs hold memory mappings until jax's caches let go.

`tests/conftest.py` clears the caches after a module once the mappings pass half of `vm.max_map_count`;
this checks the two facts that rests on, on a small scale."""

import gc
import os

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import memory_mappings

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory mappings")


def test_live_programs_hold_mappings_and_clearing_the_caches_returns_them():
    x = jnp.ones((4, 4))
    before = memory_mappings()
    keep = []
    for i in range(300):
        f = jax.jit(lambda a, i=i: jnp.tanh(a * i + 1.0).sum(0))
        f(x).block_until_ready()
        keep.append(f)  # alive, as a test module's jitted functions are
    grown = memory_mappings() - before
    assert grown > 300, f"300 live XLA:CPU programs added only {grown} mappings"  # ~3 each: their JIT code
    jax.clear_caches()
    gc.collect()
    assert memory_mappings() - before < grown // 4, "clearing jax's caches kept the programs mapped"
    assert float(keep[7](x)[0]) == pytest.approx(4 * float(jnp.tanh(8.0)))  # and they still run (recompiled)
