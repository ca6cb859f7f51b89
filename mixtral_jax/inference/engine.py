"""Continuous batching: many requests share one jitted decode step, each in its own slot of one KV cache.

The cache has `max_batch` rows (slots) and one shared write column (`KVCache.length`): every decode step
writes each slot's token into that column, so one compiled step serves any mix of requests. A new request
is prefilled on its own, in chunks of bucketed sizes (a handful of shapes compile, never one per prompt),
one chunk between two decode steps so the running requests keep going; its row is then copied into a free
slot with its history ending at the shared column (left padding, which positions and the validity mask
ignore, exactly as in the batched sampler). When the columns run out, the whole cache shifts left past the
columns no running request still needs.

Sampling is per slot, by the batched sampler's core (`mixtral_jax.inference.sampling`): temperature,
top_k, top_p and the penalties are arrays with a row per slot; the penalties count each slot's prompt and
generated tokens in a (slots, vocab) array kept on the device (set from the prompt on admission, updated
by every decode step); each slot draws with the key of its own (seed, token index). So an answer does not
depend on what else is running, and equals the sampler's for the same request where the sampler's is
deterministic (greedy, or top_k 1). Per slot too: a `logit_bias` row (set on admission), the log
probabilities of the drawn token and the top 20 (computed in the step only when a slot asks), and an
allowed-token bitmask for a request with a `constraint` (a grammar, e.g. JSON): process 0 asks the
constraint for its mask after each token and the step restricts the draw to it, never resampling.

Multi-host: process 0 owns the queue and decides each step (which slots to free, which request to admit);
`broadcast_one_to_all` sends those orders to every process, and all of them run the same jitted steps.

The engine knows nothing of HTTP: `submit` takes token ids and two callbacks, called on the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from mixtral_jax.config import KV_CACHE_DTYPES
from mixtral_jax.errors import RequestError, SamplingError
from mixtral_jax.inference.penalties import penalize_rows, penalty_row
from mixtral_jax.inference.sampler import bucket, merge_flat, replicator, split_flat, to_host
from mixtral_jax.inference.sampling import (
    MAX_LOGIT_BIAS,
    Logprobs,
    RowParams,
    SamplingParams,
    apply_bitmask,
    bias_row,
    check_request,
    logprob_outputs,
    row_keys,
    sample,
    seed_words,
)
from mixtral_jax.model.kv_cache import KVCache
from mixtral_jax.model.mixtral import Mixtral


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """`max_context`: prompt + new tokens of one request (default: the model's, at most 4096, since the cache
    holds `max_batch` rows of it); `prefill_chunk`: the longest prefill call (longer prompts take several);
    `cache_dtype`: the KV cache's (default: the compute dtype; "int8" halves bf16's bytes)."""

    max_batch: int = 16
    max_context: int | None = None
    prefill_chunk: int = 256
    cache_dtype: str | None = None

    def __post_init__(self):
        if self.max_batch < 1:
            raise RequestError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_context is not None and self.max_context < 2:
            raise RequestError(f"max_context must be >= 2, got {self.max_context}")
        if self.prefill_chunk < 16 or self.prefill_chunk & (self.prefill_chunk - 1):
            raise RequestError(f"prefill_chunk must be a power of two >= 16, got {self.prefill_chunk}")
        if self.cache_dtype is not None and self.cache_dtype not in KV_CACHE_DTYPES:
            raise RequestError(f"unknown cache_dtype {self.cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}")


class Constraint(Protocol):
    """What the engine asks of a constrained request (e.g. `mixtral_jax.text.grammar.Grammar`): the allowed
    tokens as a (ceil(vocab / 32),) int32 bitmask (bit j of word i: token 32 i + j), and each drawn token."""

    def bitmask(self) -> np.ndarray: ...

    def advance(self, token: int) -> None: ...


class Request:
    """A submitted request. `on_token(id)` per new token, then `on_finish(reason)` once: "stop" (a stop
    token), "length" (max_tokens), "cancelled", or "abort" (the engine failed). Both run on the engine
    thread: keep them quick. With `params.logprobs` set, `logprobs[i]` holds token i's (log probability,
    [(id, log probability) of the top `params.logprobs`]) before `on_token` sees it."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_token: Callable[[int], None],
                 on_finish: Callable[[str], None], constraint: Constraint | None = None):
        self.prompt, self.params, self.constraint = prompt, params, constraint
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self._on_token, self._on_finish = on_token, on_finish
        self.cancelled = False
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.n_generated = 0

    def cancel(self) -> None:
        """Stop generating (a client went away, or a stop string matched); the slot frees at the next step."""
        self.cancelled = True


