"""`mixtral-jax generate` (one-shot, batched) and `mixtral-jax chat` (interactive, streaming, multi-turn)."""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mixtral_jax.cli.model_flags import add_model_flags, load_model
from mixtral_jax.errors import ConfigError
from mixtral_jax.inference.generate import chat, check_tokenizer, generate
from mixtral_jax.inference.penalties import make_penalties
from mixtral_jax.inference.sampling import make_strategy
from mixtral_jax.text.tokenizer import load_tokenizer, tokenizer_for

# The demo model's decoding when no flag says otherwise: its greedy text falls into loops, sampled text
# does not. Checkpoints default to greedy, like the Python API.
DEMO_DECODING = {"temperature": 0.8, "top_p": 0.95}
_API_DEFAULTS = {"temperature": 0.0, "top_k": None, "top_p": None, "repetition_penalty": 1.0,
                 "presence_penalty": 0.0, "frequency_penalty": 0.0}  # `mixtral_jax.generate`'s
_DECODING_FLAGS = (  # (name, type, help)
    ("temperature", float, "0 is greedy"),
    ("top_k", int, "sample from the k likeliest tokens"),
    ("top_p", float, "sample from the smallest set of tokens holding this probability mass"),
    ("repetition_penalty", float, "transformers' repetition penalty over prompt and output, > 0; 1 is off"),
    ("presence_penalty", float, "OpenAI's presence penalty over prompt and output, in [-2, 2]; 0 is off"),
    ("frequency_penalty", float, "OpenAI's frequency penalty over prompt and output, in [-2, 2]; 0 is off"),
)


def _load_model(args):
    return load_model(args, note=f"; unless flags say otherwise it samples at temperature "
                                 f"{DEMO_DECODING['temperature']}, top-p {DEMO_DECODING['top_p']} "
                                 "(--temperature 0: greedy)")


def _add_common(p: argparse.ArgumentParser):
    add_model_flags(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    for flag, kind, meaning in _DECODING_FLAGS:
        default = "none" if _API_DEFAULTS[flag] is None else _API_DEFAULTS[flag]
        demo = f", {DEMO_DECODING[flag]} with the demo model" if flag in DEMO_DECODING else ""
        p.add_argument("--" + flag.replace("_", "-"), type=kind, help=f"{meaning} (default: {default}{demo})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--tokenizer", help="v1, v3 or a SentencePiece model file (default: the checkpoint's own; "
                                       "by vocabulary: 32768 tokens is v3, else v1)")


def _sampling_kwargs(args):
    """The decoding flags, checked before anything loads; unset ones take the model's defaults: the Python
    API's (greedy, no penalties) for a checkpoint, `DEMO_DECODING` for the demo model, whose greedy text loops."""
    defaults = _API_DEFAULTS | (DEMO_DECODING if args.checkpoint is None else {})
    chosen = {flag: getattr(args, flag) if getattr(args, flag) is not None else defaults[flag]
              for flag, _, _ in _DECODING_FLAGS}
    make_strategy(chosen["temperature"], chosen["top_k"], chosen["top_p"])
    make_penalties(1, chosen["repetition_penalty"], chosen["presence_penalty"], chosen["frequency_penalty"])
    return dict(max_new_tokens=args.max_new_tokens, seed=args.seed, stop=args.stop,
                kv_cache_dtype=args.kv_cache_dtype, **chosen)


def run_generate(args) -> int:
    sampling = _sampling_kwargs(args)  # bad flags fail before loading anything
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ConfigError("give at least one prompt (arguments or --prompts-file)")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None  # a bad one fails before loading
    model = _load_model(args)
    tokenizer = check_tokenizer(model, tokenizer or tokenizer_for(model))
    lead = _is_lead_process()  # in a multi-process run every process computes, process 0 prints
    show = (lambda *a, **k: print(*a, **k)) if lead else (lambda *a, **k: None)
    start = time.perf_counter()
    if len(prompts) == 1:  # stream the single answer as it is produced
        show(prompts[0], end="", flush=True)
        out = generate(model, prompts, tokenizer=tokenizer, on_text=lambda _r, t: show(t, end="", flush=True),
                       **sampling)
        show()
    else:
        out = generate(model, prompts, tokenizer=tokenizer, **sampling)
        for prompt, text in zip(prompts, out):
            show(f"--- {prompt}\n{prompt}{text}")
    n = sum(len(tokenizer.encode(o, bos=False)) for o in out)
    show(f"[{n} tokens in {time.perf_counter() - start:.1f}s, compile included]", file=sys.stderr)
    return 0


_MAX_LINE = 1 << 16


def _read_line_everywhere(prompt: str) -> str | None:
    """Process 0 reads a line (None at end of input) and every process of a multi-host run receives it."""
    line = None
    if jax.process_index() == 0:
        try:
            line = input(prompt)
        except EOFError:
            line = None
    if jax.process_count() == 1:
        return line
    data = b"" if line is None else line.encode("utf-8")[: _MAX_LINE - 1]
    buf = np.zeros(_MAX_LINE + 1, np.int32)
    buf[0] = -1 if line is None else len(data)
    buf[1:1 + len(data)] = np.frombuffer(data, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return None if buf[0] < 0 else bytes(buf[1:1 + buf[0]].astype(np.uint8)).decode("utf-8", "replace")


def _is_lead_process() -> bool:
    return jax.process_index() == 0


def run_chat(args) -> int:
    sampling = _sampling_kwargs(args)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    model = _load_model(args)
    tokenizer = check_tokenizer(model, tokenizer or tokenizer_for(model))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: an empty line or Ctrl-D ends the conversation", file=sys.stderr)
    while True:
        line = _read_line_everywhere("> " if _is_lead_process() else "")
        if line is None or not line.strip():
            break
        messages.append({"role": "user", "content": line})
        show = print if _is_lead_process() else (lambda *a, **k: None)
        reply = chat(model, messages, tokenizer=tokenizer, on_text=lambda t, show=show: show(t, end="", flush=True),
                     **sampling)
        show()
        messages.append({"role": "assistant", "content": reply.strip() or "..."})
    return 0


def register(sub):
    g = sub.add_parser("generate", help="generate text from prompts", allow_abbrev=False)
    g.add_argument("prompt", nargs="*", help="prompt text (several make a batch)")
    g.add_argument("--prompts-file", help="a file with one prompt per line")
    _add_common(g)
    g.set_defaults(run=run_generate)
    c = sub.add_parser("chat", help="interactive multi-turn chat with the Mixtral-Instruct template",
                       allow_abbrev=False)
    c.add_argument("--system", help="system prompt")
    _add_common(c)
    c.set_defaults(run=run_chat)
