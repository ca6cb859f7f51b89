"""Sampling penalties against transformers' RepetitionPenaltyLogitsProcessor and OpenAI's formula, in the
batched sampler and in the serving engine."""

from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor

import mixtral_jax
from mixtral_jax.inference.engine import Engine, EngineConfig, SamplingParams
from mixtral_jax.inference.penalties import apply_penalties, make_penalties, penalize_rows, token_counts
from mixtral_jax.inference.sampler import Sampler, SamplingError
from tests.inference.test_sampler import CONFIG, SEED  # one reference model (and its programs) for both files


class OpenAIPenalty(LogitsProcessor):
    """OpenAI's documented formula, mu[j] - c[j] * frequency - (c[j] > 0) * presence, over the ids so far."""

    def __init__(self, presence: float, frequency: float):
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids, scores):
        out = scores.clone()
        for row, ids in enumerate(input_ids.tolist()):
            for token, c in Counter(ids).items():
                out[row, token] -= c * self.frequency + (c > 0) * self.presence
        return out


def _random_case(seed: int, vocab: int = 50):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(3, vocab)) * 3).astype(np.float32)  # positive and negative logits
    ids = rng.integers(0, vocab, (3, 30))  # repeats within a row
    return logits, ids


def test_repetition_penalty_equals_transformers_processor():
    logits, ids = _random_case(0)
    penalties = [1.3, 0.7, 2.0]  # one per row (0.7 < 1 rewards repeats)
    counts = token_counts(jnp.asarray(ids), jnp.ones(ids.shape, bool), logits.shape[1])
    table = make_penalties(3, repetition_penalty=penalties)
    ours = np.asarray(apply_penalties(jnp.asarray(logits), counts, jnp.asarray(table)))
    for row, p in enumerate(penalties):
        ref = RepetitionPenaltyLogitsProcessor(p)(torch.tensor(ids[row:row + 1]), torch.tensor(logits[row:row + 1]))
        np.testing.assert_allclose(ours[row], ref[0].numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(ours, logits)


def test_presence_and_frequency_follow_openai_formula():
    logits, ids = _random_case(1)
    presence, frequency = [0.5, -1.0, 2.0], [0.3, 1.5, -0.25]
    counts = token_counts(jnp.asarray(ids), jnp.ones(ids.shape, bool), logits.shape[1])
    table = make_penalties(3, presence_penalty=presence, frequency_penalty=frequency)
    ours = np.asarray(apply_penalties(jnp.asarray(logits), counts, jnp.asarray(table)))
    for row in range(3):
        c = Counter(ids[row].tolist())
        ref = [logits[row, j] - c[j] * frequency[row] - (c[j] > 0) * presence[row] for j in range(logits.shape[1])]
        np.testing.assert_allclose(ours[row], ref, rtol=1e-6, atol=1e-6)


def test_counts_leave_out_padding_and_masked_positions():
    tokens = jnp.asarray([[0, 0, 5, 5, 7], [0, 3, 3, 3, 0]])
    valid = jnp.asarray([[False, False, True, True, True], [False, True, True, True, True]])
    counts = np.asarray(token_counts(tokens, valid, 10))
    assert counts[0].tolist() == [0, 0, 0, 0, 0, 2, 0, 1, 0, 0]
    assert counts[1].tolist() == [1, 0, 0, 3, 0, 0, 0, 0, 0, 0]  # a real token 0 counts, padding does not


def test_sampler_with_repetition_penalty_equals_transformers_generate(reference):
    """Per-row penalties in one batch (left-padded) = transformers' generate row by row."""
    ref = reference(CONFIG, SEED)
    hf, model = ref.hf, ref.model()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (6, 2, 13)]
    penalties = [1.5, 1.0, 1.2]
    ours = Sampler(model)(prompts, 24, stop_tokens=[], repetition_penalty=penalties)
    plain = Sampler(model)(prompts, 24, stop_tokens=[])
    for prompt, p, out in zip(prompts, penalties, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0, repetition_penalty=p)
        assert out == ref[0, len(prompt):].tolist()
    assert ours[1] == plain[1] and ours[0] != plain[0]  # the penalty changed the penalised rows' text


