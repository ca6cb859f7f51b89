"""Two and four local processes joined by `jax.distributed` (gloo on 127.0.0.1) give one process's logits."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import MixtralConfig
from tests.helpers import REPO_ROOT
from tests.helpers.hf_reference import hf_logits, hf_model, save_hf

HERE = os.path.join(REPO_ROOT, "tests", "helpers")
pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = MixtralConfig.tiny()
    hf = hf_model(config, seed=2)
    return hf, save_hf(hf, tmp_path_factory.mktemp("hf"))


def _run(n_processes: int, ckpt: str, mesh: str, out: str) -> list[str]:
    port = _free_port()
    procs = []
    for pid in range(n_processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", MIXTRAL_JAX_COORDINATOR=f"127.0.0.1:{port}",
                   MIXTRAL_JAX_NUM_PROCESSES=str(n_processes), MIXTRAL_JAX_PROCESS_ID=str(pid),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n_processes}")
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), ckpt, mesh, out],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(stdout)
        assert p.returncode == 0, stdout[-3000:]
    return outputs


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
