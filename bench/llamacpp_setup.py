"""Build llama.cpp (llama-cpp-python) from source into this venv, for `python -m bench`'s llama.cpp peer.

    python -m bench.llamacpp_setup          # ~15-25 minutes on 2 cores; not part of CI

Fetches the llama-cpp-python sdist with pip, unpacks it under `<venv>/src/` (where `bench.llamacpp`
finds vendor/llama.cpp/convert_hf_to_gguf.py, the converter the bench uses), and pip-installs that tree
with CMAKE_ARGS=-DGGML_NATIVE=ON: built for this CPU's instruction set, as people build it for speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile

VERSION = "0.3.36"


def source_dir(prefix: str, version: str = VERSION) -> str:
    return os.path.join(prefix, "src", f"llama_cpp_python-{version}")


def download_command(dest: str, version: str = VERSION) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={version}", "-d", dest]


def install_command(tree: str) -> tuple[list[str], dict[str, str]]:
    """pip install of the unpacked tree, and the environment additions that make it a native build."""
    env = {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    return [sys.executable, "-m", "pip", "install", "-v", tree], env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--version", default=VERSION)
    args = p.parse_args(argv)
    src = os.path.join(sys.prefix, "src")
    tree = source_dir(sys.prefix, args.version)
    if not os.path.isdir(tree):
        os.makedirs(src, exist_ok=True)
        subprocess.run(download_command(src, args.version), check=True)
        archive = os.path.join(src, f"llama_cpp_python-{args.version}.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(src, filter="data")
    cmd, extra = install_command(tree)
    print("building llama.cpp (CMAKE_ARGS=-DGGML_NATIVE=ON); this takes a while", flush=True)
    subprocess.run(cmd, env={**os.environ, **extra}, check=True)
    print(f"installed; converter: {os.path.join(tree, 'vendor', 'llama.cpp', 'convert_hf_to_gguf.py')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
