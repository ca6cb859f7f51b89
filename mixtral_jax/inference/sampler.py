"""A jitted sampler: left-padded prefill into a preallocated KV cache, then a `lax.while_loop` decode.

Prompts are left-padded to a bucket length (so a handful of shapes compile, not one per prompt) and every
row writes its next token into the same cache slot; each row's positions count only its real tokens, so
padding changes nothing. The loop stops when every row is done or `max_new_tokens` is reached.

`prefill` and `decode` are jitted apart, exactly as `mixtral_jax.planning.planner` compiles them for a TPU slice.
Streaming (`Sampler.stream`, a generator) runs the same decode step one jitted call at a time and yields
each step's tokens: no callback state lives anywhere, so concurrent generations in one process (a
server's threads) never see each other's tokens.

Each token is chosen by `mixtral_jax.inference.sampling.sample`, the core the serving engine uses too:
the strategy (`Greedy()`, or per-row `RowParams` arrays, traced, so a new temperature compiles nothing) is
an argument of the jitted functions, and row r's token i is drawn with the key of (seed, r, i).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mixtral_jax.config import KV_CACHE_DTYPES
from mixtral_jax.errors import SamplingError
from mixtral_jax.inference.penalties import PenaltyValue, apply_penalties, penalized, token_counts
from mixtral_jax.inference.sampling import (
    Greedy,
    RowParams,
    SamplingParams,
    check_request,
    make_strategy,
    row_keys,
    sample,
    seed_words,
)
from mixtral_jax.model.compiled import HashedOnce, flat_state, merge_flat, split_flat  # noqa: F401 - re-exported
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.mixtral import Mixtral

_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


# ------------------------------------------------------------------------------------ sampler
def bucket(n: int) -> int:
    return next((b for b in _BUCKETS if b >= n), n)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Generate from `model`. Hold one per model: compiled functions are cached per shape (and greedy or not).
    `cache_dtype`: the KV cache's (default: the compute dtype; "int8" stores int8 with a scale per token
    and head)."""

    model: Mixtral
    cache_dtype: jnp.dtype | str | None = None
    # the last stream's seconds per decode step, by batch size: the next stream's first group is sized by it
    _step_times: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.cache_dtype is not None and jnp.dtype(self.cache_dtype).name not in KV_CACHE_DTYPES:
            raise SamplingError(f"unknown KV cache dtype {self.cache_dtype!r}; choose from "
                                f"{', '.join(KV_CACHE_DTYPES)}")
        self.model.use_huge_pages()  # on CPU: each decode step streams the weights faster

    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_tokens: Sequence[int] | None = None, stop_sequences: Sequence[Sequence[int]] = (),
                 stream: Callable[[np.ndarray], None] | None = None, repetition_penalty: PenaltyValue = 1.0,
                 presence_penalty: PenaltyValue = 0.0, frequency_penalty: PenaltyValue = 0.0) -> list[list[int]]:
        """Return each prompt's new tokens (stop tokens and stop sequences excluded).

        `stream(tokens)` is called once per step with a (batch,) array of the step's tokens (-1 for rows
        already done). The penalties (see `mixtral_jax.inference.penalties`) are one number or one per prompt.
        """
        request = self._request(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
                                stop_sequences, repetition_penalty, presence_penalty, frequency_penalty)
        if stream is None:
            out, n_out = self._run(request)
        else:
            steps = self._steps(request)
            for tokens in steps:
                stream(tokens)
            out, n_out = steps.result
        return request.answers(out, n_out)

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> Iterator[np.ndarray]:
        """Generate step by step: yields each step's (batch,) tokens (-1 for rows already done); the same
        tokens `__call__` returns, whose keyword arguments it takes (except `stream`)."""
        request = self._request(prompts, max_new_tokens, kwargs.pop("temperature", 0.0), kwargs.pop("top_k", None),
                                kwargs.pop("top_p", None), kwargs.pop("seed", 0), kwargs.pop("stop_tokens", None),
                                kwargs.pop("stop_sequences", ()), kwargs.pop("repetition_penalty", 1.0),
                                kwargs.pop("presence_penalty", 0.0), kwargs.pop("frequency_penalty", 0.0))
        if kwargs:
            raise SamplingError(f"unknown argument(s) to Sampler.stream: {', '.join(sorted(kwargs))}")
        yield from self._steps(request)

    # ---- one request: checked, padded, on the model's devices
    def _request(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, stop_sequences,
                 repetition_penalty, presence_penalty, frequency_penalty) -> _Request:
        config = self.model.config
        params = SamplingParams(max_new_tokens, temperature, top_k, 1.0 if top_p is None else top_p,
                                repetition_penalty, presence_penalty, frequency_penalty, seed,
                                None if stop_tokens is None else tuple(stop_tokens))
        prompts, penalties = check_request(prompts, params, vocab_size=config.vocab_size,
                                           context=config.max_seq_len, length_name="max_new_tokens")
        strategy = make_strategy(params.temperature, params.top_k, params.top_p, rows=len(prompts))
        stops = [config.eos_id] if stop_tokens is None else list(params.stop_tokens)
        seqs = [list(s) for s in stop_sequences if len(s)]
        longest = max(map(len, prompts))
        prompt_len = bucket(longest)
        tokens = np.zeros((len(prompts), prompt_len), np.int32)
        valid = np.zeros((len(prompts), prompt_len), bool)
        for i, p in enumerate(prompts):
            tokens[i, prompt_len - len(p):] = p
            valid[i, prompt_len - len(p):] = True
        stop_arr = np.full((max(len(seqs), 1), max((len(s) for s in seqs), default=1)), -1, np.int32)
        for i, s in enumerate(seqs):
            stop_arr[i, stop_arr.shape[1] - len(s):] = s
        put = replicator(self.model.runtime.mesh)
        return _Request(put(tokens), put(valid), put(seed_words(seed)), put(np.asarray(stops or [-1], np.int32)),
                        put(stop_arr), None if penalties is None else put(penalties), jax.tree.map(put, strategy),
                        bucket(max_new_tokens), max_new_tokens, seqs)

    def _prefill(self, r: _Request):
        graphdef, state = nnx.split(self.model)
        graphdef = HashedOnce.of(graphdef)
        weights = self.model.expert_views(rows=r.tokens.shape[0])
        first, cache, seed, prompt_counts = prefill(
            graphdef, state, weights, r.tokens, r.valid, r.seed, r.penalties, strategy=r.strategy, max_new=r.max_new,
            cache_dtype=jnp.dtype(self.cache_dtype or self.model.runtime.dtype))
        return graphdef, state, weights, first, cache, seed, prompt_counts

    def _run(self, r: _Request):
        graphdef, state, weights, first, cache, seed, prompt_counts = self._prefill(r)
        out, n_out, _ = decode(graphdef, state, weights, first, cache, seed, r.stop_tokens, r.stop_seqs, prompt_counts,
                               r.penalties, jnp.int32(r.limit), strategy=r.strategy, max_new=r.max_new)
        return to_host(out), to_host(n_out)

    def _steps(self, r: _Request) -> _Steps:
        return _Steps(self, r)