@dataclasses.dataclass
class Stats:
    """Counters for /metrics (read from other threads: plain ints and a bounded deque)."""

    tokens_generated: int = 0
    requests_finished: int = 0
    prompt_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    recent_ttft: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1000))


@dataclasses.dataclass
class _Orders:
    """What every process does this step: free these slots, start prefilling this request into that slot."""

    free: list[int]
    admit: tuple[int, list[int], SamplingParams, bool] | None = None  # slot, prompt, params, constrained?
    shutdown: bool = False
    request: Request | None = None  # the admitted request (process 0 only; not broadcast)


@dataclasses.dataclass
class _Slot:
    request: Request | None  # None on processes other than 0
    params: SamplingParams
    span: int  # cache columns this slot's history needs (prompt + tokens written)
    n_generated: int = 0
    last_token: int = 0
    constrained: bool = False


@dataclasses.dataclass
class _Prefill:
    slot: int
    request: Request | None
    params: SamplingParams
    tokens: np.ndarray  # (1, chunks * chunk), left-padded
    valid: np.ndarray
    chunk: int
    n_real: int
    constrained: bool = False
    done_chunks: int = 0
    cache: KVCache | None = None


class Engine:
    """Continuous-batching generation over `model`. Drive it with `start()` (a background thread) or call
    `step()` yourself; `submit` from any thread."""

    def __init__(self, model: Mixtral, config: EngineConfig = EngineConfig()):
        self.model, self.config = model, config
        mc = model.config
        self.max_context = config.max_context or min(mc.max_seq_len, 4096)
        if self.max_context > mc.max_seq_len:
            raise RequestError(f"max_context {self.max_context} exceeds the model's {mc.max_seq_len}")
        self.size = self.max_context + config.prefill_chunk  # room to insert a padded prompt ending anywhere
        self.eos_id = mc.eos_id
        model.use_huge_pages()  # on CPU: each decode step streams the weights faster
        self._graphdef, self._treedef, self._leaves = split_flat(model)  # see split_flat: ~1 ms a step
        self._experts = model.expert_views(rows=max(config.max_batch, config.prefill_chunk))
        self._cache_dtype = jnp.dtype(config.cache_dtype or model.runtime.dtype)
        self._put = replicator(model.runtime.mesh)
        self._empty = jax.jit(KVCache.empty, static_argnums=(0, 1, 2, 3),
                              out_shardings=None if model.runtime.mesh is None
                              else NamedSharding(model.runtime.mesh, PartitionSpec()))
        self.cache = self._empty(mc, config.max_batch, self.size, self._cache_dtype)
        self.counts = self._put(np.zeros((config.max_batch, mc.vocab_size), np.int32))  # for the penalties
        self.bias = self._put(np.zeros((config.max_batch, mc.vocab_size), np.float32))  # logit_bias per slot
        self._words = -(-mc.vocab_size // 32)
        self._masks = np.full((config.max_batch, self._words), -1, np.int32)  # allowed tokens, process 0
        self._open = self._put(self._masks.copy())  # every token allowed in every slot
        self._rows = None  # the slots' sampling arrays on the device, made again when a slot changes
        self.length = 0  # host copy of cache.length
        self.slots: list[_Slot | None] = [None] * config.max_batch
        self.prefill: _Prefill | None = None
        self.waiting: collections.deque[Request] = collections.deque()
        self.stats = Stats()
        self._lock = threading.Condition()
        self._to_free: list[int] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failed = False
        self.lead = jax.process_index() == 0

    # ------------------------------------------------------------------------------ public API
    def validate(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        """Raise RequestError unless the engine can serve this prompt with these parameters (`check_request`,
        the sampler's check, in this engine's context). Returns the prompt as a list of ints."""
        try:
            (prompt,), _ = check_request([prompt], params, vocab_size=self.model.config.vocab_size,
                                         context=self.max_context)
        except SamplingError as e:
            raise RequestError(str(e)) from None
        return prompt

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_token: Callable[[int], None] = lambda t: None,
               on_finish: Callable[[str], None] = lambda r: None, constraint: Constraint | None = None) -> Request:
        """Queue a request; `constraint` restricts each drawn token to what it allows (see `Constraint`)."""
        request = Request(self.validate(prompt, params), params, on_token, on_finish, constraint)
        with self._lock:
            if self._stopping:
                raise RequestError("the engine has failed" if self.failed else "the server is shutting down")
            self.waiting.append(request)
            self._lock.notify()
        return request

    @property
    def busy_slots(self) -> int:
        return sum(s is not None for s in self.slots) + (self.prefill is not None)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.busy_slots == 0

    def start(self) -> None:
        """Run the step loop on a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self.run, name="mixtral-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """The loop every process runs (process 0 plans each step; the others follow its broadcasts). If a
        step fails, every request is finished as "abort" and new ones are refused (a server reports 503)."""
        try:
            while self.step():
                pass
        except BaseException:
            with self._lock:
                self._stopping = self.failed = True
                pending = list(self.waiting) + [s.request for s in self.slots if s is not None]
                pending += [self.prefill.request] if self.prefill is not None else []
                self.waiting.clear()
            for r in pending:
                if r is not None:
                    self._finish(r, "abort")
            raise

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_seconds`, cancel the rest, end the loop."""
        with self._lock:
            self._stopping = True
        deadline = time.monotonic() + drain_seconds
        while not self.idle and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.02)
        with self._lock:
            for r in self.waiting:
                r.cancel()
            for s in self.slots:
                if s is not None and s.request is not None:
                    s.request.cancel()
            if self.prefill is not None and self.prefill.request is not None:
                self.prefill.request.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def step(self) -> bool:
        """One round: free and admit (as planned by process 0), one prefill chunk, one decode step.
        Returns False once the engine has shut down."""
        orders = self._decide() if self.lead else None
        if jax.process_count() > 1:
            orders = self._broadcast(orders)
        self._apply(orders)
        if orders.shutdown:
            return False
        if self.prefill is not None:
            self._prefill_chunk()
        if any(s is not None for s in self.slots):
            self._decode()
        return True

    # ------------------------------------------------------------------------------ deciding
    def _decide(self) -> _Orders:
        with self._lock:
            while True:
                free = list(self._to_free)
                self._to_free.clear()
                for i, s in enumerate(self.slots):
                    if s is not None and s.request is not None and s.request.cancelled and i not in free:
                        free.append(i)
                while self.waiting and self.waiting[0].cancelled:
                    self._finish(self.waiting.popleft(), "cancelled")
                if self.prefill is not None and self.prefill.request.cancelled:
                    free.append(self.prefill.slot)
                admit, request = None, None
                prefilling = self.prefill is not None and self.prefill.slot not in free
                busy = self.prefill.slot if prefilling else None
                open_slots = [i for i, s in enumerate(self.slots) if (s is None or i in free) and i != busy]
                if self.waiting and open_slots and not prefilling:
                    request = self.waiting.popleft()
                    admit = (open_slots[0], request.prompt, request.params, request.constraint is not None)
                if free or admit or prefilling or any(s is not None for s in self.slots):
                    return _Orders(free, admit, request=request)
                if self._stopping:
                    return _Orders([], None, shutdown=True)
                if not self._lock.wait(timeout=0.5) and jax.process_count() > 1:
                    return _Orders([])  # idle: an empty step keeps the other processes' collectives from timing out

    def _broadcast(self, orders: _Orders | None) -> _Orders:
        """Process 0's orders on every process, as one fixed-size int32 array: a header (shutdown, number of
        slots to free, admit?, slot, prompt length, max_tokens, top_k (0: off), the seed's low and high
        words, the bits of temperature, top_p and the repetition, presence and frequency penalties, then
        logprobs (-1: off), the number of logit_bias entries, constrained?), the slots to free, the prompt,
        the logit_bias ids and the bits of their values. (The stop tokens stay on process 0, which decides
        when a slot frees; a constraint's masks are broadcast by the steps that use them.)"""
        b, h, n = self.config.max_batch, 17, MAX_LOGIT_BIAS
        buf = np.zeros(h + b + self.max_context + 2 * n, np.int32)
        tail = h + b + self.max_context
        if orders is not None:
            buf[0], buf[1] = orders.shutdown, len(orders.free)
            buf[h:h + len(orders.free)] = orders.free
            if orders.admit is not None:
                slot, prompt, p, constrained = orders.admit
                floats = np.array([p.temperature, p.top_p, *penalty_row(p.repetition_penalty, p.presence_penalty,
                                                                         p.frequency_penalty)], np.float32)
                buf[2:h] = (1, slot, len(prompt), p.max_tokens, p.top_k or 0, *seed_words(p.seed).view(np.int32),
                            *floats.view(np.int32), -1 if p.logprobs is None else p.logprobs, len(p.logit_bias),
                            constrained)
                buf[h + b:h + b + len(prompt)] = prompt
                if p.logit_bias:
                    ids, values = zip(*p.logit_bias, strict=True)
                    buf[tail:tail + len(ids)] = ids
                    buf[tail + n:tail + n + len(ids)] = np.array(values, np.float32).view(np.int32)
        buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        if orders is not None:
            return orders
        admit = None
        if buf[2]:
            lo, hi = buf[7:9].view(np.uint32).tolist()
            temperature, top_p, repetition, presence, frequency = buf[9:14].view(np.float32).tolist()
            k = int(buf[15])
            bias = tuple(zip(buf[tail:tail + k].tolist(), buf[tail + n:tail + n + k].view(np.float32).tolist(),
                             strict=True))
            params = SamplingParams(max_tokens=int(buf[5]), temperature=temperature, top_k=int(buf[6]) or None,
                                    top_p=top_p, repetition_penalty=repetition, presence_penalty=presence,
                                    frequency_penalty=frequency, seed=lo | (hi << 32), logit_bias=bias,
                                    logprobs=None if buf[14] < 0 else int(buf[14]))
            admit = (int(buf[3]), buf[h + b:h + b + buf[4]].tolist(), params, bool(buf[16]))
        return _Orders(buf[h:h + buf[1]].tolist(), admit, bool(buf[0]))

    def _apply(self, orders: _Orders) -> None:
        for i in orders.free:
            if self.prefill is not None and self.prefill.slot == i:
                if self.prefill.request is not None:
                    self._finish(self.prefill.request, "cancelled")
                self.prefill = None
            slot = self.slots[i]
            if slot is not None and slot.request is not None and slot.request.finish_reason is None:
                self._finish(slot.request, "cancelled")
            self.slots[i] = None
            self._masks[i] = -1
            self._rows = None
        if orders.admit is not None:
            slot, prompt, params, constrained = orders.admit
            self.prefill = _new_prefill(slot, orders.request, params, prompt, self.config.prefill_chunk, constrained)

    # ------------------------------------------------------------------------------ device steps
    def _prefill_chunk(self) -> None:
        p = self.prefill
        if p.cache is None:  # as wide as the batch cache (one compile per chunk size), the prompt at its end
            p.cache = dataclasses.replace(self._empty(self.model.config, 1, self.size, self._cache_dtype),
                                          length=self._put(np.int32(self.size - p.tokens.shape[1])))
        lo, hi = p.done_chunks * p.chunk, (p.done_chunks + 1) * p.chunk
        logits, p.cache = _prefill(self._graphdef, self._treedef, self._leaves, self._experts, p.cache,
                                   self._put(p.tokens[:, lo:hi]), self._put(p.valid[:, lo:hi]))
        p.done_chunks += 1
        if hi < p.tokens.shape[1]:
            return
        self.prefill = None
        if self.length < p.n_real:  # the prompt must end at the shared write column
            self._shift(p.n_real)
        self.cache = _insert(self.cache, p.cache, self._put(np.int32(p.slot)))
        vocab = self.model.config.vocab_size
        prompt_counts = np.bincount(p.tokens[p.valid], minlength=vocab).astype(np.int32)
        mask = np.full((1, self._words), -1, np.int32)
        if p.constrained:
            if p.request is not None:
                mask[0] = p.request.constraint.bitmask()
            mask = self._share(mask)
        first, logprobs, self.counts, self.bias = _admit(
            self.counts, self.bias, self._put(np.int32(p.slot)), self._put(prompt_counts),
            self._put(bias_row(p.params, vocab)), logits, self._put(mask),
            self._put(np.array([p.params.logprobs is not None])), *self._sampling_arrays([p.params]))
        token = int(to_host(first)[0])
        self.slots[p.slot] = _Slot(p.request, p.params, span=p.n_real, constrained=p.constrained)
        self._rows = None
        if p.request is not None:
            self.stats.prompt_tokens += p.n_real
        self._emit(p.slot, token, self._host_logprobs(logprobs, [p.params], 0))

    def _decode(self) -> None:
        if self.length == self.size:  # out of columns: drop those no running request still needs
            self._shift(max(s.span for s in self.slots if s is not None))
        b = self.config.max_batch
        tokens, active, index = np.zeros(b, np.int32), np.zeros(b, bool), np.zeros(b, np.int32)
        for i, s in enumerate(self.slots):
            if s is not None:
                tokens[i], active[i], index[i] = s.last_token, True, s.n_generated
                s.span += 1
        params = [SamplingParams() if s is None else s.params for s in self.slots]
        if self._rows is None:
            self._rows = (*self._sampling_arrays(params),
                          self._put(np.array([p.logprobs is not None for p in params])))
        constrained = any(s is not None and s.constrained for s in self.slots)
        mask = self._share(self._masks) if constrained else self._open
        out, logprobs, self.cache, self.counts = _decode(
            self._graphdef, self._treedef, self._leaves, self._experts, self.cache, self.counts, self.bias,
            self._put(tokens), self._put(active), mask, *self._rows, self._put(index))
        self.length += 1
        out = to_host(out)
        for i, s in enumerate(self.slots):
            if s is not None and (s.request is None or s.request.finish_reason is None):
                self._emit(i, int(out[i]), self._host_logprobs(logprobs, params, i))

    def _shift(self, new_length: int) -> None:
        self.cache = _shift(self.cache, self._put(np.int32(new_length)))
        self.length = new_length

    def _share(self, mask: np.ndarray):
        """Process 0's constraint masks on the device of every process."""
        if jax.process_count() > 1:
            mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
        return self._put(mask)

    def _host_logprobs(self, logprobs: Logprobs, params: Sequence[SamplingParams], row: int):
        """Row `row`'s (log probability, top list) on the host where its request asked for them, else None."""
        k = params[row].logprobs
        if k is None or not self.lead:
            return None
        chosen, ids, values = (to_host(a)[row] for a in (logprobs.chosen, logprobs.top_ids, logprobs.top_values))
        return float(chosen), list(zip(ids[:k].tolist(), values[:k].tolist(), strict=True))

    def _sampling_arrays(self, params: Sequence[SamplingParams]):
        """(RowParams, (3, rows) penalty table, (rows, 2) seed words) on the device, a row per request."""
        table = np.stack([penalty_row(p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
                          for p in params], axis=1)
        seeds = np.stack([seed_words(p.seed) for p in params])
        return jax.tree.map(self._put, RowParams.of(params)), self._put(table), self._put(seeds)

    # ------------------------------------------------------------------------------ host bookkeeping
    def _emit(self, i: int, token: int, logprobs=None) -> None:
        """Record slot i's new token; on process 0, pass it on (with its logprobs, and to its constraint, which
        then gives the next step's mask) or finish the request."""
        s = self.slots[i]
        s.n_generated += 1
        s.last_token = token
        if s.request is None:  # a follower process: process 0 decides when the slot frees
            return
        r = s.request
        stops = (self.eos_id,) if s.params.stop_tokens is None else s.params.stop_tokens
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
            ttft = r.first_token_at - r.submitted
            self.stats.ttft_sum += ttft
            self.stats.ttft_count += 1
            self.stats.recent_ttft.append(ttft)
        if r.cancelled:
            reason = "cancelled"
        elif token in stops:
            reason = "stop"
        else:
            r.n_generated += 1
            self.stats.tokens_generated += 1
            if logprobs is not None:
                r.logprobs.append(logprobs)
            if r.constraint is not None:
                r.constraint.advance(token)
                self._masks[i] = r.constraint.bitmask()
            r._on_token(token)
            reason = "length" if r.n_generated >= s.params.max_tokens else None
        if reason is not None:
            self._finish(r, reason)
            with self._lock:
                self._to_free.append(i)

    def _finish(self, request: Request, reason: str) -> None:
        if request.finish_reason is None:
            request.finish_reason = reason
            self.stats.requests_finished += 1
            request._on_finish(reason)


def _new_prefill(slot, request, params, prompt, max_chunk, constrained=False) -> _Prefill:
    """Left-pad the prompt to whole chunks: one bucketed chunk when it fits, else chunks of `max_chunk`."""
    n = len(prompt)
    chunk = min(bucket(n), max_chunk)
    width = math.ceil(n / chunk) * chunk
    tokens, valid = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
    tokens[0, width - n:], valid[0, width - n:] = prompt, True
    return _Prefill(slot, request, params, tokens, valid, chunk, n, constrained)


# ---------------------------------------------------------------------------------- jitted pieces
@functools.partial(jax.jit, static_argnames=("graphdef", "treedef"), donate_argnames=("cache",))
def _prefill(graphdef, treedef, leaves, experts, cache, tokens, valid):
    model = merge_flat(graphdef, treedef, leaves)
    logits, cache = model.extend(cache, tokens, valid, last_only=True, expert_weights=experts)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "treedef"), donate_argnames=("cache", "counts"))
