"""KV-cached decoding against the full forward pass, greedy generation against transformers, the sampler's
streaming and seeds (the sampling core itself: test_sampling.py)."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import mixtral_jax
import mixtral_jax.model.attention as attention_module
from mixtral_jax import MixtralConfig
from mixtral_jax.inference.sampler import Sampler, SamplingError
from mixtral_jax.model.kv_cache import KVCache

# shared with test_penalties.py (one reference model and its compiled programs for both): a window shorter
# than the longer tests' prompt + answer, so decoding crosses it
CONFIG = MixtralConfig.tiny(sliding_window=12, max_seq_len=128)
SEED = 4


def _with_attention(model, impl: str):
    """A copy of `model` (sharing its arrays) whose layers attend with `impl`."""
    copy = nnx.merge(*nnx.split(model))
    for layer in copy.layers:
        layer.attn.impl = impl
    return copy


def test_cached_decoding_equals_full_forward_every_step(reference):
    """Ragged batch (left padding), prefill in one call, then one token at a time across the window."""
    model = reference(CONFIG, SEED).model()
    rng = np.random.default_rng(0)
    lengths, steps, width = [9, 3, 14], 20, 16
    tokens = np.zeros((3, width + steps), np.int32)
    valid = np.zeros((3, width + steps), bool)
    for row, n in enumerate(lengths):
        tokens[row, width - n:] = rng.integers(0, CONFIG.vocab_size, n + steps)
        valid[row, width - n:] = True
    full = np.asarray(model(tokens, attention_mask=valid))  # positions default to counts of real tokens

    extend = nnx.jit(lambda m, c, t, v: m.extend(c, t, v))
    cache = KVCache.empty(CONFIG, 3, width + steps, jnp.float32)
    logits, cache = extend(model, cache, jnp.asarray(tokens[:, :width]), jnp.asarray(valid[:, :width]))
    real = valid[:, :width]
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :width][real], atol=1e-5)
    for step in range(steps):
        col = width + step
        logits, cache = extend(model, cache, jnp.asarray(tokens[:, col:col + 1]), jnp.ones((3, 1), bool))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, col], atol=1e-5, err_msg=f"step {step}")


@pytest.mark.parametrize("impl", ["plain", "blockwise"])
def test_prefill_into_a_cache_skips_nothing_it_needs(reference, monkeypatch, impl):
    """A prompt written into a cache with room to spare (blockwise: in 16-key tiles, the unwritten ones
    skipped): the same logits as the full forward pass, with left padding and the sliding window."""
    monkeypatch.setattr(attention_module, "Q_BLOCK", 16)
    monkeypatch.setattr(attention_module, "KV_BLOCK", 16)
    model = reference(CONFIG, SEED).model()
    model = _with_attention(model, impl)
    rng = np.random.default_rng(5)
    width = 40
    tokens = rng.integers(0, CONFIG.vocab_size, (3, width)).astype(np.int32)
    valid = np.zeros((3, width), bool)
    for row, n in enumerate([40, 23, 9]):
        valid[row, width - n:] = True
    full = np.asarray(model(tokens, attention_mask=valid))
    for size in (width, width + 24):
        cache = KVCache.empty(CONFIG, 3, size, jnp.float32)
        logits, _ = model.extend(cache, jnp.asarray(tokens), jnp.asarray(valid))
        np.testing.assert_allclose(np.asarray(logits)[valid], full[valid], atol=1e-5, err_msg=f"cache {size}")


def test_expert_views_share_the_parameters_and_change_nothing(reference, xla_only):
    """On CPU the per-expert views alias the stacked weights (no copy) and give the same logits."""
    model = reference(CONFIG, SEED).model()
    views = model.expert_views()
    assert views is not None and len(views) == CONFIG.n_layers
    for layer, (w1s, w3s, w2s) in zip(model.layers, views):
        for stacked, per_expert in ((layer.moe.w1, w1s), (layer.moe.w3, w3s), (layer.moe.w2, w2s)):
            base, step = stacked[...].unsafe_buffer_pointer(), stacked[...][0].nbytes
            assert [v.unsafe_buffer_pointer() for v in per_expert] == [base + e * step for e in range(CONFIG.n_experts)]
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, CONFIG.vocab_size, (2, 10)), jnp.int32)
    cache = KVCache.empty(CONFIG, 2, 12, jnp.float32)
    plain, _ = model.extend(cache, tokens)
    viewed, _ = nnx.jit(lambda m, c, t, e: m.extend(c, t, expert_weights=e))(model, cache, tokens, views)
    np.testing.assert_allclose(np.asarray(viewed), np.asarray(plain), atol=1e-5)


def test_greedy_equals_transformers_generate(reference):
    ref = reference(CONFIG, SEED)
    hf, model = ref.hf, ref.model()
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, CONFIG.vocab_size, n).tolist() for n in (5, 1, 17, 11)]
    ours = Sampler(model)(prompts, 32, stop_tokens=[])
    for prompt, out in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert out == ref[0, len(prompt):].tolist()


def test_stop_token_and_stop_sequence_end_a_row(reference):
    model = reference(CONFIG, SEED).model()
    sampler = Sampler(model)
    prompts = [[5, 6, 7], [9, 10]]
    free = sampler(prompts, 24, stop_tokens=[])
    stop_tok = free[0][6]
    cut = sampler(prompts, 24, stop_tokens=[stop_tok])
    assert cut[0] == free[0][:free[0].index(stop_tok)]
    seq = free[1][4:7]
    cut = sampler(prompts, 24, stop_tokens=[], stop_sequences=[seq])
    first = next(i for i in range(len(free[1])) if free[1][i:i + 3] == seq)
    assert cut[1] == free[1][:first]
    assert cut[0] == free[0]


def test_streaming_delivers_the_same_tokens(reference):
    model = reference(CONFIG, SEED).model()
    steps = []
    out = Sampler(model)([[1, 2, 3], [4]], 10, stop_tokens=[], stream=lambda t: steps.append(t.copy()))
    streamed = np.stack(steps, axis=1)
    for row, o in enumerate(out):
        assert streamed[row][streamed[row] >= 0].tolist() == o


def test_streaming_runs_one_step_ahead_without_changing_the_answer(reference):
    """The stream dispatches each group of steps before reading the last one back: it still yields
    exactly the steps that emit something, and nothing runs past the limit."""
    model = reference(CONFIG, SEED).model()
    sampler = Sampler(model)
    for limit in (1, 10, 16):  # below, at and on the output bucket
        steps = list(sampler.stream([[1, 2, 3], [4]], limit, stop_tokens=[]))
        assert len(steps) == limit and all((s >= 0).all() for s in steps)
        assert sampler([[1, 2, 3], [4]], limit, stop_tokens=[]) == np.stack(steps, axis=1).tolist()


def test_streaming_in_groups_of_steps_yields_every_step_and_stops_where_the_loop_does(reference, monkeypatch):
    """A fast model streams several steps per dispatch (`STREAM_LATENCY`): still one yield per step,
    ending on the same step as `__call__`, for limits inside a group and stop tokens met mid-group."""
    import mixtral_jax.inference.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "STREAM_LATENCY", 60.0)  # every group as large as allowed
    model = reference(CONFIG, SEED).model()
    sampler = Sampler(model)
    prompts = [[1, 2, 3], [4]]
    free = sampler(prompts, 20, stop_tokens=[])
    for limit, stops in ((3, []), (11, []), (20, []), (20, [free[0][6]]), (20, [free[0][9], free[1][4]])):
        steps = list(sampler.stream(prompts, limit, stop_tokens=stops))
        streamed = np.stack(steps, axis=1)
        want = sampler(prompts, limit, stop_tokens=stops)
        assert [r[r >= 0].tolist() for r in streamed] == want
        assert len(steps) == max(len(w) for w in want) + (1 if stops and max(len(w) for w in want) < limit else 0)
        assert all((s >= 0).any() for s in steps[:-1])


def test_a_later_stream_sizes_its_first_group_by_the_last_streams_step_time(reference, monkeypatch):
    import mixtral_jax.inference.sampler as sampler_module

    model = reference(CONFIG, SEED).model()
    sampler = Sampler(model)
    list(sampler.stream([[1, 2, 3]], 12, stop_tokens=[]))
    assert 0 < sampler._step_times[1] < 60
    sizes, real = [], sampler_module.decode_steps
    monkeypatch.setattr(sampler_module, "decode_steps", lambda *a, **k: (sizes.append(int(a[-1])), real(*a, **k))[1])
    monkeypatch.setattr(sampler_module, "STREAM_LATENCY", 60.0)
    steps = list(sampler.stream([[4, 5]], 12, stop_tokens=[]))
    assert sizes[0] == sampler_module.STREAM_GROUP and len(steps) == 12
    before = len(sizes)
    list(Sampler(model).stream([[4, 5]], 12, stop_tokens=[]))  # a new sampler knows nothing yet
    assert sizes[before] == 1 and sampler_module.STREAM_GROUP in sizes[before:]


def test_streamed_steps_equal_the_compiled_loop_when_sampling_with_penalties(reference):
    """`stream` runs the decode step one jitted call at a time; `__call__` without it runs the same step
    inside one `lax.while_loop`: the same tokens, random draws and penalties included."""
    model = reference(CONFIG, SEED).model()
    kwargs = dict(temperature=1.1, top_k=20, top_p=0.9, seed=5, stop_tokens=[], presence_penalty=0.5,
                  repetition_penalty=1.3)
    prompts = [[3, 4, 5, 6], [7]]
    sampler = Sampler(model)
    steps = list(sampler.stream(prompts, 12, **kwargs))
    looped = sampler(prompts, 12, **kwargs)
    streamed = np.stack(steps, axis=1)
    assert [r[r >= 0].tolist() for r in streamed] == looped


def test_concurrent_streams_in_threads_each_get_their_own_tokens(reference):
    """No module state: two generations streaming at once in one process never see each other's tokens."""
    model = reference(CONFIG, SEED).model()
    sampler = Sampler(model)
    jobs = {"a": [[5, 6, 7]], "b": [[9], [10, 11]]}
    solo = {name: sampler(p, 10, stop_tokens=[]) for name, p in jobs.items()}
    got, errors = {name: [] for name in jobs}, []
    barrier = threading.Barrier(len(jobs))

    def run(name):
        try:
            barrier.wait(timeout=60)
            out = sampler(jobs[name], 10, stop_tokens=[], stream=lambda t, name=name: got[name].append(t.copy()))
            got[name].append(out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for name, steps in got.items():
        *tokens, out = steps
        assert out == solo[name]
        streamed = np.stack(tokens, axis=1)
        assert streamed.shape[0] == len(jobs[name])
        assert [r[r >= 0].tolist() for r in streamed] == solo[name]


def test_seed_repeats_and_temperature_zero_is_greedy(reference):
    model = reference(CONFIG, SEED).model()
    sampler = Sampler(model)
    prompts = [[3, 4, 5], [7]]
    a = sampler(prompts, 16, temperature=1.0, top_p=0.9, seed=7, stop_tokens=[])
    b = sampler(prompts, 16, temperature=1.0, top_p=0.9, seed=7, stop_tokens=[])
    c = sampler(prompts, 16, temperature=1.0, top_p=0.9, seed=8, stop_tokens=[])
    assert a == b and a != c
    assert sampler(prompts, 16, temperature=0.0, seed=3, stop_tokens=[]) == sampler(prompts, 16, stop_tokens=[])
    assert sampler(prompts, 16, temperature=1.0, top_k=1, seed=3, stop_tokens=[]) == sampler(prompts, 16,
                                                                                               stop_tokens=[])


def test_rows_of_one_seed_draw_apart_and_a_row_draws_as_it_would_alone(reference):
    """Row r's token i is drawn with the key of (seed, r, i): the same prompt twice in one call gets two
    answers, and row 0 gets what the same seed gives that prompt alone (the other rows change nothing)."""
    model = reference(CONFIG, SEED).model()
    sampler = Sampler(model)
    kwargs = dict(temperature=1.0, top_k=40, seed=11, stop_tokens=[])
    twice = sampler([[3, 4, 5], [3, 4, 5]], 16, **kwargs)
    assert twice[0] != twice[1]
    assert sampler([[3, 4, 5]], 16, **kwargs)[0] == twice[0] == sampler([[3, 4, 5], [9, 8]], 16, **kwargs)[0]
    assert sampler([[3, 4, 5]], 16, **(kwargs | dict(seed=11 + (1 << 32)))) != [twice[0]]  # all 64 bits count


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[[5] * 127], max_new_tokens=4), "exceeds the context of 128 tokens; lower max_new_tokens to 1"),
    (dict(prompts=[[5] * 128]), "context holds 128"),
    (dict(prompts=[[]]), "the prompt is empty"),
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 999]]), "outside"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(seed=1.5), "seed"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[1] * 100], max_new_tokens=40), "lower max_new_tokens to 28"),
])
def test_bad_requests_fail_before_compiling(reference, kwargs, message):
    model = reference(CONFIG, SEED).model()
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(SamplingError, match=message):
        Sampler(model)(args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_text_api_with_the_demo_model():
    from mixtral_jax.loading.demo import default_model
    from mixtral_jax.text.tokenizer import load_tokenizer

    model = default_model()
    tok = load_tokenizer()
    pieces = []
    out = mixtral_jax.generate(model, ["Hello there", "A"], max_new_tokens=8,
                               on_text=lambda row, text: pieces.append((row, text)))
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert "".join(t for r, t in pieces if r == 0) == out[0]
    ids = mixtral_jax.generate(model, [tok.encode("Hello there")], max_new_tokens=8)
    assert tok.decode(ids[0]) == out[0]
    reply = mixtral_jax.chat(model, [{"role": "user", "content": "Hi"}], max_new_tokens=4)
    assert isinstance(reply, str)


def test_a_later_request_reuses_the_compiled_programs(reference):
    """The graph is a once-hashed static argument: equal graphs from new requests (and new Samplers) hit
    jit's cache instead of compiling again."""
    import mixtral_jax.inference.sampler as sampler_module

    model = reference(CONFIG, SEED).model()
    Sampler(model)([[5, 6, 7]], 3)
    list(Sampler(model).stream([[5, 6, 7]], 3))
    sizes = (sampler_module.prefill._cache_size(), sampler_module.decode._cache_size(),
             sampler_module.decode_steps._cache_size())
    Sampler(model)([[9, 8, 7]], 3)
    list(Sampler(model).stream([[1, 2, 3]], 3))
    assert (sampler_module.prefill._cache_size(), sampler_module.decode._cache_size(),
            sampler_module.decode_steps._cache_size()) == sizes
    # sampling parameters are traced arrays: once one sampled request has compiled, new values compile nothing
    Sampler(model)([[5, 6, 7]], 3, temperature=0.7, top_p=0.9)
    list(Sampler(model).stream([[5, 6, 7]], 3, temperature=0.7))
    sizes = (sampler_module.prefill._cache_size(), sampler_module.decode._cache_size(),
             sampler_module.decode_steps._cache_size())
    Sampler(model)([[5, 6, 7]], 3, temperature=1.3, top_k=4, top_p=0.5, seed=9)
    list(Sampler(model).stream([[5, 6, 7]], 3, temperature=0.2, top_k=2))
    assert (sampler_module.prefill._cache_size(), sampler_module.decode._cache_size(),
            sampler_module.decode_steps._cache_size()) == sizes


def test_equal_graphs_share_one_wrapper_so_each_step_is_an_identity_check(reference):
    """jit compares a static argument with its cached key on every call; one wrapper per distinct graph
    makes that `is`, not a walk of the whole module tree each decode step."""
    from flax import nnx

    from mixtral_jax.inference.sampler import HashedOnce

    model = reference(CONFIG, SEED).model()
    first, second = nnx.split(model)[0], nnx.split(model)[0]
    assert first is not second and first == second
    assert HashedOnce.of(first) is HashedOnce.of(second)
    other = nnx.split(mixtral_jax.Mixtral(MixtralConfig.tiny(n_layers=CONFIG.n_layers + 1), rngs=nnx.Rngs(0)))[0]
    assert HashedOnce.of(other) is not HashedOnce.of(first)
