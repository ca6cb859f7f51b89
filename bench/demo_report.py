"""The embedded demo model's held-out loss and a picture of which experts its router picks for which tokens.

    python -m bench.demo_report [--sequences 32] [--quantize int8 [--quantize-lm-head]] [--kv-cache-dtype int8]
    python -m bench.demo_report --checkpoint RUN/final      # a model `bench.train_demo` trained, before embedding it

Held-out text: the standard library's own test files (`test/` directories), which `bench.train_demo`
leaves out of training. Token kinds come from Python's tokenizer on the decoded piece; the picture is a
text heat map of how often each kind's top-1 expert is each of the 8 experts, first and last layer.
"""

from __future__ import annotations

import argparse
import glob
import keyword
import os
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import load
from mixtral_jax.config import KV_CACHE_DTYPES, QUANTIZE_MODES
from mixtral_jax.errors import CheckpointError
from mixtral_jax.loading.demo import default_model, has_trained_model
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.placement import quantize_model
from mixtral_jax.text.tokenizer import load_tokenizer

SHADES = " .:-=+*#%@"


def heldout_files() -> list[str]:
    root = os.path.join(sysconfig.get_paths()["stdlib"], "test")
    return sorted(glob.glob(os.path.join(root, "test_*.py")))


def kind_of(piece: str) -> str:
    text = piece.strip()
    if not text:
        return "whitespace/indent"
    if keyword.iskeyword(text):
        return "keyword"
    if text.isdigit():
        return "number"
    if text.isidentifier():
        return "identifier"
    if all(not c.isalnum() for c in text):
        return "punctuation"
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="also the loss with int8 weights, and the difference")
    p.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: the LM head in int8 too")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="compute the compared loss through a KV cache of this dtype (int8: the int8 cache's numbers)")
    p.add_argument("--checkpoint", help="report on this checkpoint instead of the embedded demo model")
    args = p.parse_args(argv)
    if args.checkpoint:
        try:
            model = load(args.checkpoint, dtype=jnp.float32)  # as default_model() loads the embedded one
        except CheckpointError as e:
            raise SystemExit(f"demo_report: {e}") from None
    elif has_trained_model():
        model = default_model()
    else:
        raise SystemExit("the trained demo model is not in this tree (mixtral_jax/assets/demo_model)")
    tok = load_tokenizer()
    ids: list[int] = []
    for path in heldout_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            ids += [tok.bos_id, *tok.encode(f.read(), bos=False), tok.eos_id]
        if len(ids) >= args.sequences * args.seq_len:
            break
    batch = np.asarray(ids[: args.sequences * args.seq_len]).reshape(args.sequences, args.seq_len)
    forward = nnx.jit(lambda m, t: m(t, return_router_logits=True))
    quantized = quantize_model(model, args.quantize, lm_head=args.quantize_lm_head) if args.quantize else None
    if args.kv_cache_dtype and quantized is None:
        quantized = model
    if args.kv_cache_dtype:  # every position's logits from one prefill into a cache of that dtype
        compared = nnx.jit(lambda m, t: m.extend(KVCache.empty(m.config, 1, t.shape[1], args.kv_cache_dtype), t)[0])
    else:
        compared = lambda m, t: forward(m, t)[0]  # noqa: E731
    losses, q_losses, kinds, first, last = [], [], [], [], []

    def loss(logits, row):
        logp = jax.nn.log_softmax(logits[0, :-1], -1)
        return float(-jnp.take_along_axis(logp, jnp.asarray(row[1:, None]), -1).mean())

    for row in batch:
        logits, router = forward(model, row[None])
        losses.append(loss(logits, row))
        if quantized is not None:
            q_losses.append(loss(compared(quantized, row[None]), row))
        first += np.asarray(jnp.argmax(router[0, 0], -1)).tolist()
        last += np.asarray(jnp.argmax(router[-1, 0], -1)).tolist()
        kinds += [kind_of(tok.decode([int(t)]) if t > 2 else "") for t in row]
    print(f"held-out loss (stdlib test files, {args.sequences} x {args.seq_len} tokens): {np.mean(losses):.3f} "
          f"nats/token (perplexity {np.exp(np.mean(losses)):.1f})")
    if quantized is not None:
        head = "experts, attention and LM head" if args.quantize_lm_head else "experts and attention"
        what = f"{args.quantize} weights ({head})" if args.quantize else "float weights"
        what += f", {args.kv_cache_dtype} KV cache" if args.kv_cache_dtype else ""
        print(f"with {what}: {np.mean(q_losses):.4f} nats/token, "
              f"{np.mean(q_losses) - np.mean(losses):+.4f} vs {np.mean(losses):.4f}")
    n_experts = model.config.n_experts
    names = sorted(set(kinds))
    for label, chosen in (("layer 0", first), (f"layer {model.config.n_layers - 1}", last)):
        print(f"\ntop-1 expert by token kind, {label} (darker = more often)")
        print(f"{'':<20}" + "".join(f"{e:>3}" for e in range(n_experts)) + "   tokens")
        for name in names:
            picks = np.bincount([c for c, k in zip(chosen, kinds) if k == name], minlength=n_experts)
            share = picks / max(picks.sum(), 1)
            cells = "".join(f"  {SHADES[min(int(s * len(SHADES) / 0.6), len(SHADES) - 1)]}" for s in share)
            print(f"{name:<20}{cells}   {picks.sum():>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
