"""A jitted sampler: left-padded prefill into a preallocated KV cache, then a `lax.while_loop` decode.

Prompts are left-padded to a bucket length (so a handful of shapes compile, not one per prompt) and every
row writes its next token into the same cache slot; each row's positions count only its real tokens, so
padding changes nothing. The loop stops when every row is done or `max_new_tokens` is reached. Streaming
sends each step's tokens to the host with `jax.experimental.io_callback` from inside the loop.

Sampling strategies are tiny frozen classes with one method `(logits, key) -> tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec

from .model import KVCache, Mixtral
from .penalties import PenaltyValue, make_penalties, penalized, token_counts

_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class SamplingError(ValueError):
    """Bad sampling parameters or prompts: raised before anything compiles."""


# --------------------------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class Greedy:
    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Temperature sampling restricted to the top_k tokens and to the top_p probability mass."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        logits = logits.astype(jnp.float32) / self.temperature
        neg = jnp.finfo(jnp.float32).min
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, neg, logits)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep = mass_before < self.top_p  # the smallest prefix whose mass reaches top_p
            threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < threshold, neg, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def make_strategy(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Validate the sampling parameters; temperature 0 is greedy."""
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        raise SamplingError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise SamplingError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or math.isnan(top_p) or not 0 < top_p <= 1):
        raise SamplingError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0:
        return Greedy()
    return Sample(float(temperature), top_k, None if top_p is None else float(top_p))


