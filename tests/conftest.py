import os

# Sharding tests run on a simulated 8-device CPU mesh; set before jax initialises its backends.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def xla_only(monkeypatch):
    """Decode-sized products through XLA's own ops, not mixtral_jax.kernels.cpu (their fallback path)."""
    from mixtral_jax.kernels import cpu as cpu_kernels

    monkeypatch.setattr(cpu_kernels, "usable", lambda rows, *weights: False)
