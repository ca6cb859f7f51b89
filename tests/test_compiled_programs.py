"""Why the whole suite fits in one process: compiled programs hold memory mappings until jax's caches let go.

`tests/conftest.py` clears the caches after a module once the mappings pass half of `vm.max_map_count`;
this checks the two facts that rests on, on a small scale. It counts in a fresh process: inside the suite,
the garbage collector freeing earlier tests' programs mid-count took thousands of mappings away (CI saw
"300 live programs added -4083 mappings")."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts Linux memory mappings")

_COUNT = """
import gc
import jax, jax.numpy as jnp
from tests.helpers import memory_mappings

x = jnp.ones((4, 4))
jax.jit(lambda a: a + 1)(x).block_until_ready()  # the runtime's own first mappings, before counting
gc.collect()
before = memory_mappings()
keep = []
for i in range(300):
    f = jax.jit(lambda a, i=i: jnp.tanh(a * i + 1.0).sum(0))
    f(x).block_until_ready()
    keep.append(f)  # alive, as a test module's jitted functions are
grown = memory_mappings() - before
jax.clear_caches()
gc.collect()
after = memory_mappings() - before
print(grown, after, float(keep[7](x)[0]), float(jnp.tanh(8.0)))
"""


def test_live_programs_hold_mappings_and_clearing_the_caches_returns_them():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", _COUNT], env=env, cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, after, seventh, tanh8 = out.stdout.split()
    grown, after = int(grown), int(after)
    assert grown > 300, f"300 live XLA:CPU programs added only {grown} mappings"  # ~3 each: their JIT code
    assert after < grown // 4, f"clearing jax's caches kept the programs mapped ({after} of {grown})"
    assert float(seventh) == pytest.approx(4 * float(tanh8))  # and they still run (recompiled)