class _Request(NamedTuple):
    """A checked request on the model's devices."""

    tokens: jax.Array          # (b, prompt_len) left-padded
    valid: jax.Array           # (b, prompt_len)
    seed: jax.Array            # (2,) uint32 seed_words
    stop_tokens: jax.Array     # (n,)
    stop_seqs: jax.Array       # (m, window), left-padded with -1
    penalties: jax.Array | None  # (3, b) or None
    strategy: Greedy | RowParams
    max_new: int               # the output buffer: a bucket >= limit
    limit: int                 # max_new_tokens
    seqs: list                 # the stop sequences, to cut from the answers

    def answers(self, out: np.ndarray, n_out: np.ndarray) -> list[list[int]]:
        results = []
        for row, n in zip(out, n_out):
            seq = row[:n].tolist()
            for s in self.seqs:  # the matched stop sequence is not part of the answer
                if len(seq) >= len(s) and seq[-len(s):] == s:
                    seq = seq[:-len(s)]
                    break
            results.append(seq)
        return results


class _Steps:
    """Iterate a request's decode steps, yielding each step's tokens; `result` holds (out, n_out) at the end.

    The steps run in groups, one jitted `decode_steps` call each. Each group is dispatched before the
    previous one's tokens are read back, so Python's dispatch and the host copy overlap the device's
    work. A group runs as many steps as fit in `STREAM_LATENCY` seconds (at most `STREAM_GROUP`; one
    until the step time is known, from this stream or the sampler's last one of the same batch size): on
    a fast CPU model each dispatch costs ~0.4 ms of Python and ~0.5 ms of launching the program, 10-30% of
    a 3-7 ms step, while tokens held back for 20 ms go unnoticed. A slow model streams one step at a time.
    A group stops where the decode ends, so `result` is the same as `__call__`'s."""

    def __init__(self, sampler: Sampler, r: _Request):
        self._sampler, self._r, self.result = sampler, r, None

    def __iter__(self) -> Iterator[np.ndarray]:
        r = self._r
        graphdef, state, weights, first, cache, seed, prompt_counts = self._sampler._prefill(r)
        carry = start_decoding(first, cache, seed, max_new=r.max_new)
        limit = jnp.int32(r.limit)
        treedef, leaves = flat_state(state)

        def group(carry, steps: int):
            return decode_steps(graphdef, treedef, leaves, weights, carry, r.stop_tokens, r.stop_seqs, prompt_counts,
                                r.penalties, limit, jnp.int32(steps), strategy=r.strategy)

        batch = r.tokens.shape[0]
        known = self._sampler._step_times.get(batch)
        size = 1 if known is None else _group_size(known)
        pending = group(carry, size)
        last = time.perf_counter()
        while True:
            carry, emitted, ran, more = pending
            pending = group(carry, size)  # dispatched now, runs while this group's tokens are read back
            emitted, ran = to_host(emitted), int(to_host(ran))
            yield from emitted[:ran]
            now = time.perf_counter()
            if ran:
                step_time, last = (now - last) / ran, now
                self._sampler._step_times[batch] = step_time
                size = _group_size(step_time)
            if not bool(to_host(more)):
                break
        carry = pending[0]  # ran no step: the decode had ended
        self.result = (to_host(carry.out), to_host(carry.n_out))


