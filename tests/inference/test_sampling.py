"""The sampling core against numpy: the top-k and top-p masks a sort gives (ties, infinities and signed
zeros included), greedy rows, each row's independence from the others, the draws' frequencies; and the
one check of a request that the Sampler and the Engine share."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.errors import SamplingError
from mixtral_jax.inference.sampling import (
    Greedy,
    RowParams,
    SamplingParams,
    argmax,
    check_request,
    filter_logits,
    make_strategy,
    row_keys,
    sample,
    seed_words,
)

DROPPED = np.finfo(np.float32).min
_sample = jax.jit(sample)
_filter = jax.jit(filter_logits)


@functools.partial(jax.jit, static_argnames=("seed", "n"))
def draws(logits, params, seed, *, n):
    """(n, b): tokens 0..n-1 of every row (the keys of (seed, row, index)), as a row's decode draws them."""
    b = logits.shape[0]
    seeds = jnp.broadcast_to(jnp.asarray(seed_words(seed)), (b, 2))
    return jax.vmap(lambda i: sample(logits, params, row_keys(seeds, jnp.arange(b), jnp.full((b,), i))))(jnp.arange(n))


def rows(temperature, top_k, top_p) -> RowParams:
    return RowParams(jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                     jnp.asarray(top_p, jnp.float32))


def keys_for(n, seed=0, index=0):
    return row_keys(jnp.asarray(np.stack([seed_words(seed)] * n)), jnp.arange(n, dtype=jnp.int32),
                    jnp.full((n,), index, jnp.int32))


def reference_keep(scaled: np.ndarray, k: int, p: float) -> tuple[np.ndarray, float]:
    """By sorting, as the sampler did before (and transformers' warpers): the top k values (every tie of the
    k-th kept), then the smallest prefix of the sorted rest whose mass reaches p (every tie of its last
    value kept). Also returns how far p is from the nearest prefix mass, so a test can refuse cases that
    rounding could decide."""
    order = np.argsort(-scaled, kind="stable")
    keep = np.ones(scaled.shape, bool)
    if 0 < k < scaled.size:
        keep &= scaled >= scaled[order[k - 1]]
    margin = np.inf
    if p < 1:
        x = np.where(keep, scaled.astype(np.float64), -np.inf)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        before = np.cumsum(probs[order]) - probs[order]
        n = int(np.sum(before < p))
        keep &= scaled >= scaled[order[n - 1]]
        margin = float(np.min(np.abs(before - p)))
    return keep, margin


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_argmax_is_numpys_with_ties_nans_and_infinities(dtype):
    """The vectorized argmax picks what numpy's does: the first of equal maxima, the first NaN."""
    rng = np.random.default_rng(0)
    x = rng.integers(-4, 5, (6, 3, 300)).astype(np.float32)  # small integers: many ties
    x[0, 0] = -np.inf
    x[1, 1, [7, 90]] = np.nan
    x[2, 2, 5] = np.inf
    x[3, 0, :] = np.nan
    x = np.asarray(jnp.asarray(x, dtype).astype(np.float32))  # the values the dtype holds
    got = np.asarray(jax.jit(argmax)(jnp.asarray(x, dtype)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


def test_filters_keep_exactly_what_a_sort_keeps():
    """Per row: its own temperature, top_k (off as 0 or >= vocab) and top_p, on rows full of ties (small
    integers), with -inf, signed zeros and huge values; the kept logits are the tempered ones, unchanged."""
    rng = np.random.default_rng(1)
    n, vocab = 9, 300
    logits = rng.integers(-6, 7, (n, vocab)).astype(np.float32)
    logits[1, :40] = -np.inf
    logits[2] = np.where(logits[2] == 0, np.where(np.arange(vocab) % 2, -0.0, 0.0), logits[2] * 1e37)
    logits[3] = 2.0  # one value: every token is a tie
    logits[4] = rng.normal(size=vocab).astype(np.float32) * 4
    temperature = np.array([1.0, 0.7, 1.3, 1.0, 0.5, 2.0, 1.0, 0.9, 1.1], np.float32)
    top_k = np.array([5, 17, 1, 1, 0, 400, 300, 37, 2], np.int32)
    top_p = np.array([1.0, 0.5, 1.0, 0.205, 0.83, 0.37, 0.61, 1.0, 0.999], np.float32)
    got = np.asarray(_filter(jnp.asarray(logits), rows(temperature, top_k, top_p)))
    for r in range(n):
        scaled = logits[r] / temperature[r]
        want, margin = reference_keep(scaled, int(top_k[r]), float(top_p[r]))
        assert margin > 1e-4, f"row {r}: top_p {top_p[r]} is too close to a prefix's mass for this test"
        np.testing.assert_array_equal(got[r] > DROPPED, want, err_msg=f"row {r}")
        np.testing.assert_allclose(got[r][want], scaled[want], rtol=1e-6)  # XLA divides to within an ulp
    assert (got[3] > DROPPED).all()  # ties of the k-th value are kept
    assert 1 < (got[0] > DROPPED).sum() < vocab and (got[6] > DROPPED).sum() < vocab


def test_greedy_rows_take_the_argmax_whatever_the_key_and_filters():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 50)).astype(np.float32))
    params = rows([0.0, 1.0, 0.0, 5.0], [3, 0, 0, 0], [1.0, 1e-3, 0.5, 1.0])  # row 1: only its top token fits
    top = np.argmax(np.asarray(logits), -1)
    drawn = np.asarray(draws(logits, params, 0, n=30))
    assert (drawn[:, [0, 1, 2]] == top[[0, 1, 2]]).all()
    assert len(set(drawn[:, 3].tolist())) > 5  # temperature 5 over 50 tokens: many different draws
    np.testing.assert_array_equal(np.asarray(_sample(logits, Greedy(), keys_for(4))), top)
    no_draws = rows([0.0] * 4, [3] * 4, [0.5] * 4)  # every row greedy: the draw is skipped, the argmax stays
    np.testing.assert_array_equal(np.asarray(_sample(logits, no_draws, keys_for(4))), top)


