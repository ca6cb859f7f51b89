"""The paged engine's one jitted step, its layout, and its inputs as abstract shapes (so a planner can lower
it ahead of time for a TPU slice without allocating anything: `lower_step`).

The step: S sequence shards x T token slots of prefill chunks and decode tokens (`PagedBatch`) through the
model over a `PagedKVCache`, each row's penalty counts updated with the tokens it was fed, and one token
drawn per row (the host keeps those of the rows that finished their step's tokens). Decode tokens the host
has not read back come from the previous step's output on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mixtral_jax.config import KV_CACHE_DTYPES, MixtralConfig
from mixtral_jax.errors import RequestError
from mixtral_jax.inference.penalties import penalize_rows
from mixtral_jax.inference.sampler import HashedOnce, flat_state, merge_flat
from mixtral_jax.inference.sampling import Greedy, RowParams, apply_bitmask, logprob_outputs, row_keys, sample
from mixtral_jax.model import lora
from mixtral_jax.model.kv_cache import PagedBatch, PagedKVCache
from mixtral_jax.sharding.rules import mesh_axes


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """`max_batch`: sequences running at once (rows); `max_context`: prompt + new tokens of one request
    (default: the model's, at most 4096); `prefill_chunk`: a step's tokens per sequence shard (every running
    decode, then prefill chunks; a power of two); `cache_dtype`: the pages' (default: the compute dtype;
    "int8" halves bf16's bytes); `page_size`: tokens per page; `num_pages`: pages in all (split over the
    sequence shards; default: room for `max_batch` sequences of `max_context`, so nothing is ever
    preempted; fewer pages hold more rows of typical lengths, and preempt when full); `prefix_cache`:
    share full pages between sequences whose tokens start alike."""

    max_batch: int = 16
    max_context: int | None = None
    prefill_chunk: int = 256
    cache_dtype: str | None = None
    page_size: int = 16
    num_pages: int | None = None
    prefix_cache: bool = True

    def __post_init__(self):
        if self.max_batch < 1:
            raise RequestError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_context is not None and self.max_context < 2:
            raise RequestError(f"max_context must be >= 2, got {self.max_context}")
        if self.prefill_chunk < 16 or self.prefill_chunk & (self.prefill_chunk - 1):
            raise RequestError(f"prefill_chunk must be a power of two >= 16, got {self.prefill_chunk}")
        if self.cache_dtype is not None and self.cache_dtype not in KV_CACHE_DTYPES:
            raise RequestError(f"unknown cache_dtype {self.cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
        if self.page_size < 1:
            raise RequestError(f"page_size must be >= 1, got {self.page_size}")
        if self.num_pages is not None and self.num_pages < 1:
            raise RequestError(f"num_pages must be >= 1, got {self.num_pages}")

    def context(self, model: MixtralConfig) -> int:
        context = self.max_context or min(model.max_seq_len, 4096)
        if context > model.max_seq_len:
            raise RequestError(f"max_context {context} exceeds the model's {model.max_seq_len}")
        return context


@dataclasses.dataclass(frozen=True)
class EngineLayout:
    """The engine's shapes on a mesh: `shards` sequence shards (the rules' `batch` axes, data x expert), each
    with `rows` rows and `pages` pages of `page_size` tokens; a sequence's page table has `pages_per_seq`
    entries; a step has at most `budget` tokens per shard."""

    shards: int
    rows: int
    page_size: int
    pages: int
    pages_per_seq: int
    budget: int
    context: int

    @property
    def total_rows(self) -> int:
        return self.shards * self.rows

    @property
    def total_pages(self) -> int:
        return self.shards * self.pages

    @property
    def tokens(self) -> int:
        """KV tokens the pages hold in all."""
        return self.total_pages * self.page_size

    def sequences(self, context: int | None = None) -> int:
        """Sequences of `context` tokens (default: the engine's max_context) the pages hold at once."""
        return self.shards * (self.pages // -(-(context or self.context) // self.page_size))


def sequence_shards(mesh) -> int:
    """S: the product of the mesh axes sequences split over (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in mesh_axes("batch", mesh))


def engine_layout(config: EngineConfig, model: MixtralConfig, mesh=None) -> EngineLayout:
    shards = sequence_shards(mesh)
    context = config.context(model)
    rows = -(-config.max_batch // shards)
    pages_per_seq = -(-context // config.page_size)
    pages = -(-config.num_pages // shards) if config.num_pages else rows * pages_per_seq
    return EngineLayout(shards, rows, config.page_size, pages, pages_per_seq, max(config.prefill_chunk, rows),
                        context)


class StepInputs(NamedTuple):
    """One step's arrays (see `scheduler.StepPlan`), on the device."""

    tokens: jax.Array       # (S, T) int32
    from_prev: jax.Array    # (S, T) bool: take the token the previous step drew for its row
    rows: jax.Array         # (S, T) int32 row of each token slot, -1 for padding
    sample_at: jax.Array    # (S, R) the token slot whose logits each draw takes (R = min(B, T))
    sample_rows: jax.Array  # (S, R) int32 the row each draw is for, -1 for none
    reset: jax.Array        # (S * B,) bool: the row's penalty counts start again
    index: jax.Array        # (S * B,) int32: the token number each row draws (its key)
    batch: PagedBatch
    adapter: jax.Array      # (S * B,) int32: each row's stacked LoRA adapter (0: the base)


@functools.partial(jax.jit, static_argnames=("graphdef", "treedef"), donate_argnames=("cache", "counts"))
def paged_step(graphdef, treedef, leaves, experts, cache: PagedKVCache, counts, bias, prev, inputs: StepInputs,
               mask, strategy, penalties, seeds, wanted):
    """Returns (a token per row (S * B,): drawn this step, else the previous step's; `Logprobs` per row,
    zeros where none was drawn; cache, counts). counts, bias (S * B, vocab): penalty
    counts and logit_bias rows; prev (S * B,): the previous step's tokens; mask (S * B, words): allowed tokens;
    strategy, penalties, seeds, wanted: the rows' sampling (`RowParams` or `Greedy`, (3, rows) penalties,
    (rows, 2) seed words, logprobs wanted (rows,))."""
    model = merge_flat(graphdef, treedef, leaves)
    rows = jnp.maximum(inputs.rows, 0)
    tokens = jnp.where(inputs.from_prev, prev[rows], inputs.tokens)                   # (S, T)
    counts = jnp.where(inputs.reset[:, None], 0, counts)
    counts = counts.at[rows.reshape(-1), tokens.reshape(-1)].add((inputs.rows >= 0).reshape(-1).astype(jnp.int32))
    adapters = inputs.adapter[rows] if lora.lora_stack(model) is not None else None  # (S, T): each token's
    logits, cache = model.extend_paged(cache, tokens, inputs.batch, inputs.sample_at, expert_weights=experts,
                                       adapter_ids=adapters)
    logits = logits.reshape(-1, logits.shape[-1])                                     # (S * R, vocab)
    slots = inputs.sample_rows.reshape(-1)
    at = jnp.maximum(slots, 0)                                                        # each draw's row
    logits = penalize_rows(logits, counts[at], penalties[:, at]) + bias[at]
    index = inputs.index[at]
    chosen = sample(apply_bitmask(logits, mask[at]), jax.tree.map(lambda x: x[at], strategy),
                    row_keys(seeds[at], jnp.zeros_like(index), index))
    drawn = logprob_outputs(logits, chosen, wanted[at] & (slots >= 0))
    to_row = jnp.where(slots >= 0, slots, prev.shape[0])                              # none: dropped
    chosen = prev.at[to_row].set(chosen, mode="drop")                                 # (S * B,)
    logprobs = jax.tree.map(lambda x: jnp.zeros((prev.shape[0], *x.shape[1:]), x.dtype).at[to_row].set(
        x, mode="drop"), drawn)
    if model.runtime.mesh is not None:  # every process reads the tokens where it is (no gather)
        chosen, logprobs, counts = jax.lax.with_sharding_constraint(
            (chosen, logprobs, counts), NamedSharding(model.runtime.mesh, PartitionSpec()))
    return chosen, logprobs, cache, counts


# ------------------------------------------------------------------------------ ahead of time
def abstract_step_args(config: MixtralConfig, engine: EngineConfig, mesh, tokens: int | None = None,
                       cache_dtype=None, greedy: bool = False):
    """`paged_step`'s arguments after `leaves` as `ShapeDtypeStruct`s laid out as the engine lays them out
    on `mesh` (pages by the rules, everything else replicated): (experts, cache, counts, bias, prev, inputs,
    mask, strategy, penalties, seeds, wanted). `tokens`: T (default: the budget, the largest step)."""
    layout = engine_layout(engine, config, mesh)
    s, b, r = layout.shards, layout.rows, layout.total_rows
    t = tokens or layout.budget
    draws = min(b, t)

    def rep(shape, dtype):
        sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    i32 = jnp.int32
    batch = PagedBatch(rep((s, t), i32), rep((s, t), i32), rep((s, b), i32), rep((s, b, layout.pages_per_seq), i32),
                       rep((s, b + 1), i32), rep((s,), i32))
    inputs = StepInputs(rep((s, t), i32), rep((s, t), jnp.bool_), rep((s, t), i32), rep((s, draws), i32),
                        rep((s, draws), i32), rep((r,), jnp.bool_), rep((r,), i32), batch, rep((r,), i32))
    cache = PagedKVCache.shapes(config, layout.total_pages, layout.page_size,
                                cache_dtype or engine.cache_dtype or jnp.bfloat16, mesh)
    strategy = Greedy() if greedy else RowParams(rep((r,), jnp.float32), rep((r,), i32), rep((r,), jnp.float32))
    v = config.vocab_size
    return (None, cache, rep((r, v), i32), rep((r, v), jnp.float32), rep((r,), i32), inputs,
            rep((r, -(-v // 32)), i32), strategy, rep((3, r), jnp.float32), rep((r, 2), jnp.uint32),
            rep((r,), jnp.bool_))


def lower_step(graphdef, state, config: MixtralConfig, engine: EngineConfig, mesh, *, tokens: int | None = None,
               cache_dtype=None, greedy: bool = False):
    """`paged_step` lowered for a model given as (graphdef, state) of `ShapeDtypeStruct`s (e.g.
    `planning.planner.abstract_model`): compile it (`.compile()`) to see the step's memory on a slice."""
    treedef, leaves = flat_state(state)
    return paged_step.lower(HashedOnce.of(graphdef), treedef, leaves,
                            *abstract_step_args(config, engine, mesh, tokens, cache_dtype, greedy))