STREAM_GROUP = 8          # decode steps one streaming dispatch runs at most
STREAM_LATENCY = 0.02     # seconds of tokens a stream may hold back so that several steps share a dispatch


def _group_size(step_time: float) -> int:
    return max(1, min(STREAM_GROUP, int(STREAM_LATENCY / step_time)))


# ------------------------------------------------------------------------------- jitted pieces
PREFILL_CHUNK = 512  # tokens per prefill step: one compiled step serves every prompt length


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "cache_dtype", "chunk"))
def prefill(graphdef, state, expert_weights, tokens, valid, seed, penalties, *, strategy, max_new, cache_dtype,
            chunk=PREFILL_CHUNK):
    """Prompts (b, prompt_len) into a cache of prompt_len + `max_new` slots, `chunk` tokens at a time.

    The chunks run in a `lax` loop, so tracing and compiling cost one chunk's program whatever the prompt's
    length, and each step's activations (and the MoE's buckets) are chunk-sized; chunks that are padding
    in every row are skipped. `seed`: (2,) uint32 `seed_words`; `strategy`: `Greedy()` or per-row
    `RowParams` (a traced argument). Returns (first new tokens (b,), cache, `seed` (for `decode`), the
    prompts' token counts (for the penalties; None without them)). Jitted apart from `decode` so that each
    compiles (and `mixtral_jax.planning.planner` lowers each) exactly as generation runs it."""
    model = nnx.merge(HashedOnce.unwrap(graphdef), state)
    b, prompt_len = tokens.shape
    mesh = model.runtime.mesh
    cache = KVCache.empty(model.config, b, prompt_len + max_new, cache_dtype, mesh=mesh)
    chunk = min(chunk, prompt_len)
    if prompt_len % chunk:
        raise ValueError(f"prompt length {prompt_len} is not a multiple of the prefill chunk {chunk}")

    def step(i, carry):
        cache, _ = carry
        piece = lambda a: jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)  # noqa: E731
        return model.extend(cache, piece(tokens), piece(valid), last_only=True, expert_weights=expert_weights)[::-1]

    start = jnp.argmax(jnp.any(valid, axis=0)).astype(jnp.int32) // chunk  # the first chunk any row uses
    cache = dataclasses.replace(cache, length=start * chunk)
    logits = jnp.zeros((b, 1, model.config.vocab_size), jnp.float32)
    if prompt_len == chunk:
        cache, logits = step(0, (cache, logits))
    else:
        cache, logits = jax.lax.fori_loop(start, prompt_len // chunk, step, (cache, logits))
    prompt_counts = None if penalties is None else token_counts(tokens, valid, logits.shape[-1])
    logits = apply_penalties(logits[:, -1], prompt_counts, penalties)
    first = sample(logits, strategy, _keys(seed, b, jnp.int32(0)))
    return first, cache, seed, prompt_counts


def _keys(seed, b: int, index) -> jax.Array:
    """Row r's key for token `index`: the same seed for every row, told apart by the row's number."""
    return row_keys(jnp.broadcast_to(seed, (b, 2)), jnp.arange(b, dtype=jnp.int32), jnp.full((b,), index, jnp.int32))


class DecodeState(NamedTuple):
    step: jax.Array        # () tokens emitted so far (the loop counter)
    token: jax.Array       # (b,) the token chosen last, not yet written
    out: jax.Array         # (b, max_new) tokens written, -1 after a row ends
    n_out: jax.Array       # (b,) tokens each row keeps
    alive: jax.Array       # (b,) rows still generating
    cache: KVCache
    seed: jax.Array        # (2,) uint32 seed_words


def _start(first, cache, seed, max_new: int) -> DecodeState:
    b = first.shape[0]
    return DecodeState(jnp.zeros((), jnp.int32), first, jnp.full((b, max_new), -1, jnp.int32),
                       jnp.zeros((b,), jnp.int32), jnp.ones((b,), bool), cache, seed)


def _step(model: Mixtral, expert_weights, s: DecodeState, stop_tokens, stop_seqs, prompt_counts, penalties,
          strategy, limit) -> tuple[DecodeState, jax.Array]:
    """Write the last token (or end its row), feed it through the model, choose the next one. Returns the
    new state and this step's emitted tokens (-1 for rows already done). A step at `limit` or after every
    row ended emits and keeps nothing (streaming runs one such step ahead; see `_Steps`)."""
    window = stop_seqs.shape[1]

    def finished(tok, out, i):
        done = jnp.isin(tok, stop_tokens)
        tail = jax.lax.dynamic_slice_in_dim(jnp.pad(out, ((0, 0), (window, 0)), constant_values=-1), i + 1, window,
                                            axis=1)  # the last `window` tokens, ending with step i
        seq_hit = jnp.any(jnp.all((tail[:, None, :] == stop_seqs[None]) | (stop_seqs[None] == -1), -1)
                          & jnp.any(stop_seqs[None] != -1, -1), -1)
        return done, seq_hit

    i, tok = s.step, s.token
    is_stop, _ = finished(tok, s.out, i)
    keep = s.alive & ~is_stop & (i < limit)
    emitted = jnp.where(keep, tok, -1)
    out = s.out.at[:, i].set(emitted)
    n_out = s.n_out + keep.astype(jnp.int32)
    _, seq_hit = finished(tok, out, i)
    alive = keep & ~seq_hit
    logits, cache = model.extend(s.cache, tok[:, None], last_only=True, expert_weights=expert_weights)
    logits = penalized(logits[:, -1], prompt_counts, out, penalties)
    nxt = sample(logits, strategy, _keys(s.seed, tok.shape[0], i + 1))  # token i + 1 (the prefill chose token 0)
    return DecodeState(i + 1, nxt, out, n_out, alive, cache, s.seed), emitted


def _running(s: DecodeState, limit) -> jax.Array:
    return (s.step < limit) & jnp.any(s.alive)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new"), donate_argnames=("cache",))
def decode(graphdef, state, expert_weights, first, cache, seed, stop_tokens, stop_seqs, prompt_counts, penalties,
           limit, *, strategy, max_new):
    """The decode loop: one `lax.while_loop` from the prefill's first tokens until every row is done or
    `limit` tokens are out. Returns (tokens (b, max_new), counts (b,), cache). The cache is donated and
    returned, so the loop updates the prefill's buffers in place (without an output to alias, XLA would
    carry a second copy of the whole cache)."""
    model = nnx.merge(HashedOnce.unwrap(graphdef), state)

    def body(s):
        return _step(model, expert_weights, s, stop_tokens, stop_seqs, prompt_counts, penalties, strategy, limit)[0]

    final = jax.lax.while_loop(lambda s: _running(s, limit), body, _start(first, cache, seed, max_new))
    return final.out, final.n_out, final.cache


@functools.partial(jax.jit, static_argnames=("max_new",), donate_argnames=("cache",))
def start_decoding(first, cache, seed, *, max_new) -> DecodeState:
    """The decode loop's initial state, for running it a group of steps at a time (`decode_steps`)."""
    return _start(first, cache, seed, max_new)


@functools.partial(jax.jit, static_argnames=("graphdef", "treedef"), donate_argnames=("s",))
def decode_steps(graphdef, treedef, leaves, expert_weights, s: DecodeState, stop_tokens, stop_seqs, prompt_counts,
                 penalties, limit, steps, *, strategy) -> tuple[DecodeState, jax.Array, jax.Array, jax.Array]:
    """Up to `steps` (<= `STREAM_GROUP`, a traced count: one program serves every group size) iterations
    of `decode`'s loop body, stopping where the decode ends: (new state, emitted tokens
    (STREAM_GROUP, b), -1 beyond the steps run, steps run, whether to go on). The model's state comes as
    its flat leaves and `treedef` (see `split_flat`)."""
    model = merge_flat(graphdef, treedef, leaves)

    def body(c):
        s, ran, emitted = c
        s, tokens = _step(model, expert_weights, s, stop_tokens, stop_seqs, prompt_counts, penalties, strategy, limit)
        return s, ran + 1, emitted.at[ran].set(tokens)

    start = (s, jnp.int32(0), jnp.full((STREAM_GROUP, s.token.shape[0]), -1, jnp.int32))
    s, ran, emitted = jax.lax.while_loop(lambda c: (c[1] < steps) & _running(c[0], limit), body, start)
    return s, emitted, ran, _running(s, limit)


def replicator(mesh):
    """Inputs as arrays replicated over the model's mesh (global arrays when several processes share it)."""
    if mesh is None:
        return jnp.asarray
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
    return put


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host: directly, from a local replica, or gathered from every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.sharding.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
