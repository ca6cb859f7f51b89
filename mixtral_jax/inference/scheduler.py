"""What the serving engine runs each step: the scheduler of the paged engine (process 0 only; the other
processes run the arrays it makes).

A step is one jitted call over S sequence shards x T token slots (`mixtral_jax.model.kv_cache.PagedBatch`):
every running decode (one token each) and prefill chunks of one or several requests, under a budget of
`budget` tokens per shard. A request is admitted into a free row of the shard that already holds the
longest cached prefix of its tokens (`pages.PagePool`), when that shard has pages for its whole prompt;
its prefill then starts after the cached pages. When a sequence needs a page and none is left, the
youngest sequence of its shard is preempted: its pages are let go and it waits at the front of the queue,
to be prefilled again (its prompt and the tokens it has generated) once pages free up. Nothing is dropped
and nothing runs out of memory: the pages are all there is.

Rows: shard s owns rows s * rows .. (s + 1) * rows - 1 of the engine's sampling arrays; a row is a slot
for one sequence at a time.

Tokens the device has sampled but the host has not read back yet (the engine dispatches step k + 1 before
reading step k) are fed from the previous step's output (`from_prev`), so a decode never waits for the
host.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from mixtral_jax.inference.pages import PagePool, page_keys
from mixtral_jax.inference.sampling import SamplingParams


class Request:
    """A submitted request. `on_token(id)` per new token, then `on_finish(reason)` once: "stop" (a stop
    token), "length" (max_tokens), "cancelled", or "abort" (the engine failed). Both run on the engine
    thread: keep them quick. With `params.logprobs` set, `logprobs[i]` holds token i's (log probability,
    [(id, log probability) of the top `params.logprobs`]) before `on_token` sees it."""

    def __init__(self, prompt: list[int], params: SamplingParams, on_token: Callable[[int], None],
                 on_finish: Callable[[str], None], constraint=None, adapter: int = 0):
        self.prompt, self.params, self.constraint = prompt, params, constraint
        self.adapter = adapter  # 0: the base model; i: the model's i-th stacked LoRA adapter
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self._on_token, self._on_finish = on_token, on_finish
        self.cancelled = False
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.n_generated = 0
        self.history: list[int] = list(prompt)  # the prompt and every token read back (what a re-prefill feeds)
        self.n_sampled = 0  # tokens the device has been asked to draw (ahead of `history` by those in flight)
        self.preemptions = 0
        self._keys: tuple[int, int, list[bytes]] = (-1, 0, [])  # (history length, page size, prefix keys)

    @property
    def key_root(self) -> bytes:
        """The parent of its first page's key: pages computed under different adapters hold different K/V
        for the same tokens, so each adapter's pages are a prefix cache of their own (the base's: b"")."""
        return b"" if not self.adapter else b"lora adapter %d" % self.adapter

    def prefix_keys(self, page_size: int) -> list[bytes]:
        """The keys of the full pages before the history's last token (what a prefill may take from the
        prefix cache), kept until the history grows."""
        if self._keys[:2] != (len(self.history), page_size):
            self._keys = (len(self.history), page_size, page_keys(self.history[:-1], page_size, self.key_root))
        return self._keys[2]

    def cancel(self) -> None:
        """Stop generating (a client went away, or a stop string matched); its row frees at the next step."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled or self.n_sampled >= self.params.max_tokens

    @property
    def in_flight(self) -> bool:
        return len(self.history) < len(self.prompt) + self.n_sampled


