"""`mixtral-jax serve`: the OpenAI-compatible server (FastAPI + uvicorn, the `serve` extra).

It encodes with the checkpoint's own tokenizer (as `generate` does) and refuses to start when the tokenizer's
vocabulary is not the model's. On several processes (a multi-host slice) process 0 serves HTTP and plans each
batch step; the others run the same steps from its broadcasts.

`--lora NAME=DIR` (repeatable) serves PEFT adapters (as `train --lora` writes them) beside the base: a request
whose `model` is NAME is answered with that adapter, and requests of different adapters share each batch step
(`lora.stack_adapters`). A DIR that is not a PEFT adapter of this model stops start-up with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax

from mixtral_jax.cli.model_flags import add_model_flags, load_model
from mixtral_jax.convert.peft import read_peft
from mixtral_jax.errors import ConfigError
from mixtral_jax.inference.engine import Engine, EngineConfig
from mixtral_jax.kernels import cpu as cpu_kernels
from mixtral_jax.model import lora
from mixtral_jax.planning.serve_plan import check_engine_fits
from mixtral_jax.progress import progress
from mixtral_jax.serving.app import create_app, run_server
from mixtral_jax.serving.limits import ServerLimits, raise_open_file_limit
from mixtral_jax.text.tokenizer import Tokenizer, load_tokenizer, tokenizer_for

API_KEY_ENV = "MIXTRAL_JAX_API_KEY"
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_SPARE_FILES = 128  # descriptors kept for what is not a client connection (JAX, the model files, logs)


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> Tokenizer:
    """The ids a client's text becomes must be the ones the model was trained on: a v1 tokenizer on a v3 model
    (32000 of 32768 tokens) would serve wrong text without an error, so any difference stops start-up."""
    if tokenizer.vocab_size != vocab_size:
        raise ConfigError(f"the {tokenizer.version} tokenizer has {tokenizer.vocab_size} tokens but the model has "
                          f"{vocab_size}: serve it with its own tokenizer (--tokenizer v1 for 32000, v3 for 32768, "
                          "or its tokenizer.model)")
    return tokenizer


_LIMIT_FLAGS = (  # ServerLimits field, what its flag means
    ("max_body_bytes", "largest request body in bytes; larger is a 413"),
    ("max_json_depth", "deepest nesting of a JSON body; deeper is a 400"),
    ("max_queue", "requests waiting for a slot; more is a 429 with Retry-After"),
    ("max_connections", "open connections; past it a new one closes the oldest idle or half-sent one"),
    ("header_timeout", "seconds a connection may take to send a request's headers"),
    ("body_timeout", "seconds a request may take to send its body; then a 408"),
    ("keep_alive_timeout", "seconds an idle keep-alive connection stays open"),
)


def parse_lora_flags(flags: list[str] | None, model_name: str) -> dict[str, str]:
    """`--lora NAME=DIR` flags as {name: dir}: names unique, not the base model's, without spaces."""
    out = {}
    for flag in flags or ():
        name, sep, path = flag.partition("=")
        name = name.strip()
        if not sep or not name or not path or any(c.isspace() for c in name):
            raise ConfigError(f"--lora {flag!r}: expected NAME=DIR (the name clients send as `model`)")
        if name == model_name or name in out:
            raise ConfigError(f"--lora {flag!r}: the name {name!r} is already "
                              + ("the base model's (see --model-name)" if name == model_name else "taken"))
        out[name] = path
    return out


def load_adapters(model, dirs: dict[str, str]):
    """Stack the PEFT adapters `dirs` ({name: dir}) onto `model` (in place); each is read and checked
    against the model's shapes first (a CheckpointError naming the dir otherwise). Returns the model."""
    if not dirs:
        return model
    adapters = {}
    for name, path in dirs.items():
        try:
            adapters[name] = read_peft(path, model.config)
        except ValueError as e:
            raise type(e)(f"--lora {name}={path}: {e}") from None
    return lora.stack_adapters(model, adapters)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    if host in _LOCAL_HOSTS or api_key is not None:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
            f"(set --api-key or {API_KEY_ENV})")


def server_limits(args) -> ServerLimits:
    return ServerLimits(**{field: getattr(args, field) for field, _ in _LIMIT_FLAGS},
                        api_key=args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None)


