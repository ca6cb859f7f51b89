"""Serving throughput: N concurrent clients against one `mixtral-jax serve`, against the same requests sent
one at a time to the same server.

    python -m bench.serve                      # 12 clients, 64 tokens each, the demo model on CPU
    python -m bench.serve --clients 16 --max-tokens 128 --checkpoint DIR

Starts the server on 127.0.0.1 (a free port), warms it up (compiles), then streams every request with the
`openai` client: time to first token is taken at the first streamed token, tokens/s is completion tokens
over wall time. Every request has a timeout. The last line is JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import openai

PROMPTS = ["def read_config(path):", "import os\n", "class Parser:\n    def __init__(self, text):",
           "for i in range(10):", "# Copyright", "with open(path) as f:\n        data =", "def main(argv=None):",
           "return self.", "x = [", "try:\n    import", "if __name__ == '__main__':", "async def fetch(url):"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "mixtral_jax.cli", "serve", "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-context", str(args.max_context)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.Popen(cmd, env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            return proc, base
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def _one(client, model, prompt, max_tokens) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) for one streamed request."""
    start = time.perf_counter()
    first, n = None, 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    return first if first is not None else float("nan"), time.perf_counter() - start, n


def _summary(results, wall) -> dict:
    ttft = np.array([r[0] for r in results])
    tokens = sum(r[2] for r in results)
    return {"tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * float(np.nanpercentile(ttft, 50)), 1),
            "ttft_p99_ms": round(1e3 * float(np.nanpercentile(ttft, 99)), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", allow_abbrev=False)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--checkpoint")
    args = p.parse_args(argv)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
    proc, base = _start(args)
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        for prompt in dict.fromkeys(prompts):  # compile every prompt bucket and the decode step
            _one(client, model, prompt, 2)
        start = time.perf_counter()
        alone = [_one(client, model, q, args.max_tokens) for q in prompts]
        sequential = _summary(alone, time.perf_counter() - start)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            together = list(pool.map(lambda q: _one(client, model, q, args.max_tokens), prompts, timeout=1200))
        concurrent_ = _summary(together, time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(120)
    speedup = concurrent_["tokens_per_s"] / sequential["tokens_per_s"]
    print(f"{args.clients} requests x {args.max_tokens} tokens, greedy, --max-batch {args.max_batch}")
    print(f"{'':14}{'tokens/s':>10}{'TTFT p50':>11}{'TTFT p99':>11}{'wall':>9}")
    for name, s in (("one at a time", sequential), ("concurrent", concurrent_)):
        print(f"{name:14}{s['tokens_per_s']:>10.1f}{s['ttft_p50_ms']:>9.0f}ms{s['ttft_p99_ms']:>9.0f}ms"
              f"{s['seconds']:>8.1f}s")
    print(f"speed-up {speedup:.2f}x")
    print(json.dumps({"clients": args.clients, "max_tokens": args.max_tokens, "sequential": sequential,
                      "concurrent": concurrent_, "speedup": round(speedup, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
