"""The one sampling core of the batched `Sampler` and the serving `Engine`, and the one check of a request.

Sampling parameters are per row, as arrays (`RowParams`), so one compiled step serves any mix of
requests and changing a temperature never recompiles; `Greedy()` says, when tracing, that every row takes
the argmax, so nothing else is compiled. `sample(logits, params, keys)` draws one token per row:

- temperature 0: the argmax (the first of equal maxima), whatever the other rows do;
- else a draw at that temperature from the `top_k` likeliest tokens (the k-th value's ties kept, as
  `lax.top_k` and transformers' warper), then from the smallest set holding `top_p` of their mass.

The filters run only when some row needs them (`lax.cond`), and find their thresholds by bisection on
the float bits instead of sorting: XLA:CPU sorts a 32000-token row in ~12 ms, the bisection takes ~0.3 ms.
Each row draws with its own key (`row_keys`: the request's seed, the row, the token's index), so a row's
tokens never depend on the other rows. Penalties (`mixtral_jax.inference.penalties`) are applied to the
logits before, per row.

The engine adds three per-row inputs around `sample`: a `logit_bias` row added after the penalties, the log
probabilities of those biased logits (`logprob_outputs`: before temperature and the filters, as OpenAI and
vLLM report them), and an allowed-token bitmask (`apply_bitmask`, from a grammar: constrained decoding) that
the draw is restricted to. All three leave the logits exactly as they were where they are off.

`check_request` validates a request's prompts and `SamplingParams` (a `SamplingError` naming the field)
for the Sampler and the Engine alike.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.errors import SamplingError
from mixtral_jax.inference.penalties import PenaltyValue, make_penalties


# ------------------------------------------------------------------------------- parameters
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling. `top_k` None and `top_p` 1 are off; the penalties are one number, or (the
    Sampler only) one per prompt; `stop_tokens` end a row (the model's EOS when None); the seed makes a
    sampled answer reproducible whatever else shares the batch."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: PenaltyValue = 1.0
    presence_penalty: PenaltyValue = 0.0
    frequency_penalty: PenaltyValue = 0.0
    seed: int = 0
    stop_tokens: tuple[int, ...] | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), added to the logits
    logprobs: int | None = None  # None: off; k in [0, 20]: the drawn token's log probability and the top k


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v)


def check_sampling(temperature, top_k, top_p) -> None:
    """Raise SamplingError unless temperature >= 0, top_k is None or an integer >= 1, top_p is in (0, 1]."""
    if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise SamplingError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise SamplingError(f"top_k must be an integer >= 1, got {top_k!r}")
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p!r}")


def check_request(prompts: Sequence[Sequence[int]], params: SamplingParams, *, vocab_size: int, context: int,
                  length_name: str = "max_tokens") -> tuple[list[list[int]], np.ndarray | None]:
    """Raise SamplingError unless `prompts` can be answered with `params` in a context of `context`
    tokens; `length_name` is what the caller calls `max_tokens`. Returns the prompts as lists of ints and
    the (3, prompts) penalty table (`make_penalties`; None when every penalty is off)."""
    check_sampling(params.temperature, params.top_k, params.top_p)
    if not _is_int(params.seed):
        raise SamplingError(f"seed must be an integer, got {params.seed!r}")
    if params.stop_tokens is not None and not all(_is_int(t) for t in params.stop_tokens):
        raise SamplingError(f"stop_tokens must be token ids, got {params.stop_tokens!r}")
    if not _is_int(params.max_tokens) or params.max_tokens < 1:
        raise SamplingError(f"{length_name} must be an integer >= 1, got {params.max_tokens!r}")
    _check_bias_and_logprobs(params, vocab_size)
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
        raise SamplingError("no prompts given")
    penalties = make_penalties(len(prompts), params.repetition_penalty, params.presence_penalty,
                               params.frequency_penalty)
    for i, p in enumerate(prompts):
        name = "the prompt" if len(prompts) == 1 else f"prompt {i}"
        if not p:
            raise SamplingError(f"{name} is empty")
        if min(p) < 0 or max(p) >= vocab_size:
            raise SamplingError(f"{name} has token ids outside [0, {vocab_size})")
    longest = max(map(len, prompts))
    name = "the prompt" if len(prompts) == 1 else "the longest prompt"
    if longest >= context:
        raise SamplingError(f"a prompt has {longest} tokens but the context holds {context} (prompt and new "
                            "tokens together)")
    if longest + params.max_tokens > context:
        raise SamplingError(f"{name} ({longest} tokens) plus {length_name} ({params.max_tokens}) exceeds the "
                            f"context of {context} tokens; lower {length_name} to {context - longest}")
    return prompts, penalties


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_LOGIT_BIAS = 300  # entries of one request's logit_bias (what the multi-host broadcast has room for)


def _check_bias_and_logprobs(params: SamplingParams, vocab_size: int) -> None:
    if not isinstance(params.logit_bias, tuple) or len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise SamplingError(f"logit_bias must be a tuple of at most {MAX_LOGIT_BIAS} (token id, bias) pairs")
    for pair in params.logit_bias:
        if not (isinstance(pair, tuple) and len(pair) == 2 and _is_int(pair[0]) and _is_number(pair[1])):
            raise SamplingError(f"logit_bias entries must be (token id, number) pairs, got {pair!r}")
        if not 0 <= pair[0] < vocab_size:
            raise SamplingError(f"logit_bias has token id {pair[0]} outside [0, {vocab_size})")
        if not -100 <= pair[1] <= 100:
            raise SamplingError(f"logit_bias values must be in [-100, 100], got {pair[1]!r} for token {pair[0]}")
    k = params.logprobs
    if k is not None and (not _is_int(k) or not 0 <= k <= MAX_TOP_LOGPROBS):
        raise SamplingError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {k!r}")


def bias_row(params: SamplingParams, vocab_size: int) -> np.ndarray:
    """One request's logit_bias as a dense (vocab,) float32 row (zeros where none: adding it changes nothing)."""
    row = np.zeros(vocab_size, np.float32)
    for token, bias in params.logit_bias:
        row[token] += bias
    return row


