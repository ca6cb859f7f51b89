"""Where batch-1 fp32 decode time goes on CPU: tokens/s, and a per-op profile of the jitted decode step.

    python -m bench.decode_profile [--hf-dir DIR] [--steps 64] [--profile]
    XLA_FLAGS=--xla_cpu_... python -m bench.decode_profile     # try an XLA:CPU flag
    python -m bench.decode_profile --hf-dir DIR --sweep 3      # every flag set in SWEEP, 3 alternating rounds

Uses the bench model (bench/speed.py; built and saved by transformers unless --hf-dir holds it). Prints
streamed decode tokens/s (as `python -m bench` measures it) and the whole-loop rate (one `lax.while_loop`,
no per-step dispatch). `--profile` traces streamed steps with `jax.profiler` and sums the XLA:CPU
op events by name (the XLA op/fusion names; add --xla_cpu_enable_xprof_traceme=true to XLA_FLAGS
for every thunk), with the weight bytes each decode step must read for scale.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from bench.speed import BENCH_CONFIG, PROMPT, _StepClock, decode_bytes_per_step
from mixtral_jax import load_hf
from mixtral_jax.inference.sampler import Sampler

# XLA:CPU flag sets tried by --sweep (each in a fresh process: XLA reads XLA_FLAGS once).
SWEEP = {
    "default": "",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "onednn_dot": "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "vector_512": "--xla_cpu_prefer_vector_width=512",
}


def sweep(hf_dir: str, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Best streamed and while_loop tok/s per flag set; the sets alternate each round, so the machine's
    background load falls on all of them alike."""
    best: dict[str, dict[str, float]] = {}
    for _ in range(rounds):
        for name, flags in SWEEP.items():
            env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
            cmd = [sys.executable, "-m", "bench.decode_profile", "--hf-dir", hf_dir, "--steps", str(steps),
                   "--reps", "2", "--json-line"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{name}: failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            got = best.setdefault(name, {"streamed": 0.0, "loop": 0.0})
            for k in got:
                got[k] = max(got[k], figures[k])
            print(f"{name:<24}streamed {figures['streamed']:6.1f}  while_loop {figures['loop']:6.1f} tok/s", flush=True)
    print("\nbest of rounds:")
    for name, got in best.items():
        print(f"{name:<24}streamed {got['streamed']:6.1f}  while_loop {got['loop']:6.1f} tok/s   {SWEEP[name]}")
    return best


def _model(hf_dir: str | None):
    if hf_dir and os.path.exists(os.path.join(hf_dir, "config.json")):
        return load_hf(hf_dir, show_progress=False)
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**BENCH_CONFIG.to_hf())).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(hf_dir or d)
        return load_hf(hf_dir or d, show_progress=False)


def streamed_rate(sampler: Sampler, prompt, steps: int, reps: int) -> float:
    rates = []
    for _ in range(reps + 1):  # the first compiles
        clock = _StepClock()
        sampler(prompt, steps, stop_tokens=[], stream=clock)
        rates.append(clock.rate(1))
    return max(rates[1:])


def loop_rate(sampler: Sampler, prompt, steps: int, reps: int) -> float:
    """(steps - 1) / (time for `steps` tokens - time for 1): the prefill cancels out."""
    def best(n):
        sampler(prompt, n, stop_tokens=[])
        t = []
        for _ in range(reps):
            start = time.perf_counter()
            sampler(prompt, n, stop_tokens=[])
            t.append(time.perf_counter() - start)
        return min(t)

    return (steps - 1) / (best(steps) - best(1))


def profile(sampler: Sampler, prompt, steps: int, top: int) -> None:
    """Traces decode steps only: the trace starts at the first streamed token (after the prefill)."""
    with tempfile.TemporaryDirectory() as d:
        sampler(prompt, steps + 1, stop_tokens=[], stream=lambda *_: None)  # compiled before tracing
        seen = []

        def start_after_prefill(*_):
            if not seen:
                jax.profiler.start_trace(d)
            seen.append(1)

        sampler(prompt, steps + 1, stop_tokens=[], stream=start_after_prefill)
        jax.profiler.stop_trace()
        paths = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb")]
        data = jax.profiler.ProfileData.from_file(paths[0])
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.defaultdict(int)
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":  # the Python tracer's calls; the XLA threads' events are the ops
                continue
            for name, ns in _self_times(line.events):
                totals[name] += ns
                counts[name] += 1
    print(f"\ntop {top} XLA:CPU events by self time over {steps} streamed steps, all threads "
          "(ms per step, count per step):")
    for name, ns in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{ns / 1e6 / steps:9.3f}  {counts[name] / steps:7.1f}  {name}")
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, ns in totals.items():  # dot.497 -> dot, cond.10.clone.6 -> cond, ThunkExecutor::Execute kept
        kinds[name if "::" in name else name.split(".")[0]] += ns
    print("by kind (ms per step): " + ", ".join(f"{k} {v / 1e6 / steps:.2f}"
                                                for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:12]))


def _self_times(events):
    """(name, duration minus the events nested in it) for one thread's events."""
    events = sorted(events, key=lambda e: (e.start_ns, -e.duration_ns))
    out, stack = [], []  # stack: [end_ns, name, self_ns]
    for e in events:
        while stack and stack[-1][0] <= e.start_ns:
            _, name, own = stack.pop()
            out.append((name, own))
        if stack:
            stack[-1][2] -= e.duration_ns
        stack.append([e.start_ns + e.duration_ns, e.name, e.duration_ns])
    out.extend((name, own) for _, name, own in stack)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", help="a saved bench model (written here when missing)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--sweep", type=int, metavar="ROUNDS", help="time every XLA flag set in SWEEP")
    p.add_argument("--json-line", action="store_true", help="end with the figures as JSON (for --sweep)")
    args = p.parse_args(argv)
    if args.sweep:
        if not args.hf_dir:
            p.error("--sweep needs --hf-dir (one saved model for every run)")
        _model(args.hf_dir)  # saved once
        sweep(args.hf_dir, args.sweep, args.steps)
        return 0
    model = _model(args.hf_dir)
    sampler = Sampler(model)
    prompt = np.random.default_rng(1).integers(3, BENCH_CONFIG.vocab_size, (1, PROMPT)).tolist()
    streamed = streamed_rate(sampler, prompt, args.steps, args.reps)
    loop = loop_rate(sampler, prompt, args.steps, args.reps)
    mb = decode_bytes_per_step(BENCH_CONFIG, 1, PROMPT + args.steps // 2) / 1e6
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"decode b1: streamed {streamed:.1f} tok/s ({1e3 / streamed:.2f} ms/step), "
          f"while_loop {loop:.1f} tok/s ({1e3 / loop:.2f} ms/step); {mb:.0f} MB read per step -> "
          f"{mb * streamed / 1e3:.1f} GB/s streamed")
    if args.profile:
        profile(sampler, prompt, args.steps, args.top)
    if args.json_line:
        print(json.dumps({"streamed": streamed, "loop": loop}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