# ------------------------------------------------------------------------------------ sampler
def bucket(n: int) -> int:
    return next((b for b in _BUCKETS if b >= n), n)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Generate from `model`. Hold one per model: compiled functions are cached per shape and strategy."""

    model: Mixtral
    cache_dtype: jnp.dtype | None = None

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_tokens: Sequence[int] | None = None, stop_sequences: Sequence[Sequence[int]] = (),
                 stream: Callable[[np.ndarray], None] | None = None, repetition_penalty: PenaltyValue = 1.0,
                 presence_penalty: PenaltyValue = 0.0, frequency_penalty: PenaltyValue = 0.0) -> list[list[int]]:
        """Return each prompt's new tokens (stop tokens and stop sequences excluded).

        `stream(tokens)` is called once per step with a (batch,) array of the step's tokens (-1 for rows
        already done). The penalties (see `mixtral_jax.penalties`) are one number or one per prompt.
        """
        config = self.model.config
        strategy = make_strategy(temperature, top_k, top_p)
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise SamplingError("no prompts given")
        penalties = make_penalties(len(prompts), repetition_penalty, presence_penalty, frequency_penalty)
        for i, p in enumerate(prompts):
            if not p:
                raise SamplingError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= config.vocab_size:
                raise SamplingError(f"prompt {i} has token ids outside [0, {config.vocab_size})")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        longest = max(map(len, prompts))
        if longest > config.max_seq_len:
            raise SamplingError(f"a prompt has {longest} tokens but the context holds {config.max_seq_len}")
        if longest + max_new_tokens > config.max_seq_len:
            raise SamplingError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                f"context of {config.max_seq_len}; lower max_new_tokens to "
                                f"{config.max_seq_len - longest}")
        stops = [config.eos_id] if stop_tokens is None else list(stop_tokens)
        seqs = [list(s) for s in stop_sequences if len(s)]
        prompt_len = bucket(longest)
        tokens = np.zeros((len(prompts), prompt_len), np.int32)
        valid = np.zeros((len(prompts), prompt_len), bool)
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):] = p
            valid[i, prompt_len - len(p):] = True
        stop_arr = np.full((max(len(seqs), 1), max((len(s) for s in seqs), default=1)), -1, np.int32)
        for i, s in enumerate(seqs):
            stop_arr[i, stop_arr.shape[1] - len(s):] = s
        graphdef, state = nnx.split(self.model)
        put = _replicator(self.model.runtime.mesh)
        key = jax.random.key_data(jax.random.key(seed))
        out, n_out = _generate(graphdef, state, self.model.expert_views(), put(tokens), put(valid), put(key),
                               put(np.asarray(stops or [-1], np.int32)), put(stop_arr),
                               None if penalties is None else put(penalties),
                               strategy=strategy, max_new=bucket(max_new_tokens), limit=max_new_tokens,
                               cache_dtype=self.cache_dtype or self.model.runtime.dtype,
                               stream=stream)
        out, n_out = _to_host(out), _to_host(n_out)
        results = []
        for row, n in zip(out, n_out):
            seq = row[:n].tolist()
            for s in seqs:  # the matched stop sequence is not part of the answer
                if len(seq) >= len(s) and seq[-len(s):] == s:
                    seq = seq[:-len(s)]
                    break
            results.append(seq)
        return results


_stream_target: list[Callable | None] = [None]  # the current call's stream callback (a static jit arg would
                                               # recompile for every new callable)


def _emit_to_stream(tokens):
    if _stream_target[0] is not None:
        _stream_target[0](np.asarray(tokens))


@functools.partial(jax.jit, static_argnames=("graphdef", "strategy", "max_new", "cache_dtype", "stream"))
def _generate_jit(graphdef, state, experts, tokens, valid, key, stop_tokens, stop_seqs, penalties, limit, *, strategy,
                  max_new, cache_dtype, stream):
    model = nnx.merge(graphdef, state)
    key = jax.random.wrap_key_data(key)
    b, prompt_len = tokens.shape
    cache = KVCache.empty(model.config, b, prompt_len, cache_dtype)
    logits, cache = model.extend(cache, tokens, valid, last_only=True, experts=experts)
    cache = cache.grow(max_new)
    key, sub = jax.random.split(key)
    out = jnp.full((b, max_new), -1, jnp.int32)
    prompt_counts = None if penalties is None else token_counts(tokens, valid, logits.shape[-1])
    first = strategy(penalized(logits[:, -1], prompt_counts, out, penalties), sub)
    window = stop_seqs.shape[1]

    def finished(tok, out, i):
        done = jnp.isin(tok, stop_tokens)
        tail = jax.lax.dynamic_slice_in_dim(jnp.pad(out, ((0, 0), (window, 0)), constant_values=-1), i + 1, window,
                                            axis=1)  # the last `window` tokens, ending with step i
        seq_hit = jnp.any(jnp.all((tail[:, None, :] == stop_seqs[None]) | (stop_seqs[None] == -1), -1)
                          & jnp.any(stop_seqs[None] != -1, -1), -1)
        return done, seq_hit

    def emit(tok, alive):
        if stream:
            io_callback(_emit_to_stream, None, jnp.where(alive, tok, -1), ordered=True)

    def body(carry):
        i, tok, out, n_out, alive, cache, key = carry
        is_stop, _ = finished(tok, out, i)
        keep = alive & ~is_stop
        out = out.at[:, i].set(jnp.where(keep, tok, -1))
        n_out = n_out + keep.astype(jnp.int32)
        _, seq_hit = finished(tok, out, i)
        emit(tok, keep)
        alive = keep & ~seq_hit
        logits, cache = model.extend(cache, tok[:, None], last_only=True, experts=experts)
        key, sub = jax.random.split(key)
        nxt = strategy(penalized(logits[:, -1], prompt_counts, out, penalties), sub)
        return i + 1, nxt, out, n_out, alive, cache, key

    def cond(carry):
        i, _, _, _, alive, _, _ = carry
        return (i < limit) & jnp.any(alive)

    init = (jnp.zeros((), jnp.int32), first, out, jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), cache, key)
    _, _, out, n_out, _, _, _ = jax.lax.while_loop(cond, body, init)
    return out, n_out


def _replicator(mesh):
    """Inputs as arrays replicated over the model's mesh (global arrays when several processes share it)."""
    if mesh is None:
        return jnp.asarray
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return put


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _generate(graphdef, state, experts, tokens, valid, key, stop_tokens, stop_seqs, penalties, *, strategy, max_new,
              limit, cache_dtype, stream):
    _stream_target[0] = stream
    try:
        result = _generate_jit(graphdef, state, experts, tokens, valid, key, stop_tokens, stop_seqs, penalties,
                               jnp.int32(limit),
                               strategy=strategy, max_new=max_new, cache_dtype=jnp.dtype(cache_dtype),
                               stream=stream is not None)
        if stream is not None:  # dispatch is asynchronous: let every callback run before unhooking it
            jax.block_until_ready(result)
            jax.effects_barrier()
        return result
    finally:
        _stream_target[0] = None