def _decode(graphdef, treedef, leaves, experts, cache, counts, bias, tokens, active, mask, strategy, penalties,
            seeds, wanted, index):
    """One decode step of every slot: feed each its last token (now counted for the penalties) and choose
    its next, token number `index` of its request. Returns (tokens, Logprobs, cache, counts)."""
    model = merge_flat(graphdef, treedef, leaves)
    logits, cache = model.extend(cache, tokens[:, None], active[:, None], last_only=True, expert_weights=experts)
    counts = counts.at[jnp.arange(tokens.shape[0]), tokens].add(active.astype(jnp.int32))
    chosen, logprobs = _choose(penalize_rows(logits[:, -1], counts, penalties) + bias, mask, strategy, seeds,
                               wanted, index)
    return chosen, logprobs, cache, counts


@functools.partial(jax.jit, donate_argnames=("counts", "bias"))
def _admit(counts, bias, slot, prompt_counts, bias_row, logits, mask, wanted, strategy, penalties, seeds):
    """A prefilled request's first token (its token 0), penalised by its prompt's counts and biased by its
    logit_bias, which become its slot's rows of `counts` and `bias` (whatever the slot's last request left)."""
    counts = jax.lax.dynamic_update_slice(counts, prompt_counts[None], (slot, jnp.int32(0)))
    bias = jax.lax.dynamic_update_slice(bias, bias_row[None], (slot, jnp.int32(0)))
    logits = penalize_rows(logits, prompt_counts[None], penalties) + bias_row[None]
    chosen, logprobs = _choose(logits, mask, strategy, seeds, wanted, jnp.zeros((1,), jnp.int32))
    return chosen, logprobs, counts, bias


