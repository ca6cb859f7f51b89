"""Decode and prefill speed against transformers, llama.cpp and this machine's limits, in one run.

    python -m bench --quick          # ratios for the targets, ~2 min on 2 quiet cores (+~1 min with llama.cpp)
    python -m bench                  # the full table (also batch 64 and every transformers setting)

The model is Mixtral-shaped and random (dim 512, 8 layers, 8 heads / 2 KV heads, FFN 1792, 8 experts
top-2, vocab 32000, fp32): transformers builds it, `save_pretrained` writes it, our reader loads the same
weights. Decode tokens/s after a 128-token prompt = batch x steps / time between the first and the last
streamed step (both sides stream; the prompt's prefill is left out); prefill is one 1024-token forward
pass. When llama-cpp-python is installed (`python -m bench.llamacpp_setup`), llama.cpp runs the same
weights, converted to GGUF f32 and q8_0 by its own converter (bench/llamacpp.py). Limits measured in the
same run: memory bandwidth for decode (the best of several streaming methods, bench/bandwidth.py), fp32
matmul peak for prefill. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import bandwidth as bandwidth_probe
from bench import llamacpp
from mixtral_jax import MixtralConfig, load_hf
from mixtral_jax.inference import sampler as sampler_lib
from mixtral_jax.inference.sampler import Sampler
from mixtral_jax.model.placement import quantize_model

BENCH_CONFIG = MixtralConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64,
                             hidden_dim=1792, n_experts=8, top_k=2, max_seq_len=4096)
PROMPT = 128


def _best(fn, reps: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# --------------------------------------------------------------------------------- machine limits
def matmul_peak(n: int = 2048) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = _best(lambda: f(a).block_until_ready(), 5)
    return 2 * n**3 / t


def decode_bytes_per_step(config: MixtralConfig, batch: int, context: int, itemsize: int = 4) -> float:
    """Weights a decode step must read (touched experts under uniform routing) plus the KV cache."""
    d, f = config.dim, config.hidden_dim
    attn = d * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
    touched = config.n_experts * (1 - (1 - config.top_k / config.n_experts) ** batch)
    per_layer = attn + d * config.n_experts + touched * 3 * d * f + 2 * d
    weights = config.n_layers * per_layer + config.vocab_size * d + d  # + LM head (embedding rows: negligible)
    kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * context * batch
    return (weights + kv) * itemsize


def active_flops_per_token(config: MixtralConfig, context: int) -> float:
    d, f = config.dim, config.hidden_dim
    attn_proj = d * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
    per_layer = attn_proj + d * config.n_experts + 3 * config.top_k * d * f
    attn_scores = 2 * config.n_heads * config.head_dim * context  # QK^T and PV, causal average ~context/2 x2
    return 2 * (config.n_layers * (per_layer + attn_scores / 2) + config.vocab_size * d)


# ------------------------------------------------------------------------------------------ ours
class _StepClock:
    """Timestamps of streamed decode steps: tokens/s from the first delivery to the last, so the prompt's
    prefill (and its noise) is not part of the figure. A stream may deliver several steps at once
    (`Sampler.stream` groups fast steps); the steps delivered with the first one were computed before the
    clock started, so they are not counted."""

    BURST = 2e-4  # seconds: steps yielded closer together than this were delivered together

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, *_):
        self.times.append(time.perf_counter())

    def rate(self, batch: int) -> float:
        first = 1
        while first < len(self.times) and self.times[first] - self.times[first - 1] < self.BURST:
            first += 1
        return batch * (len(self.times) - first) / (self.times[-1] - self.times[0])


def _best_rate(run, batch: int, reps: int) -> float:
    run(_StepClock())  # warm-up / compile
    rates = []
    for _ in range(reps):
        clock = _StepClock()
        run(clock)
        rates.append(clock.rate(batch))
    return max(rates)


def ours_decode(model, batch: int, new: int, reps: int) -> float:
    sampler = Sampler(model)
    prompts = np.random.default_rng(batch).integers(3, BENCH_CONFIG.vocab_size, (batch, PROMPT)).tolist()
    return _best_rate(lambda clock: sampler(prompts, new, stop_tokens=[], stream=clock), batch, reps)


def ours_prefill(model, tokens: int, reps: int) -> float:
    """A 1024-token prompt into a fresh KV cache, first token chosen: the sampler's own jitted `prefill`
    (chunks in a `lax` loop, blockwise attention, the grouped MoE reading per-expert views)."""
    graphdef, state = nnx.split(model)
    views = model.expert_views()
    x = jnp.asarray(np.random.default_rng(0).integers(3, BENCH_CONFIG.vocab_size, (1, tokens)), jnp.int32)
    valid = jnp.ones((1, tokens), bool)
    key = jax.random.key_data(jax.random.key(0))

    def run():
        return sampler_lib.prefill(graphdef, state, views, x, valid, key, None, strategy=sampler_lib.Greedy(),
                                   max_new=16, cache_dtype=jnp.dtype(jnp.float32))[0].block_until_ready()

    return tokens / _best(run, reps)


# ---------------------------------------------------------------------------------- transformers
def hf_settings(hf) -> dict[str, dict]:
    """transformers' attention x experts implementations worth timing for this shape.

    `batched_mm` is left out: it gathers every token's expert weights ((tokens*k, D, F) per projection),
    tens of GB for a 1024-token prefill or the 8x128-token prompt of a batch-8 `generate`.
    """
    settings = {"eager": dict(attn="eager", experts="eager"), "sdpa": dict(attn="sdpa", experts="eager")}
    for experts in ("grouped_mm",):
        try:
            hf.set_experts_implementation(experts)
            settings[f"sdpa+{experts}"] = dict(attn="sdpa", experts=experts)
        except Exception:  # not available in this transformers/torch build
            pass
    hf.set_experts_implementation("eager")
    return settings


def _apply(hf, setting):
    hf.set_attn_implementation(setting["attn"])
    hf.set_experts_implementation(setting["experts"])


def hf_decode(hf, batch: int, new: int, reps: int) -> float:
    import torch
    from transformers.generation.streamers import BaseStreamer

    ids = torch.as_tensor(np.random.default_rng(batch).integers(3, BENCH_CONFIG.vocab_size, (batch, PROMPT)))

    class Streamer(BaseStreamer):  # the first put() is the prompt; each later one a decode step
        def __init__(self, clock):
            self.clock, self.prompt_seen = clock, False

        def put(self, value):
            if self.prompt_seen:
                self.clock()
            self.prompt_seen = True

        def end(self):
            pass

    def run(clock):
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                        streamer=Streamer(clock))

    return _best_rate(run, batch, reps)


def hf_prefill(hf, tokens: int, reps: int) -> float:
    import torch

    ids = torch.as_tensor(np.random.default_rng(0).integers(3, BENCH_CONFIG.vocab_size, (1, tokens)))

    def run():
        with torch.no_grad():
            hf(ids, logits_to_keep=1)

    return tokens / _best(run, reps)


# ------------------------------------------------------------------------------------- llama.cpp
def llamacpp_peer(hf_dir: str, new: int, reps: int, prefill_tokens: int) -> dict | None:
    """llama.cpp's decode b1 and prefill tokens/s for GGUF f32 and q8_0 of the saved model; None when
    llama-cpp-python is not installed (CI) or its converter is not found.

    Each figure is llama.cpp's best over n_threads = every core and 1: its threads spin at barriers, so
    on a busy shared machine one thread can beat two; the peer gets whichever is faster in this run."""
    if not llamacpp.available():
        return None
    if llamacpp.find_converter() is None:
        print("llama_cpp is installed but convert_hf_to_gguf.py is not: run `python -m bench.llamacpp_setup`")
        return None
    files = llamacpp.convert(hf_dir, hf_dir)
    prompt = np.random.default_rng(1).integers(3, BENCH_CONFIG.vocab_size, PROMPT).tolist()  # ours' b1 prompt
    out: dict = {"decode_b1": {}, "prefill": {}, "threads": {}}
    for outtype, path in files.items():
        for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
            decode = llamacpp.decode(path, prompt, new, max(reps, 2), threads)
            fill = llamacpp.prefill(path, prefill_tokens, reps + 1, threads)
            out["threads"][f"{outtype} x{threads}"] = {"decode_b1": decode, "prefill": fill}
            out["decode_b1"][outtype] = max(out["decode_b1"].get(outtype, 0.0), decode)
            out["prefill"][outtype] = max(out["prefill"].get(outtype, 0.0), fill)
    return out


def _print_llamacpp(peer: dict, ours_decode: float, ours_prefill: float, prefill_tokens: int,
                    ours_int8: float) -> None:
    import llama_cpp

    types = list(peer["decode_b1"])
    print(f"\nllama.cpp {llama_cpp.__version__} (GGUF by its convert_hf_to_gguf.py; best of n_threads "
          f"{os.cpu_count()} and 1: " + ", ".join(f"{k} {v['decode_b1']:.1f}/{v['prefill']:.1f}"
                                                  for k, v in peer["threads"].items()) + " decode/prefill)")
    print(f"{'tokens/s':<14}{'ours':>10}" + "".join(f"{'llama ' + t:>12}" for t in types) + f"{'vs f32':>9}")
    for label, key, o in (("decode b1", "decode_b1", ours_decode),
                          (f"prefill {prefill_tokens}", "prefill", ours_prefill)):
        figures = "".join(f"{peer[key][t]:>12.1f}" for t in types)
        print(f"{label:<14}{o:>10.1f}{figures}{o / peer[key]['f32']:>8.2f}x")
    if "q8_0" in peer["decode_b1"]:
        print(f"decode b1, ours int8 (LM head too) against q8_0: {ours_int8:.1f} / {peer['decode_b1']['q8_0']:.1f} = "
              f"{ours_int8 / peer['decode_b1']['q8_0']:.2f}x")


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as hf_dir:  # kept for llama.cpp's converter
        return _run(args, hf_dir)


def _run(args, hf_dir: str) -> int:
    import torch
    import transformers

    quick = args.quick
    reps = 1 if quick else 3
    new = 16 if quick else 64
    batches = (1, 8) if quick else (1, 8, 64)
    prefill_tokens = 1024

    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**BENCH_CONFIG.to_hf())).eval()
    hf.save_pretrained(hf_dir)
    model = load_hf(hf_dir, show_progress=False)

    method, bandwidth, methods = bandwidth_probe.probe()
    peak = matmul_peak()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{jax.default_backend()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"limits: {bandwidth_probe.describe(method, methods)}, fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    results: dict = {"bandwidth_gbs": bandwidth / 1e9, "bandwidth_method": method,
                     "bandwidth_methods_gbs": {k: v / 1e9 for k, v in methods.items()}, "matmul_gflops": peak / 1e9}
    rows = []
    decode_reps = max(reps, 2)  # best of two at least, as llama.cpp's decode is timed (llamacpp_peer)
    for batch in batches:
        ours = ours_decode(model, batch, new, decode_reps)
        peers = {}
        for name, setting in hf_settings(hf).items():
            _apply(hf, setting)
            peers[name] = hf_decode(hf, batch, new, decode_reps)
        limit = bandwidth / decode_bytes_per_step(BENCH_CONFIG, batch, PROMPT + new // 2)
        rows.append((f"decode b{batch}", ours, peers, batch * limit))
        results[f"decode_b{batch}"] = dict(ours=ours, hf=peers, bandwidth_limit=batch * limit)
    # int8 weights (experts and attention; LM head fp32), batch 1, measured right after the fp32 row
    results["decode_b1_int8"] = ours_decode(quantize_model(model), 1, new, decode_reps)
    # and with the LM head int8 too: what llama.cpp's q8_0 quantizes (every matrix, the output head included)
    results["decode_b1_int8_lm_head"] = ours_decode(quantize_model(model, lm_head=True), 1, new, decode_reps)
    ours = ours_prefill(model, prefill_tokens, reps + 1)  # the first run after compiling still faults pages in
    peers = {}
    for name, setting in hf_settings(hf).items():
        _apply(hf, setting)
        peers[name] = hf_prefill(hf, prefill_tokens, reps)
    limit = peak / active_flops_per_token(BENCH_CONFIG, prefill_tokens)
    rows.append((f"prefill {prefill_tokens}", ours, peers, limit))
    results["prefill"] = dict(ours=ours, hf=peers, matmul_limit=limit)
    llama = llamacpp_peer(hf_dir, new, reps, prefill_tokens)
    if llama is not None:
        results["llamacpp"] = llama

    from bench.moe_strategies import measure

    moe = measure(prefill_tokens, quick=quick)
    results["moe_prefill_ms"] = {k: v * 1e3 for k, v in moe.items()}

    print(f"\n{'tokens/s':<14}{'ours':>10}{'best hf':>10}  {'(setting)':<20}{'vs best hf':>11}{'vs limit':>10}")
    for label, o, peer, limit in rows:
        best = max(peer, key=peer.get)
        print(f"{label:<14}{o:>10.1f}{peer[best]:>10.1f}  {best:<20}{o / peer[best]:>10.2f}x{o / limit:>9.0%}")
        print(f"{'':<14}hf: " + ", ".join(f"{n} {v:.1f}" for n, v in peer.items()))
    print(f"decode b1 int8 weights: {results['decode_b1_int8']:.1f} tokens/s "
          f"({results['decode_b1_int8'] / results['decode_b1']['ours']:.2f}x fp32); with the LM head int8 too: "
          f"{results['decode_b1_int8_lm_head']:.1f}")
    print("MoE strategies at prefill (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in moe.items()))
    if llama is not None:
        _print_llamacpp(llama, results["decode_b1"]["ours"], results["prefill"]["ours"], prefill_tokens,
                        results["decode_b1_int8_lm_head"])
    best_hf = {label: max(peer.values()) for label, _, peer, _ in rows}
    summary = {
        "decode_b1_vs_hf": results["decode_b1"]["ours"] / best_hf["decode b1"],
        "decode_b1_vs_bandwidth": results["decode_b1"]["ours"] / results["decode_b1"]["bandwidth_limit"],
        "decode_b1_int8_vs_fp32": results["decode_b1_int8"] / results["decode_b1"]["ours"],
        "decode_b8_vs_hf": results["decode_b8"]["ours"] / best_hf["decode b8"],
        "prefill_vs_hf": results["prefill"]["ours"] / best_hf[f"prefill {prefill_tokens}"],
        "moe_best_vs_dense": moe["dense"] / min(v for k, v in moe.items() if k != "dense"),
    }
    if llama is not None:  # ours fp32 against llama.cpp f32 (q8_0's figures are in the results)
        summary["decode_b1_vs_llamacpp"] = results["decode_b1"]["ours"] / llama["decode_b1"]["f32"]
        summary["prefill_vs_llamacpp"] = results["prefill"]["ours"] / llama["prefill"]["f32"]
        if "q8_0" in llama["decode_b1"]:  # int8 everywhere (LM head too) against q8_0, which quantizes everything
            summary["decode_b1_int8_vs_llamacpp_q8_0"] = results["decode_b1_int8_lm_head"] / llama["decode_b1"]["q8_0"]
    results["summary"] = summary
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps({k: round(v, 3) for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
