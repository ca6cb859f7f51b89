"""Decode speed of the serving engine with stacked LoRA adapters against the bare base, on the demo model.

    python -m bench.lora_serve                 # 8 greedy requests, 64 new tokens each, 3 rounds; rank 8 adapters

Runs, each on its own engine over the same weights: the base (no adapters); one adapter added
(`add_adapters`, every request with it); two adapters stacked (`stack_adapters`) with every request on
the base, and with the requests split over a / b / none (the mixed batch serving exists for). Decode
tokens/s = tokens drawn after every request has its first token / the time that took (prefill left out);
the median of the rounds after a warm-up round that compiles. Adapters target attention and experts.
The demo model is tiny (dim 112, expert hidden 160), so rank-8 adapters cost far more of a step here than
on Mixtral-8x7B (dim 4096, hidden 14336); with any adapter the MoE also leaves the decode CPU kernel
(`kernels.cpu`, no low-rank terms) for XLA's `grouped` strategy. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from mixtral_jax.config import RuntimeConfig
from mixtral_jax.inference.engine import Engine, EngineConfig, SamplingParams
from mixtral_jax.loading.demo import default_model
from mixtral_jax.model import lora


def _adapter(config, cfg: lora.LoRAConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: v if k.endswith(lora.A_SUFFIX) else rng.normal(0, 0.05, v.shape).astype(np.float32)
            for k, v in lora.init_adapters(config, cfg, seed).items()}


def decode_rate(engine: Engine, prompts, new: int, adapters) -> float:
    """Decode tokens/s of `prompts` submitted together (request i with adapter `adapters[i]`)."""
    counts = [0] * len(prompts)
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(max_tokens=new, stop_tokens=()), adapter=adapters[i],
                      on_token=lambda _, i=i: counts.__setitem__(i, counts[i] + 1))
    while not all(counts):
        engine.step()
    start, before = time.perf_counter(), sum(counts)
    while not engine.idle:
        engine.step()
    return (sum(counts) - before) / (time.perf_counter() - start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    runtime = RuntimeConfig(param_dtype="float32")
    config = default_model(runtime).config
    cfg = lora.LoRAConfig(rank=args.rank, alpha=2.0 * args.rank, targets=lora.ALL_TARGETS)
    two = {"a": (cfg, _adapter(config, cfg, 1)), "b": (cfg, _adapter(config, cfg, 2))}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, args.prompt).tolist() for _ in range(args.requests)]
    engine_config = EngineConfig(max_batch=args.requests, max_context=args.prompt + args.new_tokens + 16,
                                 prefill_chunk=256, prefix_cache=False)
    n = args.requests
    runs = {  # name: (model, each request's adapter)
        "base, no adapters": (default_model(runtime), [None] * n),
        "1 adapter added, all requests on it": (lora.add_adapters(default_model(runtime), *two["a"]), [None] * n),
        "2 stacked, all requests on the base": (lora.stack_adapters(default_model(runtime), two), [None] * n),
        "2 stacked, requests a / b / base": (lora.stack_adapters(default_model(runtime), two),
                                             [("a", "b", None)[i % 3] for i in range(n)]),
    }
    engines = {name: Engine(model, engine_config) for name, (model, _) in runs.items()}
    rates = {name: [] for name in runs}
    for round_ in range(args.rounds + 1):  # round 0 compiles; the runs alternate so background load is shared
        for name, engine in engines.items():
            rate = decode_rate(engine, prompts, args.new_tokens, runs[name][1])
            if round_:
                rates[name].append(rate)
    base = statistics.median(rates["base, no adapters"])
    print(f"decode tok/s, {n} requests x {args.new_tokens} tokens after {args.prompt}-token prompts, demo model "
          f"fp32, rank {args.rank} adapters on {','.join(cfg.targets)}; median of {args.rounds} rounds")
    report = {}
    for name, values in rates.items():
        med = statistics.median(values)
        report[name] = {"median": round(med, 1), "min": round(min(values), 1), "max": round(max(values), 1)}
        print(f"  {name:40s} {med:8.1f}  ({min(values):.1f} - {max(values):.1f})  {med / base:5.2f}x base")
    print(json.dumps({"requests": n, "new_tokens": args.new_tokens, "rank": args.rank, "decode_tok_s": report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
