"""Ours against llama.cpp, alternating: decode b1 and prefill 1024, several rounds, best and median.

    python -m bench.vs_llamacpp --hf-dir DIR [--rounds 5] [--no-prefill]
    python -m bench.vs_llamacpp --hf-dir DIR --check     # the GGUF f32 model's logits against ours

On a shared machine a single run says little: llama.cpp's threads spin at their barriers, so a busy core
costs it far more than it costs XLA. Each round runs every engine once, in turn, so background load falls
on all of them alike; the best of the rounds is the figure closest to a quiet machine. Needs llama_cpp
(`python -m bench.llamacpp_setup`); the model is the bench's, saved in DIR (written there when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jax.numpy as jnp
import numpy as np

from bench import llamacpp
from bench.decode_profile import _model
from bench.speed import BENCH_CONFIG, PROMPT, ours_decode, ours_prefill
from mixtral_jax.model.placement import quantize_model


def check_logits(model, gguf: str, prompt: list[int]) -> tuple[float, float, float]:
    """(max |llama.cpp - ours| over the prompt's logits, max |ours|, argmax agreement): one model, two engines."""
    from llama_cpp import Llama  # optional peer

    llm = Llama(model_path=gguf, n_ctx=2 * len(prompt), n_batch=len(prompt), logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs = np.asarray(llm.scores[:len(prompt)])
    ours = np.asarray(model(jnp.asarray([prompt])))[0]
    return float(np.abs(theirs - ours).max()), float(np.abs(ours).max()), float((theirs.argmax(-1) ==
                                                                                  ours.argmax(-1)).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--check", action="store_true", help="compare the f32 GGUF's logits with ours, then stop")
    args = p.parse_args(argv)
    if not llamacpp.available():
        p.error("llama_cpp is not installed: run `python -m bench.llamacpp_setup`")
    model = _model(args.hf_dir)
    files = {t: os.path.join(args.hf_dir, f"bench-{t}.gguf") for t in llamacpp.OUTTYPES}
    if not all(os.path.exists(f) for f in files.values()):
        files = llamacpp.convert(args.hf_dir, args.hf_dir)
    prompt = np.random.default_rng(1).integers(3, BENCH_CONFIG.vocab_size, PROMPT).tolist()
    if args.check:
        diff, scale, agree = check_logits(model, files["f32"], prompt[:16])
        print(f"llama.cpp f32 vs ours, 16-token prompt: max |diff| {diff:.2e} (logits up to {scale:.2f}), "
              f"argmax agrees at {agree:.0%} of positions")
        return 0
    ours = {"ours fp32": model, "ours int8": quantize_model(model, lm_head=True)}  # int8 everywhere, as q8_0
    engines = {**ours, **{f"llama.cpp {t}": f for t, f in files.items()}}
    runs: dict[str, dict[str, list[float]]] = {"decode_b1": {}, "prefill": {}}
    for r in range(args.rounds):
        for name, path in engines.items():
            mine = ours.get(name)
            d = ours_decode(mine, 1, args.new, 1) if mine is not None else llamacpp.decode(path, prompt, args.new, 1)
            runs["decode_b1"].setdefault(name, []).append(d)
            if not args.no_prefill:
                f = ours_prefill(mine, 1024, 2) if mine is not None else llamacpp.prefill(path, 1024, 1)
                runs["prefill"].setdefault(name, []).append(f)
            print(f"round {r + 1} {name:<16} decode b1 {d:7.1f}" + ("" if args.no_prefill else f"  prefill {f:7.1f}"),
                  flush=True)
    summary = {}
    for what, per_engine in runs.items():
        for name, values in per_engine.items():
            summary[f"{what} {name}"] = {"best": max(values), "median": statistics.median(values)}
            print(f"{what:<10}{name:<16} best {max(values):7.1f}  median {statistics.median(values):7.1f} tok/s")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
