"""Two and four local processes joined by `jax.distributed` (gloo on 127.0.0.1) give one process's logits."""

import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import MixtralConfig
from tests.helpers.hf_reference import hf_logits, hf_model, save_hf
from tests.helpers.processes import run_processes

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = MixtralConfig.tiny()
    hf = hf_model(config, seed=2)
    return hf, save_hf(hf, tmp_path_factory.mktemp("hf"))


def _run(n_processes: int, ckpt: str, mesh: str, out: str) -> list[str]:
    return run_processes(n_processes, "multihost_worker.py", [ckpt, mesh, out])


@pytest.mark.parametrize("n_processes,mesh", [(2, "data=2,expert=4"), (4, "expert=4,tensor=2")])
def test_processes_match_one_process(checkpoint, tmp_path, n_processes, mesh):
    hf, ckpt = checkpoint
    out = str(tmp_path / "logits.npy")
    outputs = _run(n_processes, ckpt, mesh, out)
    assert all(f"/{n_processes}: {8 // n_processes} local of 8 devices" in o for o in outputs), outputs
    tokens = np.random.default_rng(0).integers(0, MixtralConfig.tiny().vocab_size, (4, 16))
    single = np.asarray(mixtral_jax.load_hf(ckpt, show_progress=False)(tokens))
    np.testing.assert_allclose(np.load(out), single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(single, hf_logits(hf, tokens), atol=1e-4, rtol=0)