def _choose(logits, mask, strategy, seeds, wanted, index):
    """The draw from the penalised, biased logits restricted to `mask`, and the log probabilities of those
    logits (before temperature and the mask, as OpenAI and vLLM report them)."""
    chosen = sample(apply_bitmask(logits, mask), strategy, _slot_keys(seeds, index))
    return chosen, logprob_outputs(logits, chosen, wanted)


def _slot_keys(seeds, index):
    """Each slot's key for its token `index`: a request is one row (row 0), as in a one-prompt Sampler call."""
    return row_keys(seeds, jnp.zeros_like(index), index)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _insert(cache: KVCache, row: KVCache, slot) -> KVCache:
    """Copy a one-row cache of the same width (its history ending at its last column) into row `slot`,
    moved to end at `cache.length`; the columns that wrap around are invalid."""
    moved = _roll(row, cache.length)

    def put(big, small):
        return jax.lax.dynamic_update_slice(big, small, (slot,) + (0,) * (big.ndim - 1))

    return KVCache(**_per_layer(put, cache, moved),
                   positions=put(cache.positions, moved.positions), valid=put(cache.valid, moved.valid),
                   length=cache.length, next_position=cache.next_position.at[slot].set(row.next_position[0]))


def _per_layer(fn, *caches: KVCache) -> dict:
    """`fn` over the per-layer arrays of `caches` (keys, values, and an int8 cache's scales)."""
    names = ("k", "v", "k_scale", "v_scale")
    return {n: None if getattr(caches[0], n) is None else tuple(map(fn, *(getattr(c, n) for c in caches)))
            for n in names}


def _roll(cache: KVCache, new_length) -> KVCache:
    """Move every row's columns by new_length - length (rows that end at `length` then end at
    `new_length`); columns that wrap around become invalid."""
    delta = new_length - cache.length
    source = jnp.arange(cache.size) - delta
    keep = (source >= 0) & (source < cache.length)
    roll = functools.partial(jnp.roll, shift=delta)
    return KVCache(**_per_layer(lambda a: roll(a, axis=2), cache),
                   positions=roll(cache.positions, axis=1), valid=roll(cache.valid, axis=1) & keep[None],
                   length=jnp.asarray(new_length, jnp.int32), next_position=cache.next_position)


@functools.partial(jax.jit, donate_argnames=("cache",))
def _shift(cache: KVCache, new_length) -> KVCache:
    """All rows end at `length`, so one move keeps them aligned: left to drop columns nobody needs, right
    to make room for a longer prompt."""
    return _roll(cache, new_length)

