"""Time every MoE strategy against the dense reference on prefill and decode shapes.

    python -m bench.moe_strategies [--quick] [--json out.json]

The shapes are one MoE layer of the benchmark model (dim 512, FFN 1792, 8 experts, top-2, fp32). Prints
each strategy's time and its speed-up over `dense`; `mixtral_jax.model.moe.resolve_strategy` ('auto') follows
what this shows on each backend.
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from mixtral_jax.model.moe import STRATEGIES, resolve_strategy, route, run_experts


def _time(fn, *args, reps: int, rounds: int = 3) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def measure(tokens: int, dim=512, hidden=1792, experts=8, top_k=2, quick=False) -> dict[str, float]:
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (tokens, dim))
    router = jax.random.normal(keys[1], (dim, experts))
    w1, w3 = (0.05 * jax.random.normal(k, (experts, dim, hidden)) for k in keys[2:4])
    w2 = 0.05 * jax.random.normal(keys[4], (experts, hidden, dim))
    reps = 2 if quick else (5 if tokens >= 512 else 50)
    times = {}
    for name in STRATEGIES:
        if name == "gather" and tokens * top_k > 4 * experts:
            continue  # copies every chosen expert's weights per token: for decode batches only
        if name == "gmm" and jax.default_backend() != "gpu":
            continue  # the Triton kernel; elsewhere Pallas' interpreter (exact, for tests, not timed)
        if quick and name == "ragged" and jax.default_backend() == "cpu":
            continue  # a dense dot over all groups on XLA:CPU, slower than `dense`: the full table has it
        fn = jax.jit(lambda x, r, a, b, c, name=name: run_experts(x, route(x, r, top_k), a, b, c, name))
        times[name] = _time(fn, x, router, w1, w3, w2, reps=reps, rounds=2 if quick else 3)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    shapes = {"decode b1": 1, "decode b8": 8, "decode b64": 64, "prefill 1024": 1024}
    results = {}
    print(f"backend: {jax.default_backend()}  ({jax.devices()[0].device_kind})")
    print(f"{'shape':<14}" + "".join(f"{n:>12}" for n in STRATEGIES) + f"{'auto':>12}{'best/dense':>12}")
    for label, tokens in shapes.items():
        times = measure(tokens, quick=args.quick)
        auto = resolve_strategy("auto")
        best = min(times, key=times.get)
        results[label] = dict(times_ms={k: v * 1e3 for k, v in times.items()}, auto=auto, best=best,
                              best_vs_dense=times["dense"] / times[best],
                              auto_vs_dense=times["dense"] / times[auto])
        print(f"{label:<14}" + "".join(f"{times[n] * 1e3:>10.3f}ms" if n in times else f"{'-':>12}"
                                        for n in STRATEGIES)
              + f"{auto:>12}{times['dense'] / times[best]:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps({"moe_best_vs_dense_prefill": results["prefill 1024"]["best_vs_dense"],
                      "moe_auto_vs_dense_prefill": results["prefill 1024"]["auto_vs_dense"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
