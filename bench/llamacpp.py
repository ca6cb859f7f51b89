"""llama.cpp as a same-run peer: the engine people run Mixtral with on a CPU.

Used by `python -m bench` when `llama_cpp` (llama-cpp-python) imports; `python -m bench.llamacpp_setup`
builds it from source into the venv (not part of CI). The bench's saved Hugging Face directory is
converted to GGUF by llama.cpp's own `convert_hf_to_gguf.py` (shipped in the sdist under vendor/llama.cpp),
as f32 and as q8_0, so both engines run the same random weights. Timing mirrors ours: decode tokens/s
between the first and the last streamed step after a 128-token prompt (greedy; `n_threads` defaults to
every core); prefill is one 1024-token batch into a fresh context. The converted model's logits match
ours (max |diff| 8e-4 on logits of scale 2 for a 16-token prompt, same argmax), so both run one model.
"""

from __future__ import annotations

import glob
import importlib.resources
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import numpy as np

OUTTYPES = ("f32", "q8_0")
CONVERTER_ENV = "LLAMACPP_CONVERTER"  # path to convert_hf_to_gguf.py, where the setup script's place is not used


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def find_converter(prefix: str | None = None) -> str | None:
    """convert_hf_to_gguf.py: $LLAMACPP_CONVERTER, else the source tree `bench.llamacpp_setup` unpacked
    under the venv (`<prefix>/src/llama_cpp_python-*/vendor/llama.cpp`), newest first; None if neither."""
    explicit = os.environ.get(CONVERTER_ENV)
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"${CONVERTER_ENV} points at {explicit}, which is not a file")
        return explicit
    pattern = os.path.join(prefix or sys.prefix, "src", "llama_cpp_python-*", "vendor", "llama.cpp",
                           "convert_hf_to_gguf.py")
    found = sorted(glob.glob(pattern))
    return found[-1] if found else None


def convert_command(converter: str, hf_dir: str, outfile: str, outtype: str,
                    python: str | None = None) -> list[str]:
    """The converter's command line for one output type."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    return [python or sys.executable, converter, hf_dir, "--outtype", outtype, "--outfile", outfile]


def add_tokenizer(hf_dir: str) -> str:
    """The converter needs a vocabulary; the bench model has none. Mixtral's own SentencePiece model
    (32000 pieces, the bench's vocab size) goes in as tokenizer.model. Returns its path."""
    dest = os.path.join(hf_dir, "tokenizer.model")
    asset = importlib.resources.files("mixtral_jax").joinpath("assets/tokenizer.model.v1")
    with asset.open("rb") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest


def convert(hf_dir: str, out_dir: str, outtypes=OUTTYPES, converter: str | None = None) -> dict[str, str]:
    """GGUF files {outtype: path} of the saved HF model, written by llama.cpp's converter."""
    converter = converter or find_converter()
    if converter is None:
        raise FileNotFoundError("convert_hf_to_gguf.py not found: run `python -m bench.llamacpp_setup` "
                                f"or set ${CONVERTER_ENV}")
    if not os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
        add_tokenizer(hf_dir)
    files = {}
    for outtype in outtypes:
        outfile = os.path.join(out_dir, f"bench-{outtype}.gguf")
        done = subprocess.run(convert_command(converter, hf_dir, outfile, outtype), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed:\n{done.stderr[-2000:]}")
        files[outtype] = outfile
    return files


def _load(path: str, n_ctx: int, n_batch: int, threads: int):
    from llama_cpp import Llama  # optional peer: only imported when installed

    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                 n_threads_batch=threads, verbose=False)


def decode(path: str, prompt: list[int], new: int, reps: int, threads: int | None = None) -> float:
    """Batch-1 greedy decode tokens/s between the first and last streamed token (best of `reps`)."""
    threads = threads or os.cpu_count() or 1
    llm = _load(path, n_ctx=len(prompt) + new + 8, n_batch=len(prompt), threads=threads)

    def run() -> float:
        llm.reset()
        times = []
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == new:
                break
        return (len(times) - 1) / (times[-1] - times[0])

    run()  # warm-up
    return max(run() for _ in range(reps))


def prefill(path: str, tokens: int, reps: int, threads: int | None = None, seed: int = 0) -> float:
    """Tokens/s of one `tokens`-long batch into a fresh context (best of `reps`, after a warm-up)."""
    threads = threads or os.cpu_count() or 1
    llm = _load(path, n_ctx=tokens, n_batch=tokens, threads=threads)
    ids = np.random.default_rng(seed).integers(3, llm.n_vocab(), tokens).tolist()

    def run() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - start

    run()
    return tokens / min(run() for _ in range(reps))