def test_sampler_with_openai_penalties_equals_the_formula_in_transformers_generate(reference):
    ref = reference(CONFIG, SEED)
    hf, model = ref.hf, ref.model()
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (9, 4)]
    presence, frequency = [0.8, 0.0], [0.4, 1.1]
    ours = Sampler(model)(prompts, 24, stop_tokens=[], presence_penalty=presence, frequency_penalty=frequency)
    for prompt, pres, freq, out in zip(prompts, presence, frequency, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0, logits_processor=LogitsProcessorList([OpenAIPenalty(pres, freq)]))
        assert out == ref[0, len(prompt):].tolist()
    assert ours != Sampler(model)(prompts, 24, stop_tokens=[])


def test_penalties_with_sampling_and_the_text_api(reference):
    """Penalised sampling repeats with its seed, and generate() passes the penalties through."""
    model = reference(CONFIG, SEED).model()
    kwargs = dict(temperature=0.9, top_p=0.95, seed=5, repetition_penalty=1.3, frequency_penalty=0.5)
    a = mixtral_jax.generate(model, [[4, 5, 6]], 16, stop_tokens=[], **kwargs)
    assert a == mixtral_jax.generate(model, [[4, 5, 6]], 16, stop_tokens=[], **kwargs)
    assert a == Sampler(model)([[4, 5, 6]], 16, stop_tokens=[], **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0, got 0.0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty="0.5"), "frequency_penalty"),
    (dict(repetition_penalty=[1.1, 1.2, 1.3]), r"one per prompt \(2\), got 3 values"),
])
def test_bad_penalties_fail_in_one_line(reference, kwargs, message):
    model = reference(CONFIG, SEED).model()
    with pytest.raises(SamplingError, match=message) as err:
        Sampler(model)([[1, 2], [3]], 4, **kwargs)
    assert "\n" not in str(err.value)


def test_neutral_penalties_are_off():
    assert make_penalties(2) is None
    assert make_penalties(2, repetition_penalty=[1.0, 1.0], presence_penalty=0) is None
    assert make_penalties(2, presence_penalty=[0.0, 0.1]).shape == (3, 2)


def test_the_engines_per_row_table_penalises_only_its_rows():
    """The engine's table has a row per slot, neutral where off: those rows keep their logits exactly, and
    an all-neutral table (skipped at run time) changes nothing."""
    logits, ids = _random_case(2)
    counts = token_counts(jnp.asarray(ids), jnp.ones(ids.shape, bool), logits.shape[1])
    table = np.array([[1.0, 1.4, 1.0], [0.0, 0.0, 0.7], [0.0, 0.0, 0.3]], np.float32)
    ours = np.asarray(penalize_rows(jnp.asarray(logits), counts, jnp.asarray(table)))
    np.testing.assert_array_equal(ours[0], logits[0])
    np.testing.assert_array_equal(ours[1:], np.asarray(apply_penalties(jnp.asarray(logits), counts,
                                                                       jnp.asarray(table)))[1:])
    assert not np.allclose(ours[1:], logits[1:])
    neutral = np.array([[1.0] * 3, [0.0] * 3, [0.0] * 3], np.float32)
    np.testing.assert_array_equal(np.asarray(penalize_rows(jnp.asarray(logits), counts, jnp.asarray(neutral))), logits)


def test_engine_with_repetition_penalty_equals_transformers_generate(reference):
    """Three requests with their own repetition penalties share the engine's decode steps (with a plain one
    beside them, and a slot reused: its counts start again from the new prompt): each answer is
    transformers' generate with that penalty, as the batched sampler's is."""
    ref = reference(CONFIG, SEED)
    hf, model = ref.hf, ref.model()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (6, 2, 13, 9)]
    penalties = [1.5, 1.0, 1.2, 1.3]
    engine = Engine(model, EngineConfig(max_batch=2, max_context=64, prefill_chunk=16))
    outs = [[] for _ in prompts]
    for prompt, p, out in zip(prompts, penalties, outs):
        engine.submit(prompt, SamplingParams(max_tokens=24, repetition_penalty=p, stop_tokens=()), on_token=out.append)
    for _ in range(2000):
        if engine.idle:
            break
        engine.step()
    assert engine.idle
    for prompt, p, out in zip(prompts, penalties, outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0, repetition_penalty=p)
        assert out == want[0, len(prompt):].tolist()
    plain = Sampler(model)(prompts, 24, stop_tokens=[])
    assert outs[1] == plain[1] and all(outs[i] != plain[i] for i in (0, 2, 3))