def seed_words(seed: int) -> np.ndarray:
    """A seed (any integer, taken mod 2**64) as its (low, high) uint32 words: `row_keys` folds both in."""
    seed = int(seed) % (1 << 64)
    return np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32)


# --------------------------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class Greedy:
    """Every row takes the argmax. A pytree without leaves: known when tracing, so nothing else compiles."""


@dataclasses.dataclass(frozen=True)
class RowParams:
    """Per-row sampling parameters, (b,) arrays: temperature (0: that row is greedy), top_k (int32, 0 or
    >= vocab: off), top_p (1: off). Traced, so their values never recompile anything."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def of(cls, params: Sequence[SamplingParams]) -> RowParams:
        """Host (numpy) arrays, one row per request."""
        return cls(np.array([p.temperature for p in params], np.float32),
                   np.array([p.top_k or 0 for p in params], np.int32),
                   np.array([p.top_p for p in params], np.float32))


jax.tree_util.register_dataclass(Greedy, data_fields=[], meta_fields=[])
jax.tree_util.register_dataclass(RowParams, data_fields=["temperature", "top_k", "top_p"], meta_fields=[])


def make_strategy(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  rows: int = 1) -> Greedy | RowParams:
    """`rows` rows sharing these parameters, checked (`check_sampling`): Greedy() at temperature 0."""
    top_p = 1.0 if top_p is None else top_p
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return Greedy()
    return RowParams.of([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * rows)


# ------------------------------------------------------------------------------------ sampling
def argmax(logits: jax.Array) -> jax.Array:
    """`jnp.argmax(logits, -1)` as int32 (the first of equal maxima; the first NaN where there is one),
    as plain max/min reductions, which XLA:CPU vectorizes, where argmax's paired (value, index) reduction
    runs element by element (a 32000-word vocabulary: 146 -> 26 us a row, 1-4% of a CPU decode step).
    NaNs are found on their own: a vectorized max does not reliably return them."""
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    none = logits.shape[-1]
    nan = jnp.isnan(logits)
    top = jnp.max(jnp.where(nan, -jnp.inf, logits), axis=-1, keepdims=True)
    first_top = jnp.min(jnp.where(logits == top, index, none), axis=-1)
    first_nan = jnp.min(jnp.where(nan, index, none), axis=-1)
    return jnp.where(first_nan < none, first_nan, first_top)


def row_keys(seeds: jax.Array, rows: jax.Array, index: jax.Array) -> jax.Array:
    """(b,) keys from (b, 2) `seed_words`, each row's number and the index of the token it draws: a row's
    draws depend on these three only (the engine's rows are all row 0: a request is one row)."""
    def one(seed, row, i):
        key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
        return jax.random.fold_in(jax.random.fold_in(key, row), i)
    return jax.vmap(one)(seeds, rows, index)


def sample(logits: jax.Array, params: Greedy | RowParams, keys: jax.Array) -> jax.Array:
    """One token per row of (b, vocab) logits: see the module docstring. `keys`: (b,) (`row_keys`)."""
    logits = logits.astype(jnp.float32)
    greedy = argmax(logits)
    if isinstance(params, Greedy):
        return greedy
    sampling = params.temperature > 0

    def draw(logits):
        filtered = filter_logits(logits, params)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], jnp.float32))(keys)
        return argmax(filtered + noise)  # = jax.random.categorical per row, with the vectorized argmax

    sampled = jax.lax.cond(jnp.any(sampling), draw, lambda _: greedy, logits)
    return jnp.where(sampling, sampled, greedy)


