"""The serving engine: continuous batching over a paged KV cache, every running request in one jitted step.

Each step (`paged_step.paged_step`) runs every running decode and prefill chunks of one or several new
requests together, as a ragged batch of at most `prefill_chunk` tokens per sequence shard: no request
waits for another's whole prefill, and a handful of shapes compile (token counts in powers of two). The
KV cache is pages (`model.kv_cache.PagedKVCache`) handed out by page tables (`scheduler.Scheduler`, one
`pages.PagePool` per sequence shard): requests come and go without moving anything; when pages run out
the youngest request of a shard is preempted (its pages freed, prefilled again later), never an
out-of-memory and never a dropped request. Full pages are shared by prefix (a repeated system prompt is
prefilled once; the `n` choices of one request share their prompt's pages). Step k + 1 is dispatched
before step k's tokens are read back (decode tokens not yet on the host come from the previous step's
output on the device), except while a grammar-constrained request runs: its next mask needs its token.

On a mesh, sequences split over the rules' `batch` axes (data x expert: S shards, each with its own rows
and pages) and KV heads over `tensor`; the MoE is expert-parallel as everywhere.

Sampling is per row, by the batched sampler's core (`mixtral_jax.inference.sampling`): temperature, top_k,
top_p and the penalties are arrays with a row per sequence; the penalties count each row's prompt and
generated tokens in a (rows, vocab) array on the device (every token fed into a row is counted; a request
with penalties therefore prefills its whole prompt rather than use cached pages); each request draws with
the key of its own (seed, token index). So an answer does not depend on what else is running, and equals
the sampler's for the same request where the sampler's is deterministic (greedy, or top_k 1). Per row
too: a `logit_bias` row (set on admission), the log probabilities of the drawn token and the top 20
(computed in the step only when a row asks), and an allowed-token bitmask for a request with a
`constraint` (a grammar, e.g. JSON): process 0 asks the constraint for its mask after each token.

Multi-host: process 0 owns the queue and the scheduler; `broadcast_one_to_all` sends each step's orders
(rows freed and admitted with their sampling parameters, and the step's arrays) to every process, and all
of them run the same jitted steps.

LoRA: on a model with stacked adapters (`lora.stack_adapters`) a request names its adapter (`submit(...,
adapter=)`); each row's adapter index is a step input, turned into its tokens' rank mask inside the step, so
requests of different adapters (and none) share every step. Prefix-cache keys start from the adapter:
pages are shared only between requests of the same one.

The engine knows nothing of HTTP: `submit` takes token ids and two callbacks, called on the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mixtral_jax.errors import ConfigError, RequestError, SamplingError
from mixtral_jax.inference.paged_step import EngineConfig, StepInputs, engine_layout, paged_step
from mixtral_jax.inference.penalties import penalty_row
from mixtral_jax.inference.sampler import replicator, split_flat, to_host
from mixtral_jax.inference.sampling import (
    MAX_LOGIT_BIAS,
    RowParams,
    SamplingParams,
    bias_row,
    check_request,
    seed_words,
)
from mixtral_jax.inference.scheduler import Request, Scheduler, StepPlan, step_shapes
from mixtral_jax.model import lora, paged_attention
from mixtral_jax.model.kv_cache import PagedBatch, PagedKVCache
from mixtral_jax.model.mixtral import Mixtral

__all__ = ["Constraint", "Engine", "EngineConfig", "Request", "RequestError", "SamplingParams", "Stats"]


class Constraint(Protocol):
    """What the engine asks of a constrained request (e.g. `mixtral_jax.text.grammar.Grammar`): the allowed
    tokens as a (ceil(vocab / 32),) int32 bitmask (bit j of word i: token 32 i + j), and each drawn token."""

    def bitmask(self) -> np.ndarray: ...

    def advance(self, token: int) -> None: ...


@dataclasses.dataclass
class Stats:
    """Counters for /metrics (read from other threads: plain ints and a bounded deque)."""

    tokens_generated: int = 0
    requests_finished: int = 0
    prompt_tokens: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens whose pages came from the prefix cache
    preemptions: int = 0
    steps: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    recent_ttft: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=1000))


@dataclasses.dataclass
class _Orders:
    """What every process does this step: rows to empty, rows given to a request (row, params,
    constrained?), and the step to run (None: none)."""

    free: list[int]
    admit: list[tuple[int, SamplingParams, bool]] = dataclasses.field(default_factory=list)
    plan: StepPlan | None = None
    shutdown: bool = False


_HEAD = 13  # an admission's fixed fields in the broadcast
_PARAM_WORDS = _HEAD + 2 * MAX_LOGIT_BIAS


def _encode_params(row: int, p: SamplingParams, constrained: bool) -> np.ndarray:
    """row, max_tokens, top_k (0: off), the seed's two words, the bits of temperature, top_p and the three
    penalties, logprobs (-1: off), constrained?, the number of logit_bias entries; then their ids and bits."""
    buf = np.zeros(_PARAM_WORDS, np.int32)
    floats = np.array([p.temperature, p.top_p, *penalty_row(p.repetition_penalty, p.presence_penalty,
                                                             p.frequency_penalty)], np.float32)
    buf[:_HEAD] = (row, p.max_tokens, p.top_k or 0, *seed_words(p.seed).view(np.int32), *floats.view(np.int32),
                   -1 if p.logprobs is None else p.logprobs, constrained, len(p.logit_bias))
    if p.logit_bias:
        ids, values = zip(*p.logit_bias, strict=True)
        buf[_HEAD:_HEAD + len(ids)] = ids
        buf[_HEAD + MAX_LOGIT_BIAS:_HEAD + MAX_LOGIT_BIAS + len(ids)] = np.array(values, np.float32).view(np.int32)
    return buf


def _decode_params(buf: np.ndarray) -> tuple[int, SamplingParams, bool]:
    lo, hi = buf[3:5].view(np.uint32).tolist()
    temperature, top_p, repetition, presence, frequency = buf[5:10].view(np.float32).tolist()
    k = int(buf[12])
    bias = tuple(zip(buf[_HEAD:_HEAD + k].tolist(),
                     buf[_HEAD + MAX_LOGIT_BIAS:_HEAD + MAX_LOGIT_BIAS + k].view(np.float32).tolist(), strict=True))
    params = SamplingParams(max_tokens=int(buf[1]), temperature=temperature, top_k=int(buf[2]) or None, top_p=top_p,
                            repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency,
                            seed=lo | (hi << 32), logit_bias=bias, logprobs=None if buf[10] < 0 else int(buf[10]))
    return int(buf[0]), params, bool(buf[11])


DEFAULT_CONFIG = EngineConfig()


class Engine:
    """Continuous-batching generation over `model`. Drive it with `start()` (a background thread) or call
    `step()` yourself; `submit` from any thread."""

    def __init__(self, model: Mixtral, config: EngineConfig = DEFAULT_CONFIG):
        self.model, self.config = model, config
        mc = model.config
        mesh = model.runtime.mesh
        self.layout = engine_layout(config, mc, mesh)
        self.max_context = self.layout.context
        self.eos_id = mc.eos_id
        model.use_huge_pages()  # on CPU: each decode step streams the weights faster
        self._graphdef, self._treedef, self._leaves = split_flat(model)  # see split_flat: ~1 ms a step
        self._experts = model.expert_views(rows=max(config.max_batch, config.prefill_chunk))
        self._cache_dtype = jnp.dtype(config.cache_dtype or model.runtime.dtype)
        self._put = replicator(mesh)
        lay = self.layout
        empty = jax.jit(functools.partial(PagedKVCache.empty, mc, lay.total_pages, lay.page_size, self._cache_dtype,
                                          mesh))
        self.cache = empty()
        rows, vocab = lay.total_rows, mc.vocab_size
        self.counts = self._put(np.zeros((rows, vocab), np.int32))  # for the penalties
        self.bias = self._put(np.zeros((rows, vocab), np.float32))  # logit_bias per row
        self._prev = self._put(np.zeros(rows, np.int32))  # the last step's tokens
        if mesh is None:  # a step's outputs are committed to the model's device, so its first inputs are too:
            # jit keys programs by committedness, and warm-up's first shape was compiled twice otherwise
            device = next(iter(self._leaves[0].devices()))
            self.cache, self.counts, self.bias, self._prev = jax.device_put(
                (self.cache, self.counts, self.bias, self._prev), device)
        self._words = -(-vocab // 32)
        self._masks = np.full((rows, self._words), -1, np.int32)  # allowed tokens, process 0
        self._open = self._put(self._masks.copy())  # every token allowed in every row
        self._rows = None  # the rows' sampling arrays on the device, made again when a row changes
        self.row_params: list[SamplingParams | None] = [None] * rows
        self.row_constrained = [False] * rows
        self.scheduler = Scheduler(lay.shards, lay.rows, lay.pages, lay.page_size, lay.pages_per_seq, lay.budget,
                                   config.prefix_cache, narrow_tables=self._reads_every_entry())
        self.waiting: collections.deque[Request] = collections.deque()
        self.stats = Stats()
        self._lock = threading.Condition()
        self._pending = None  # (emits, tokens, logprobs) of the step dispatched last, not read back yet
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failed = False
        self.lead = jax.process_index() == 0

    def _reads_every_entry(self) -> bool:
        """Whether the paged attention reads every page-table entry's page (`xla`: narrow tables for short
        sequences pay) or only those in use (the TPU and GPU kernels: one table width, fewer shapes to
        compile)."""
        mc, lay = self.model.config, self.layout
        q = jax.ShapeDtypeStruct((lay.shards, 1, mc.n_heads, mc.head_dim), self.model.runtime.dtype)
        pages = jax.ShapeDtypeStruct((lay.total_pages, lay.page_size, 2 * mc.n_kv_heads, mc.head_dim),
                                     self._cache_dtype)
        return paged_attention.resolve("auto", q, pages, self.model.runtime.mesh) not in ("pallas_tpu", "pallas_gpu")

    # ------------------------------------------------------------------------------ public API
    @property
    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (token slots, page-table width) this engine's steps can take: one compiled program each."""
        lay = self.layout
        return step_shapes(lay.budget, lay.pages_per_seq, self.scheduler.narrow_tables)

    def warmup(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Compile every step shape now rather than when requests first need them: a compile stalls every
        running request (seconds on CPU; a minute or more for the full model on a TPU host). Each shape runs
        once as a step without tokens, which writes no page, counts nothing and draws for no row. Call it
        on every process of a multi-host engine, before `start()`. `progress(done, total)` after each.
        Returns the number of shapes."""
        if not self.idle or self._thread is not None:
            raise RuntimeError("warm up an idle engine, before start()")
        lay, shapes = self.layout, self.step_shapes
        row = self._put(np.int32(0))
        self.bias = _set_row(self.bias, row, self._put(np.asarray(self.bias[0])))  # admission's program too
        for i, (tokens, width) in enumerate(shapes):
            self._pending = self._launch(StepPlan.empty(lay.shards, lay.rows, tokens, width))
            jax.block_until_ready(self._pending[1])
            self._read_back()
            if progress is not None:
                progress(i + 1, len(shapes))
        self.stats.steps -= len(shapes)
        return len(shapes)

    def validate(self, prompt: Sequence[int], params: SamplingParams) -> list[int]:
        """Raise RequestError unless the engine can serve this prompt with these parameters (`check_request`,
        the sampler's check, in this engine's context and pages). Returns the prompt as a list of ints."""
        try:
            (prompt,), _ = check_request([prompt], params, vocab_size=self.model.config.vocab_size,
                                         context=self.max_context)
        except SamplingError as e:
            raise RequestError(str(e)) from None
        lay = self.layout
        need = -(-(len(prompt) + params.max_tokens) // lay.page_size)
        if need > lay.pages:
            raise RequestError(f"the prompt and max_tokens need {need} pages of {lay.page_size} tokens; a sequence "
                               f"shard of this engine has {lay.pages} (raise num_pages or lower max_tokens)")
        return prompt

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the LoRA adapters a request may pick (the model's stacked adapters)."""
        stack = lora.lora_stack(self.model)
        return () if stack is None else stack.names

    def adapter_index(self, adapter: str | None) -> int:
        """0 for the base (None), i + 1 for the i-th adapter; RequestError for one not loaded."""
        try:
            return (lora.lora_stack(self.model) or lora.LoRAStack((), ())).index(adapter)
        except ConfigError as e:
            raise RequestError(str(e)) from None

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_token: Callable[[int], None] = lambda t: None,
               on_finish: Callable[[str], None] = lambda r: None, constraint: Constraint | None = None,
               adapter: str | None = None) -> Request:
        """Queue a request; `constraint` restricts each drawn token to what it allows (see `Constraint`);
        `adapter`: the name of the stacked LoRA adapter to answer with (None: the base model)."""
        request = Request(self.validate(prompt, params), params, on_token, on_finish, constraint,
                          self.adapter_index(adapter))
        with self._lock:
            if self._stopping:
                raise RequestError("the engine has failed" if self.failed else "the server is shutting down")
            self.waiting.append(request)
            self._lock.notify()
        return request

    @property
    def busy_slots(self) -> int:
        """Rows holding a request (prefilling or decoding)."""
        return len(self.scheduler.seqs)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.scheduler.seqs and self._pending is None

    @property
    def length(self) -> int:
        """KV tokens the held pages span."""
        return self.scheduler.pages_held * self.layout.page_size

    @property
    def size(self) -> int:
        """KV tokens all pages hold."""
        return self.layout.tokens

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
                pending = list(self.waiting) + [s.request for s in self.scheduler.seqs.values()]
                pending += [r for _, r in self._pending[0]] if self._pending is not None else []
                self.waiting.clear()
            for r in pending:
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
            for r in list(self.waiting) + [s.request for s in self.scheduler.seqs.values()]:
                r.cancel()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def step(self) -> bool:
        """One round: process 0 plans (frees, admits, the step's tokens), every process runs the step, then
        the previous step's tokens are read back. Returns False once the engine has shut down."""
        if self._pending is not None and any(self.row_constrained):
            self._read_back()  # a constrained row's next mask needs the token it just drew
        orders = self._decide() if self.lead else None
        if jax.process_count() > 1:
            orders = self._broadcast(orders)
        if orders.shutdown:
            self._read_back()
            return False
        self._apply(orders)
        launched = self._launch(orders.plan) if orders.plan is not None else None
        self._read_back()
        self._pending = launched
        return True

    # ------------------------------------------------------------------------------ deciding
    def _decide(self) -> _Orders:
        sched = self.scheduler
        with self._lock:
            while True:
                for r in [r for r in self.waiting if r.cancelled and not r.in_flight]:
                    self.waiting.remove(r)
                    self._finish(r, "cancelled")
                before = {row: q.request for row, q in sched.seqs.items()}
                plan, admitted = sched.plan(self.waiting)
                for r in set(before.values()) - {q.request for q in sched.seqs.values()}:
                    if r.cancelled:
                        self._finish(r, "cancelled")
                free = [row for row, r in before.items() if row not in sched.seqs or sched.seqs[row].request is not r]
                self.stats.prefix_hit_tokens, self.stats.preemptions = sched.prefix_hit_tokens, sched.preemptions
                admit = [(row, r.params, r.constraint is not None) for row, r in admitted]
                for row, r in admitted:
                    self._masks[row] = -1 if r.constraint is None else r.constraint.bitmask()
                if plan is not None or free or admit:
                    return _Orders(free, admit, plan)
                if self._pending is not None:
                    return _Orders([])  # nothing new to run: read the last step back
                if self._stopping:
                    return _Orders([], shutdown=True)
                if not self._lock.wait(timeout=0.5) and jax.process_count() > 1:
                    return _Orders([])  # idle: an empty step keeps the other processes' collectives from timing out

    def _broadcast(self, orders: _Orders | None) -> _Orders:
        """Process 0's orders on every process, as one fixed-size int32 array: a header (shutdown, rows to
        free, admissions, the step's token slots T (0: no step) and page-table width), the rows to free, each admission
        (`_encode_params`), then the step's arrays (`StepPlan.ARRAYS`, T slots per shard). (The stop tokens
        stay on process 0, which decides when a row frees; a constraint's masks are broadcast by the steps
        that use them.)"""
        lay = self.layout
        rows, h = lay.total_rows, 5
        shapes = _plan_shapes(lay, lay.budget, lay.pages_per_seq)
        size = h + rows + rows * _PARAM_WORDS + sum(int(np.prod(s)) for s in shapes.values())
        buf = np.zeros(size, np.int32)
        if orders is not None:
            plan = orders.plan
            t, width = (0, 0) if plan is None else (plan.tokens.shape[1], plan.page_indices.shape[2])
            buf[:h] = (orders.shutdown, len(orders.free), len(orders.admit), t, width)
            buf[h:h + len(orders.free)] = orders.free
            at = h + rows
            for i, (row, p, constrained) in enumerate(orders.admit):
                buf[at + i * _PARAM_WORDS:at + (i + 1) * _PARAM_WORDS] = _encode_params(row, p, constrained)
            if plan is not None:
                flat = np.concatenate([getattr(plan, n).astype(np.int32).ravel() for n in StepPlan.ARRAYS])
                buf[at + rows * _PARAM_WORDS:at + rows * _PARAM_WORDS + flat.size] = flat
        buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
        if orders is not None:
            return orders
        shutdown, n_free, n_admit, t, width = buf[:h].tolist()
        at = h + rows
        admit = [_decode_params(buf[at + i * _PARAM_WORDS:at + (i + 1) * _PARAM_WORDS]) for i in range(n_admit)]
        plan = None
        if t:
            arrays, pos = {}, at + rows * _PARAM_WORDS
            for name, shape in _plan_shapes(lay, t, width).items():
                n = int(np.prod(shape))
                arrays[name] = buf[pos:pos + n].reshape(shape)
                pos += n
            arrays["from_prev"], arrays["reset"] = arrays["from_prev"].astype(bool), arrays["reset"].astype(bool)
            plan = StepPlan(**arrays)
        return _Orders(buf[h:h + n_free].tolist(), admit, plan, bool(shutdown))

    def _apply(self, orders: _Orders) -> None:
        """Rows' sampling parameters and logit_bias rows as the orders say (on every process)."""
        for row in orders.free:
            self.row_params[row], self.row_constrained[row] = None, False
            self._rows = None
        vocab = self.model.config.vocab_size
        for row, params, constrained in orders.admit:
            self.row_params[row], self.row_constrained[row] = params, constrained
            self.bias = _set_row(self.bias, self._put(np.int32(row)), self._put(bias_row(params, vocab)))
            self._rows = None

    # ------------------------------------------------------------------------------ device steps
    def _launch(self, plan: StepPlan):
        params = [p or SamplingParams() for p in self.row_params]
        if self._rows is None:
            table = np.stack([penalty_row(p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
                              for p in params], axis=1)
            self._rows = (jax.tree.map(self._put, RowParams.of(params)), self._put(table),
                          self._put(np.stack([seed_words(p.seed) for p in params])),
                          self._put(np.array([p.logprobs is not None for p in params])))
        strategy, penalties, seeds, wanted = self._rows
        mask = self._share(self._masks) if any(self.row_constrained) else self._open
        put = self._put
        batch = PagedBatch(put(plan.positions), put(plan.slot_mapping), put(plan.kv_lens), put(plan.page_indices),
                           put(plan.cu_q_lens), put(plan.num_seqs))
        inputs = StepInputs(put(plan.tokens), put(plan.from_prev), put(plan.rows), put(plan.sample_at),
                            put(plan.sample_rows), put(plan.reset), put(plan.index), batch, put(plan.adapter))
        out, logprobs, self.cache, self.counts = paged_step(
            self._graphdef, self._treedef, self._leaves, self._experts, self.cache, self.counts, self.bias,
            self._prev, inputs, mask, strategy, penalties, seeds, wanted)
        self._prev = out
        self.stats.steps += 1
        return plan.emits, out, logprobs

    def _read_back(self) -> None:
        """The tokens of the step dispatched last, passed on (process 0)."""
        if self._pending is None:
            return
        emits, out, logprobs = self._pending
        self._pending = None
        if not self.lead or not emits:
            return
        tokens = to_host(out)
        lp = None
        if any(r.params.logprobs is not None for _, r in emits):
            lp = tuple(to_host(a) for a in (logprobs.chosen, logprobs.top_ids, logprobs.top_values))
        for row, r in emits:
            self._emit(row, r, int(tokens[row]), lp)

    def _share(self, mask: np.ndarray):
        """Process 0's constraint masks on the device of every process."""
        if jax.process_count() > 1:
            mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
        return self._put(mask)

    # ------------------------------------------------------------------------------ host bookkeeping
    def _emit(self, row: int, r: Request, token: int, lp=None) -> None:
        """Request r's new token (drawn in row `row`): pass it on (with its logprobs, and to its constraint,
        which then gives the row's next mask) or finish the request."""
        if r.finish_reason is not None:
            return  # a token drawn ahead of the host's reading, after the request ended
        r.history.append(token)
        stops = (self.eos_id,) if r.params.stop_tokens is None else r.params.stop_tokens
        if r.first_token_at is None:
            self.stats.prompt_tokens += len(r.prompt)
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
            if lp is not None and r.params.logprobs is not None:
                k = r.params.logprobs
                r.logprobs.append((float(lp[0][row]), list(zip(lp[1][row, :k].tolist(), lp[2][row, :k].tolist(),
                                                               strict=True))))
            if r.constraint is not None:
                r.constraint.advance(token)
                seq = self.scheduler.seqs.get(row)
                if seq is not None and seq.request is r:
                    self._masks[row] = r.constraint.bitmask()
            r._on_token(token)
            reason = "length" if r.n_generated >= r.params.max_tokens else None
        if reason is not None:
            self._finish(r, reason)

    def _finish(self, request: Request, reason: str) -> None:
        if request.finish_reason is None:
            request.finish_reason = reason
            self.stats.requests_finished += 1
            request._on_finish(reason)


def _plan_shapes(layout, tokens: int, width: int) -> dict[str, tuple[int, ...]]:
    """Each `StepPlan` array's shape for a step of `tokens` slots per shard and page tables `width` wide."""
    s, b, t, r = layout.shards, layout.rows, tokens, layout.total_rows
    return {"tokens": (s, t), "from_prev": (s, t), "rows": (s, t), "positions": (s, t), "slot_mapping": (s, t),
            "kv_lens": (s, b), "page_indices": (s, b, width), "cu_q_lens": (s, b + 1),
            "num_seqs": (s,), "sample_at": (s, min(b, t)), "sample_rows": (s, min(b, t)), "reset": (r,),
            "index": (r,), "adapter": (r,)}


@jax.jit
def _set_row(table, row, values):
    """`table` with row `row` set to `values`. Not donated: the step in flight still reads `table`, and
    donating it would block the host until that step ends (measured: the 10 first tokens of a prefill
    step came ~45 ms late when an admission for the next step waited on it); the copy is (rows, vocab)."""
    return jax.lax.dynamic_update_slice(table, values[None].astype(table.dtype), (row, jnp.int32(0)))

