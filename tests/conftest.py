"""Session-wide test set-up: a simulated 8-device CPU mesh, and the reference models the tests share.

`reference(config, seed)` builds a tiny random `transformers` Mixtral once per session for each (config,
seed), saves it as a Hugging Face checkpoint and loads it into ours on first use: every test that asks for
the same pair gets the same objects (and so reuses the programs already compiled for that model).
"""

import dataclasses
import os

# Sharding tests run on a simulated 8-device CPU mesh; set before jax initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


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


@pytest.fixture
def xla_only(monkeypatch):
    """Decode-sized products through XLA's own ops, not mixtral_jax.kernels.cpu (their fallback path)."""
    from mixtral_jax.kernels import cpu as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "usable", lambda rows, *weights: False)