def test_a_sampled_row_is_jax_categorical_of_its_filtered_logits():
    """The draw is `jax.random.categorical` (Gumbel-max) with the vectorized argmax: the same tokens."""
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(3, 64)).astype(np.float32))
    params = rows([0.8, 1.0, 1.7], [0, 10, 0], [1.0, 1.0, 0.7])
    categorical = jax.jit(lambda keys, logits: jax.vmap(jax.random.categorical)(keys, _filter(logits, params)))
    for i in range(20):
        keys = keys_for(3, seed=9, index=i)
        np.testing.assert_array_equal(np.asarray(_sample(logits, params, keys)), np.asarray(categorical(keys, logits)))


def test_draws_stay_in_the_allowed_set_and_cover_it():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(4, 50)).astype(np.float32) * 2)
    temperature, top_k, top_p = [1.0, 1.3, 0.7, 1.0], [5, 0, 8, 0], [1.0, 0.6, 0.5, 0.9]
    params = rows(temperature, top_k, top_p)
    drawn = np.asarray(draws(logits, params, 1, n=3000))
    for r in range(4):
        allowed, margin = reference_keep(np.asarray(logits[r]) / temperature[r], top_k[r], top_p[r])
        assert margin > 1e-4
        seen = set(drawn[:, r].tolist())
        assert seen == set(np.flatnonzero(allowed).tolist())  # never outside, and each allowed token occurs


def test_frequencies_follow_the_tempered_distribution_over_the_kept_tokens():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0]] * 2)
    params = rows([0.8, 0.8], [0, 3], [1.0, 1.0])
    drawn = np.asarray(draws(logits, params, 2, n=20000))
    for r, kept in ((0, np.arange(6)), (1, np.array([0, 1, 4]))):
        expect = np.zeros(6)
        expect[kept] = np.asarray(jax.nn.softmax(logits[r, kept] / 0.8))
        freq = np.bincount(drawn[:, r], minlength=6) / drawn.shape[0]
        assert np.max(np.abs(freq - expect)) < 0.015, (r, freq, expect)


def test_a_rows_draws_depend_only_on_its_own_logits_parameters_and_key():
    """Row 0 drawn in a batch whose other rows change (logits, parameters, greedy or not, filters or not)
    draws what it draws alone."""
    rng = np.random.default_rng(5)
    mine = rng.normal(size=(1, 80)).astype(np.float32)
    params = rows([0.9], [12], [0.8])
    for i in range(30):
        key = keys_for(1, seed=3, index=i)
        alone = int(_sample(jnp.asarray(mine), params, key)[0])
        others = rng.normal(size=(3, 80)).astype(np.float32) * 3
        batch = jnp.asarray(np.concatenate([mine, others]))
        mixed = rows([0.9, 0.0, 1.5, 0.3], [12, 1, 0, 80], [0.8, *rng.uniform(0.2, 1, 3)])
        other_keys = keys_for(3, seed=100 + i)
        keys = jnp.concatenate([key, other_keys])
        assert int(_sample(batch, mixed, keys)[0]) == alone
        plain = rows([0.9, 0.0, 0.0, 0.0], [12, 0, 0, 0], [0.8, 1.0, 1.0, 1.0])
        assert int(_sample(batch, plain, keys)[0]) == alone


