"""Session-wide test set-up: a simulated 8-device CPU mesh, the reference models the tests share, and a bound
on the compiled programs one process keeps alive.

`reference(config, seed)` builds a tiny random `transformers` Mixtral once per session for each (config,
seed), saves it as a Hugging Face checkpoint and loads it into ours on first use: every test that asks for
the same pair gets the same objects (and so reuses the programs already compiled for that model).
"""

import dataclasses
import gc
import os

# Sharding tests run on a simulated 8-device CPU mesh; set before jax initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Compiling dominates the suite's time (a module run twice with a warm persistent cache takes a quarter of
# the time), and most of a CPU compile is LLVM optimising code for tensors of a few hundred elements:
# unoptimised code compiles ~30% faster and runs these tiny models as fast. Numerics do not change (LLVM
# reorders no float arithmetic at any level without fast-math, which XLA leaves off).
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers import memory_mappings  # noqa: E402
from tests.helpers.gcs import gcs_bucket, gcs_emulator  # noqa: E402, F401 - fixtures for any test that needs a bucket


@dataclasses.dataclass
class Reference:
    """A random `transformers` model (`hf`, fp32), its checkpoint on disk (`path`), and ours loaded from it."""

    config: object
    hf: object
    path: str
    _models: dict = dataclasses.field(default_factory=dict, repr=False)

    def model(self, **load_kwargs):
        """`mixtral_jax.load_hf(path, **load_kwargs)`, loaded once per distinct set of arguments."""
        import mixtral_jax

        key = tuple(sorted(load_kwargs.items()))
        if key not in self._models:
            self._models[key] = mixtral_jax.load_hf(self.path, show_progress=False, **load_kwargs)
        return self._models[key]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(config, seed=0) -> Reference, one per (config, seed) for the whole session."""
    from tests.helpers.hf_reference import hf_model, save_hf

    built = {}

    def get(config, seed: int = 0) -> Reference:
        if (config, seed) not in built:
            hf = hf_model(config, seed=seed)
            built[config, seed] = Reference(config, hf, save_hf(hf, tmp_path_factory.mktemp("hf")))
        return built[config, seed]

    return get


def _max_memory_mappings() -> int:
    with open("/proc/sys/vm/max_map_count") as f:
        return int(f.read())


@pytest.fixture(autouse=True, scope="module")
def bounded_compiled_programs():
    """Drop jax's compiled programs after a test module once they hold half the process's memory mappings.

    Every XLA:CPU executable keeps its JIT code mapped (about 3 mappings) for as long as jax's caches hold
    it, and they hold every program the suite has compiled. One process running the whole suite reached
    Linux's limit (`vm.max_map_count`, 65530 by default) after ~800 tests; the next compile then failed to
    map its code and XLA crashed unwinding that error (a segfault in `_Unwind_Find_FDE`, inside
    `backend_compile_and_load`). Clearing only when needed keeps the programs that test modules share.
    """
    yield
    if os.path.exists("/proc/self/maps") and memory_mappings() > _max_memory_mappings() // 2:
        import jax

        jax.clear_caches()
        gc.collect()


@pytest.fixture
def xla_only(monkeypatch):
    """Decode-sized products through XLA's own ops, not mixtral_jax.kernels.cpu (their fallback path)."""
    from mixtral_jax.kernels import cpu as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "usable", lambda rows, *weights: False)