def _penalized(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


@dataclasses.dataclass
class Sequence:
    """A request in a row: its pages (a page table, local to its shard) and how far its K/V is written."""

    request: Request
    row: int
    shard: int
    age: int                  # admission order: the youngest is preempted first
    total: int                # tokens it has (prompt + drawn, in flight included)
    computed: int             # tokens whose keys and values are written (or in a dispatched step)
    pages: list[int]
    keys: list[bytes]         # prefix keys of its full pages known so far
    registered: int           # pages given to the prefix cache

    @property
    def prefilling(self) -> bool:
        return self.computed < self.total - 1


@dataclasses.dataclass
class StepPlan:
    """One step's inputs (numpy, shaped by shard) and what the host does with its output.

    tokens, from_prev, rows, positions, slot_mapping: (S, T); kv_lens (S, B); page_indices (S, B, pages per
    sequence); cu_q_lens (S, B + 1); num_seqs (S,); sample_at, sample_rows (S, R), R = min(B, T): the
    token slot each draw takes its logits from and the row it draws for (-1: none; a step's T slots hold
    at most T draws, so a lone decode computes the LM head for R = 4 rows, not B); reset, index, adapter:
    (S * B,) (rows whose penalty counts start again; the token number each row draws, for its key; each
    row's LoRA adapter, 0 for none). `emits`: (row, request) whose drawn token this step's output holds."""

    tokens: np.ndarray
    from_prev: np.ndarray
    rows: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    kv_lens: np.ndarray
    page_indices: np.ndarray
    cu_q_lens: np.ndarray
    num_seqs: np.ndarray
    sample_at: np.ndarray
    sample_rows: np.ndarray
    reset: np.ndarray
    index: np.ndarray
    adapter: np.ndarray
    emits: list[tuple[int, Request]] = dataclasses.field(default_factory=list)

    ARRAYS = ("tokens", "from_prev", "rows", "positions", "slot_mapping", "kv_lens", "page_indices", "cu_q_lens",
              "num_seqs", "sample_at", "sample_rows", "reset", "index", "adapter")

    @classmethod
    def empty(cls, shards: int, rows: int, tokens: int, pages_per_seq: int) -> StepPlan:
        st, sb, sr = (shards, tokens), (shards, rows), (shards, min(rows, tokens))
        return cls(np.zeros(st, np.int32), np.zeros(st, bool), np.full(st, -1, np.int32), np.zeros(st, np.int32),
                   np.full(st, -1, np.int32), np.zeros(sb, np.int32), np.zeros((*sb, pages_per_seq), np.int32),
                   np.zeros((shards, rows + 1), np.int32), np.zeros(shards, np.int32), np.zeros(sr, np.int32),
                   np.full(sr, -1, np.int32), np.zeros(shards * rows, bool), np.zeros(shards * rows, np.int32),
                   np.zeros(shards * rows, np.int32))


def step_tokens(n: int, budget: int) -> int:
    """Token slots per shard for a step whose busiest shard has n tokens: a power of two (a handful of
    compiled shapes), at least 4, at most the budget."""
    return min(budget, max(4, 1 << max(0, n - 1).bit_length()))


def table_width(n: int, pages_per_seq: int) -> int:
    """Page-table entries per sequence for a step whose longest sequence has n pages: a power of two (the
    attention reads every entry's page, so a step of short sequences gets a narrow table), at most
    `pages_per_seq`."""
    return min(pages_per_seq, max(4, 1 << max(0, n - 1).bit_length()))


def step_shapes(budget: int, pages_per_seq: int, narrow_tables: bool = True) -> list[tuple[int, int]]:
    """Every (token slots, page-table width) a step can have (`step_tokens`, `table_width`): what
    `Engine.warmup` compiles."""
    tokens = sorted({step_tokens(n, budget) for n in range(1, budget + 1)})
    widths = sorted({table_width(n, pages_per_seq) for n in range(1, pages_per_seq + 1)}) if narrow_tables \
        else [pages_per_seq]
    return [(t, w) for t in tokens for w in widths]


class Scheduler:
    """Rows, pages and the queue's next step (see the module docstring). `plan(waiting)` takes what it
    admits from `waiting` and puts preempted requests back at its front; `release(row)` ends a row's
    sequence (finished or cancelled)."""

    def __init__(self, shards: int, rows: int, pages: int, page_size: int, pages_per_seq: int, budget: int,
                 prefix_cache: bool = True, narrow_tables: bool = True):
        if budget < rows:
            raise ValueError(f"a step's {budget} tokens per shard cannot hold the shard's {rows} decodes")
        self.shards, self.rows, self.page_size, self.pages_per_seq, self.budget = (shards, rows, page_size,
                                                                                   pages_per_seq, budget)
        self.pools = [PagePool(pages) for _ in range(shards)]
        self.seqs: dict[int, Sequence] = {}
        self.prefix_cache = prefix_cache
        # False: every table is pages_per_seq wide (where the attention reads only the pages in use, as
        # the TPU kernel does, narrow tables only add shapes to compile)
        self.narrow_tables = narrow_tables
        self._age = 0
        self.prefix_hit_tokens = 0
        self.preemptions = 0

    def table_width(self, n: int) -> int:
        """A step's page-table width when its longest sequence has n pages (`table_width`, or always
        pages_per_seq without narrow tables)."""
        return table_width(n, self.pages_per_seq) if self.narrow_tables else self.pages_per_seq

    # ---- rows
    def free_rows(self, shard: int) -> list[int]:
        return [r for r in range(shard * self.rows, (shard + 1) * self.rows) if r not in self.seqs]

    def release(self, row: int) -> Request:
        seq = self.seqs.pop(row)
        pool = self.pools[seq.shard]
        for page in seq.pages:
            pool.release(page)
        return seq.request

    def _preempt(self, seq: Sequence, waiting: collections.deque) -> None:
        self.release(seq.row)
        seq.request.preemptions += 1
        self.preemptions += 1
        waiting.appendleft(seq.request)

    # ---- the step
    def plan(self, waiting: collections.deque) -> tuple[StepPlan | None, list[tuple[int, Request]]]:
        """(this step's plan or None when nothing runs, the (row, request) admitted into rows this step).
        Rows whose request is done (finished, cancelled, or all its tokens drawn) are let go first."""
        for row in [r for r, s in self.seqs.items() if s.request.done]:
            self.release(row)
        wants: dict[int, int] = {}  # row -> tokens this step
        for s in range(self.shards):
            seqs = sorted((q for q in self.seqs.values() if q.shard == s), key=lambda q: q.age)
            left = self.budget - sum(not q.prefilling for q in seqs)
            for q in seqs:
                n = 1 if not q.prefilling else min(left, q.total - q.computed)
                left -= n if q.prefilling else 0
                wants[q.row] = n
            for q in seqs:  # oldest first: a victim is always younger, so not given its tokens yet
                if q.row in self.seqs and wants[q.row] and not self._grow(q, wants[q.row], waiting):
                    wants[q.row] = 0
        admitted = self._admit(waiting, wants)
        if not any(wants.values()):
            return None, admitted
        return self._arrays(wants, {row for row, _ in admitted}), admitted

    def _grow(self, q: Sequence, n: int, waiting) -> bool:
        """Pages for q's next n tokens, preempting the shard's youngest sequences (q itself last) until they
        fit. False when q itself was preempted."""
        pool = self.pools[q.shard]
        need = -(-(q.computed + n) // self.page_size) - len(q.pages)
        while pool.available < need:
            victim = max((v for v in self.seqs.values() if v.shard == q.shard), key=lambda v: v.age)
            self._preempt(victim, waiting)
            if victim is q:
                return False
        q.pages += [pool.allocate() for _ in range(need)]
        return True

    def _admit(self, waiting: collections.deque, wants: dict[int, int]) -> list[tuple[int, Request]]:
        """Requests from the front of the queue into free rows while their shard has token budget and pages
        for the whole prompt. One that would recompute a prefix another sequence is prefilling right now
        waits a step for it (then shares its pages), letting the ones behind it go first."""
        admitted, skipped = [], []
        pending = [self._pending_keys(s) for s in range(self.shards)]
        while waiting:
            r = waiting.popleft()
            if r.done and not r.in_flight:
                continue  # finished or cancelled while waiting: the engine reports it
            if r.in_flight:  # a preempted request's last token is still on its way back
                skipped.append(r)
                continue
            history = r.history
            keys = r.prefix_keys(self.page_size) if self.prefix_cache else []
            use_hits = self.prefix_cache and not _penalized(r.params)  # penalties count every token fed
            best = None
            for s in range(self.shards):  # the shard with most of its prefix, then budget left, then pages
                if not self.free_rows(s):
                    continue
                left = self.budget - sum(wants.get(row, 0) for row in range(s * self.rows, (s + 1) * self.rows))
                hits = self.pools[s].match(keys) if use_hits else 0
                coming = use_hits and hits < len(keys) and keys[hits] in pending[s]
                score = (hits + coming, left > 0, self.pools[s].available)
                if best is None or score > best[0]:
                    best = (score, s, hits, left, coming)
            if best is None or (best[0][0] == 0 and best[3] <= 0):
                waiting.appendleft(r)
                break
            _, s, hits, left, coming = best
            if coming or left <= 0:
                skipped.append(r)  # its prefix is being written (or its shard is full this step): wait
                continue
            pool = self.pools[s]
            pages = pool.take(keys[:hits]) if hits else []
            need = -(-(len(history) + 1) // self.page_size) - len(pages)
            if pool.available < need:
                for page in pages:
                    pool.release(page)
                waiting.appendleft(r)
                break
            row = self.free_rows(s)[0]
            start = len(pages) * self.page_size
            q = Sequence(r, row, s, self._age, len(history), start, pages, keys[:hits], hits)
            self._age += 1
            self.prefix_hit_tokens += start
            self.seqs[row] = q
            n = min(left, q.total - q.computed)
            q.pages += [pool.allocate() for _ in range(-(-(q.computed + n) // self.page_size) - len(q.pages))]
            wants[row] = n
            pending[s] |= set(keys[hits:])  # its prefix pages are being written now
            admitted.append((row, r))
        waiting.extendleft(reversed(skipped))
        return admitted

    def _pending_keys(self, shard: int) -> set[bytes]:
        """Keys of the prompt pages the shard's prefilling sequences will write."""
        keys = set()
        for q in self.seqs.values():
            if q.shard == shard and q.prefilling:  # (its history is what it was admitted with)
                keys |= set(q.request.prefix_keys(self.page_size)[q.registered:])
        return keys

    def _arrays(self, wants: dict[int, int], reset: set[int]) -> StepPlan:
        busiest = max(sum(wants.get(r, 0) for r in range(s * self.rows, (s + 1) * self.rows))
                      for s in range(self.shards))
        widest = max(len(self.seqs[r].pages) for r, n in wants.items() if n and r in self.seqs)
        p = StepPlan.empty(self.shards, self.rows, step_tokens(busiest, self.budget),
                           self.table_width(widest))
        ps = self.page_size
        for s in range(self.shards):
            t = i = drawn = 0
            for row in range(s * self.rows, (s + 1) * self.rows):
                q, n = self.seqs.get(row), wants.get(row, 0)
                if q is None or not n:
                    continue
                r = q.request
                p.adapter[row] = r.adapter
                for j in range(q.computed, q.computed + n):
                    if j < len(r.history):
                        p.tokens[s, t] = r.history[j]
                    else:  # the token drawn last step, not read back yet
                        assert j == q.total - 1, (j, q.total)
                        p.from_prev[s, t] = True
                    p.rows[s, t], p.positions[s, t] = row, j
                    p.slot_mapping[s, t] = q.pages[j // ps] * ps + j % ps
                    t += 1
                q.computed += n
                p.kv_lens[s, i] = q.computed
                p.page_indices[s, i, :len(q.pages)] = q.pages
                p.cu_q_lens[s, i + 1] = t
                i += 1
                if q.computed == q.total:  # its last token is in: draw the next one
                    p.sample_at[s, drawn], p.sample_rows[s, drawn] = t - 1, row
                    drawn += 1
                    p.index[row] = r.n_sampled
                    p.emits.append((row, r))
                    r.n_sampled += 1
                    q.total += 1
                self._register(q)
            p.num_seqs[s] = i
            p.cu_q_lens[s, i + 1:] = t
        for row in reset:
            p.reset[row] = True
        return p

    def _register(self, q: Sequence) -> None:
        """Share q's pages that are now full and whose tokens the host knows."""
        if not self.prefix_cache:
            return
        known = min(q.computed, len(q.request.history)) // self.page_size
        if known > len(q.keys):
            start = len(q.keys) * self.page_size
            q.keys += page_keys(q.request.history[start:known * self.page_size], self.page_size,
                                q.keys[-1] if q.keys else q.request.key_root)
        pool = self.pools[q.shard]
        for i in range(q.registered, known):
            pool.register(q.pages[i], q.keys[i])
        q.registered = max(q.registered, known)

    # ---- figures
    @property
    def pages_held(self) -> int:
        return sum(p.held for p in self.pools)