def use_compile_cache(directory: str | None) -> str | None:
    """JAX's persistent compilation cache in `directory` (None: mixtral_jax's cache folder, `xla/`; "": off),
    so a restarted server loads the step programs its warm-up compiled (on a TPU host, minutes for the full
    model) instead of compiling them again. Returns the folder used."""
    if directory == "":
        return None
    path = directory or str(cpu_kernels.cache_dir().parent / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def run_serve(args) -> int:
    config = EngineConfig(max_batch=args.max_batch, max_context=args.max_context, prefill_chunk=args.prefill_chunk,
                          cache_dtype=args.kv_cache_dtype, page_size=args.page_size, num_pages=args.num_pages,
                          prefix_cache=not args.no_prefix_cache)
    limits = server_limits(args)  # bad flags fail before loading anything
    name = args.model_name or (os.path.basename(os.path.normpath(args.checkpoint)) if args.checkpoint
                               else "mixtral-jax-demo")
    adapter_dirs = parse_lora_flags(args.lora, name)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    model = load_adapters(load_model(args), adapter_dirs)
    tokenizer = check_vocabulary(tokenizer or tokenizer_for(model), model.config.vocab_size)
    check_engine_fits(model, config)  # on an accelerator: refuse now, with what fits, not OOM at the first request
    use_compile_cache(args.compile_cache)
    engine = Engine(model, config)
    if not args.no_warmup:  # every process: each compiles the same programs
        with progress(len(engine.step_shapes), "compiling the engine's step shapes", "shapes") as bar:
            engine.warmup(lambda done, total: bar.advance())
    if jax.process_index() != 0:  # follow process 0's steps until it shuts down
        engine.run()
        return 0
    if warning := exposure_warning(args.host, limits.api_key):
        print(warning, file=sys.stderr)
    files = raise_open_file_limit(limits.max_connections)
    if limits.max_connections and files < limits.max_connections + _SPARE_FILES:
        # past the open-file limit accept() fails and every client starves; under the cap the oldest idle
        # connection is closed instead
        limits = dataclasses.replace(limits, max_connections=max(files - _SPARE_FILES, 16))
        print(f"warning: the open-file limit is {files}: serving at most {limits.max_connections} connections "
              "(raise `ulimit -n` for more)", file=sys.stderr)
    lay = engine.layout
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({config.max_batch} slots, context "
          f"{engine.max_context}, {lay.total_pages} KV pages of {lay.page_size} tokens = {lay.tokens} tokens, "
          f"{tokenizer.version} tokenizer{', API key required' if limits.api_key else ''}"
          f"{', LoRA adapters ' + ', '.join(engine.adapters) if engine.adapters else ''})",
          file=sys.stderr, flush=True)
    run_server(create_app(engine, tokenizer, name, drain_seconds=args.drain_seconds, limits=limits), args.host,
               args.port, args.drain_seconds, limits)
    return 0


def register(sub):
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching", allow_abbrev=False)
    add_model_flags(s)
    d = ServerLimits()
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                                                       "0.0.0.0 for every interface, with an API key)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=16, help="decode slots (requests decoded together)")
    s.add_argument("--max-context", type=int, help="prompt + completion tokens per request "
                                                   "(default: the model's, at most 4096)")
    s.add_argument("--prefill-chunk", type=int, default=256,
                   help="tokens per engine step and sequence shard: every running decode, then prefill chunks of "
                        "new requests (a power of two)")
    s.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    s.add_argument("--num-pages", type=int, help="KV cache pages in all (default: room for --max-batch requests of "
                                                 "--max-context; fewer hold more typical requests and preempt when "
                                                 "full)")
    s.add_argument("--no-warmup", action="store_true",
                   help="do not compile every step shape at start-up (each is then compiled when a step first needs "
                        "it, stalling the requests running then)")
    s.add_argument("--compile-cache", metavar="DIR", help="JAX's persistent compilation cache: a restart loads the "
                   "compiled steps from DIR (default: the mixtral_jax cache folder's xla/; '' turns it off)")
    s.add_argument("--no-prefix-cache", action="store_true",
                   help="do not share the pages of a prompt prefix between requests")
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--lora", action="append", metavar="NAME=DIR",
                   help="serve the PEFT LoRA adapter in DIR (as `train --lora` writes) as model NAME beside the "
                        "base; repeat for several (requests of different adapters are batched together)")
    s.add_argument("--tokenizer", help="v1, v3 or a SentencePiece model file (default: the checkpoint's own; by "
                                       "vocabulary: 32768 tokens is v3, else v1)")
    s.add_argument("--drain-seconds", type=float, default=10.0,
                   help="at SIGTERM, how long running requests may finish before they are cancelled")
    g = s.add_argument_group("limits (0 turns one off)")
    g.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, "
                                     "else none)")
    for field, meaning in _LIMIT_FLAGS:
        default = getattr(d, field)
        g.add_argument("--" + field.replace("_", "-"), type=type(default), default=default,
                       help=f"{meaning} (default: {default})")
    s.set_defaults(run=run_serve)
