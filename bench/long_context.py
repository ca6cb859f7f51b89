"""Long prompts on CPU: the first token after a 32768-token prompt, compilation included.

    python -m bench.long_context                      # 32768 tokens, the issue's 8-layer tiny config
    python -m bench.long_context --tokens 4096 8192   # several lengths (each its own compile)
    python -m bench.long_context --attention plain    # compare an implementation

The model is random, Mixtral-shaped and tiny (8 layers, dim 96, 6 heads of 16, 2 KV heads, 8 experts
top-2), so attention dominates: a 32768-token causal prefill is ~1.6 TFLOP of attention against ~0.1 of
everything else. The sampler prefills in `PREFILL_CHUNK`-token chunks inside one `lax` loop (blockwise
attention over the cache), so its compile time does not grow with the prompt. Reported per length:
seconds to the first token (compile + prefill, the figure the issue targets), then the same call again
(prefill only), and the attention FLOP rate that implies. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flax import nnx

from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.inference.sampler import PREFILL_CHUNK, Sampler
from mixtral_jax.model.mixtral import Mixtral

LONG_CONFIG = dict(vocab_size=128, dim=96, n_layers=8, n_heads=6, n_kv_heads=2, head_dim=16, hidden_dim=96,
                   n_experts=8, top_k=2, sliding_window=None)


def attention_flops(config: MixtralConfig, tokens: int) -> float:
    """Causal attention's multiply-adds x 2 (scores and values) over every layer and head."""
    return 2 * 2 * config.n_layers * config.n_heads * config.head_dim * tokens * (tokens + 1) / 2


def first_token(config: MixtralConfig, tokens: int, attention: str) -> dict:
    model = Mixtral(config, RuntimeConfig(param_dtype="float32", attention=attention), rngs=nnx.Rngs(0))
    sampler = Sampler(model)
    prompt = np.random.default_rng(tokens).integers(3, config.vocab_size, tokens).tolist()
    start = time.perf_counter()
    sampler([prompt], max_new_tokens=1, stop_tokens=[])
    cold = time.perf_counter() - start
    start = time.perf_counter()
    sampler([prompt], max_new_tokens=1, stop_tokens=[])
    warm = time.perf_counter() - start
    gflops = attention_flops(config, tokens) / warm / 1e9
    return dict(tokens=tokens, first_token_s=round(cold, 2), prefill_s=round(warm, 2),
                compile_s=round(cold - warm, 2), attention_gflops=round(gflops, 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32768])
    p.add_argument("--attention", default="auto", help="auto, plain or blockwise (default: auto)")
    args = p.parse_args(argv)
    config = MixtralConfig(**LONG_CONFIG, max_seq_len=max(args.tokens) + 16)
    print(f"config: {config.n_layers} layers, dim {config.dim}, {config.n_heads} heads of {config.head_dim}, "
          f"{config.n_kv_heads} KV heads; prefill chunk {PREFILL_CHUNK}; attention {args.attention}")
    rows = []
    for n in args.tokens:
        row = first_token(config, n, args.attention)
        rows.append(row)
        print(f"{n:>6} tokens: first token {row['first_token_s']:7.2f} s (compile {row['compile_s']:.2f} s, "
              f"prefill {row['prefill_s']:.2f} s, attention {row['attention_gflops']} GFLOP/s)", flush=True)
    print(json.dumps({"long_context": rows, "attention": args.attention, "chunk": PREFILL_CHUNK}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
