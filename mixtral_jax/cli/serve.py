"""`mixtral-jax serve`: the OpenAI-compatible server (FastAPI + uvicorn, the `serve` extra).

On several processes (a multi-host slice) process 0 serves HTTP and plans each batch step; the others run
the same steps from its broadcasts.
"""

from __future__ import annotations

import os
import sys

import jax

from mixtral_jax.cli.model_flags import add_model_flags, load_model
from mixtral_jax.inference.engine import Engine, EngineConfig
from mixtral_jax.serving.app import create_app, run_server
from mixtral_jax.text.tokenizer import load_tokenizer


def run_serve(args) -> int:
    config = EngineConfig(max_batch=args.max_batch, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                          cache_dtype=args.kv_cache_dtype)
    tokenizer = load_tokenizer(args.tokenizer)
    engine = Engine(load_model(args), config)
    name = args.model_name or (os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint
                               else "mixtral-jax-demo")
    if jax.process_index() != 0:  # follow process 0's steps until it shuts down
        engine.run()
        return 0
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({config.max_batch} slots, context "
          f"{engine.max_context})", file=sys.stderr, flush=True)
    run_server(create_app(engine, tokenizer, name, drain_seconds=args.drain_seconds), args.host, args.port,
               args.drain_seconds)
    return 0


def register(sub):
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching", allow_abbrev=False)
    add_model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="decode slots (requests decoded together)")
    s.add_argument("--max-context", type=int, help="prompt + completion tokens per request "
                                                   "(default: the model's, at most 4096)")
    s.add_argument("--prefill-chunk", type=int, default=256, help="longest prefill call (a power of two)")
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--tokenizer", help="SentencePiece model file (default: Mixtral's v1 tokenizer)")
    s.add_argument("--drain-seconds", type=float, default=10.0,
                   help="at SIGTERM, how long running requests may finish before they are cancelled")
    s.set_defaults(run=run_serve)