def test_keys_differ_by_seed_row_and_index_only():
    def key(seed, row, index):
        k = row_keys(jnp.asarray(seed_words(seed))[None], jnp.asarray([row], jnp.int32),
                     jnp.asarray([index], jnp.int32))
        return tuple(np.asarray(jax.random.key_data(k)).ravel().tolist())

    base = key(7, 0, 0)
    assert key(7, 0, 0) == base
    assert len({base, key(8, 0, 0), key(7, 1, 0), key(7, 0, 1), key(7 + (1 << 32), 0, 0)}) == 5
    assert key(-1, 0, 0) == key((1 << 64) - 1, 0, 0)  # seeds are taken mod 2**64
    np.testing.assert_array_equal(seed_words((1 << 40) + 5), [5, 1 << 8])


def test_make_strategy():
    assert make_strategy(0.0, top_k=5, top_p=0.5) == Greedy()
    s = make_strategy(0.7, top_k=5, rows=3)
    assert isinstance(s, RowParams)
    np.testing.assert_array_equal(s.top_k, [5, 5, 5])
    np.testing.assert_allclose(s.temperature, [0.7] * 3)
    np.testing.assert_array_equal(s.top_p, [1.0] * 3)
    with pytest.raises(SamplingError, match="top_k"):
        make_strategy(1.0, top_k=0)


CHECK = dict(vocab_size=100, context=32)


@pytest.mark.parametrize("prompts, params, message", [
    ([[1, 2]], SamplingParams(temperature=-0.5), "temperature must be a number >= 0"),
    ([[1, 2]], SamplingParams(temperature=float("nan")), "temperature"),
    ([[1, 2]], SamplingParams(temperature=True), "temperature"),
    ([[1, 2]], SamplingParams(top_k=0), "top_k must be an integer >= 1"),
    ([[1, 2]], SamplingParams(top_k=2.0), "top_k"),
    ([[1, 2]], SamplingParams(top_k=True), "top_k"),
    ([[1, 2]], SamplingParams(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ([[1, 2]], SamplingParams(top_p=1.5), "top_p"),
    ([[1, 2]], SamplingParams(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
    ([[1, 2]], SamplingParams(presence_penalty=2.5), "presence_penalty"),
    ([[1, 2]], SamplingParams(frequency_penalty=-3.0), "frequency_penalty"),
    ([[1, 2], [3]], SamplingParams(repetition_penalty=(1.1, 1.2, 1.3)), r"one per prompt \(2\), got 3"),
    ([[1, 2]], SamplingParams(seed=1.5), "seed must be an integer"),
    ([[1, 2]], SamplingParams(stop_tokens=(2, "x")), "stop_tokens"),
    ([[1, 2]], SamplingParams(max_tokens=0), "max_tokens must be an integer >= 1"),
    ([], SamplingParams(), "no prompts"),
    ([[]], SamplingParams(), "the prompt is empty"),
    ([[1], []], SamplingParams(), "prompt 1 is empty"),
    ([[1, 100]], SamplingParams(), r"token ids outside \[0, 100\)"),
    ([[1] * 32], SamplingParams(max_tokens=1), "32 tokens but the context holds 32"),
    ([[1] * 30], SamplingParams(max_tokens=5), "exceeds the context of 32 tokens; lower max_tokens to 2"),
])
def test_bad_requests_are_named_in_one_line(prompts, params, message):
    with pytest.raises(SamplingError, match=message) as e:
        check_request(prompts, params, **CHECK)
    assert "\n" not in str(e.value)


def test_a_good_request_comes_back_as_ints_with_its_penalty_table():
    prompts, table = check_request([np.array([1, 2]), (3,)], SamplingParams(max_tokens=30, seed=np.int64(3)), **CHECK)
    assert prompts == [[1, 2], [3]] and table is None
    _, table = check_request([[1]], SamplingParams(presence_penalty=0.5, repetition_penalty=1.2), **CHECK)
    np.testing.assert_allclose(table, [[1.2], [0.5], [0.0]])
    with pytest.raises(SamplingError, match="max_new_tokens must"):  # the caller's own name for max_tokens
        check_request([[1]], SamplingParams(max_tokens=0), **CHECK, length_name="max_new_tokens")