_DROPPED = float(np.finfo(np.float32).min)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """(b, vocab) logits with the tokens whose bit is 0 in the (b, ceil(vocab / 32)) int32 `bitmask` (bit j
    of word i: token 32 i + j, llguidance's layout) set to the float32 minimum; an all-ones row leaves its
    logits exactly as they were. A grammar always allows some token, so a row never loses every one."""
    vocab = logits.shape[-1]
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, :vocab].astype(bool)
    return jnp.where(allowed, logits, _DROPPED)


@dataclasses.dataclass(frozen=True)
class Logprobs:
    """Per row: the drawn token's log probability and the `MAX_TOP_LOGPROBS` likeliest tokens' (ids, values)."""

    chosen: jax.Array  # (b,) float32
    top_ids: jax.Array  # (b, MAX_TOP_LOGPROBS) int32
    top_values: jax.Array  # (b, MAX_TOP_LOGPROBS) float32


jax.tree_util.register_dataclass(Logprobs, data_fields=["chosen", "top_ids", "top_values"], meta_fields=[])


def logprob_outputs(logits: jax.Array, tokens: jax.Array, wanted: jax.Array) -> Logprobs:
    """The float32 log-softmax of (b, vocab) `logits` at each row's drawn token, and its top tokens; computed
    only when some row (`wanted`, (b,) bool) asks for them (zeros otherwise)."""
    b = logits.shape[0]

    def compute(x):
        lp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
        values, ids = jax.lax.top_k(lp, MAX_TOP_LOGPROBS)
        return Logprobs(jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], ids.astype(jnp.int32), values)

    def skip(_):
        return Logprobs(jnp.zeros((b,), jnp.float32), jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.int32),
                        jnp.zeros((b, MAX_TOP_LOGPROBS), jnp.float32))

    return jax.lax.cond(jnp.any(wanted), compute, skip, logits)


def filter_logits(logits: jax.Array, params: RowParams) -> jax.Array:
    """Logits / temperature (rows at 0 left as they are), the tokens outside each row's top_k and then its
    top_p mass (over the top_k) set to the float32 minimum. Each filter runs only if some row uses it, and
    leaves the other rows exactly as they were."""
    vocab = logits.shape[-1]
    sampling = params.temperature > 0
    scaled = logits / jnp.where(sampling, params.temperature, 1.0)[:, None]
    k = jnp.where(sampling & (params.top_k > 0), jnp.minimum(params.top_k, vocab), vocab)
    cut = sampling & (params.top_p < 1)

    def top_k(x):
        order = _order(x)
        return jnp.where(order < _kth_largest(order, k)[:, None], _DROPPED, x)

    def top_p(x):
        order = _order(x)
        floor = _nucleus_floor(order, jax.nn.softmax(x, axis=-1), params.top_p)
        return jnp.where(cut[:, None] & (order < floor[:, None]), _DROPPED, x)

    scaled = jax.lax.cond(jnp.any(k < vocab), top_k, lambda x: x, scaled)
    return jax.lax.cond(jnp.any(cut), top_p, lambda x: x, scaled)


def _order(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (-0.0 with +0.0), so thresholds are found by bisecting integers."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(1 << 31))


def _kth_largest(order: jax.Array, k: jax.Array) -> jax.Array:
    """Per row, the largest t with at least k keys >= t: the k-th largest key (32 halvings of uint32)."""
    def halve(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        ok = jnp.sum(order >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    return jax.lax.fori_loop(0, 32, halve, (jnp.min(order, -1), jnp.max(order, -1)))[0]


def _nucleus_floor(order: jax.Array, probs: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row, the smallest t whose strictly larger keys hold less than top_p of the mass. Keeping the keys
    >= t keeps a token iff the tokens above it hold less than top_p: the smallest prefix of the sorted
    row that reaches top_p (transformers' TopPLogitsWarper), with every tie of its last value."""
    def halve(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(order > mid[:, None], probs, 0.0), axis=-1) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
    return jax.lax.fori_loop(0, 32, halve, (jnp.min(order, -1), jnp.max(order, -1)))[1]
