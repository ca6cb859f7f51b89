"""The paged continuous-batching engine without HTTP: concurrent greedy answers equal the sampler's for each
request alone (through mixed prefill/decode steps, preemption with a tiny page pool, int8 pages and a
sharded mesh), rows free on finish and cancel, per-row sampling (top_k, top_p, penalties) is reproducible
and equals the batched sampler's where that is deterministic, and bad requests are refused before queueing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.inference import engine as engine_module
from mixtral_jax.inference.engine import Engine, EngineConfig, RequestError, SamplingParams
from mixtral_jax.inference.sampler import Sampler
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.placement import shard_model


def test_warmup_compiles_every_step_shape_and_changes_nothing():
    """After `warmup`, a lone decode, mixed prefill/decode steps, preemption, sampling with penalties and
    logprobs compile nothing more (every shape the scheduler asks for was compiled, once), and the greedy
    answers still equal the sampler's alone (a warm-up step writes, counts and draws nothing)."""
    lengths, new = [5, 40, 12, 3, 44, 9], [30, 20, 25, 32, 18, 31]
    ids = prompts(lengths, seed=7)
    solo = [mixtral_jax.generate(model(), [p], max_new_tokens=n, stop_tokens=[])[0] for p, n in zip(ids, new)]
    graphdef, state = nnx.split(model())  # weights committed to a device, as a loaded checkpoint's are
    loaded = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    engine = Engine(loaded, EngineConfig(max_batch=4, max_context=80, prefill_chunk=16, page_size=4, num_pages=20))
    seen = []
    assert engine.warmup(lambda done, total: seen.append((done, total))) == len(engine.step_shapes)
    assert engine.step_shapes == [(t, w) for t in (4, 8, 16) for w in (4, 8, 16, 20)]
    assert seen[-1] == (12, 12) and engine.stats.steps == 0 and engine.idle
    compiled = engine_module.paged_step._cache_size()
    (alone,), _, _ = submit_all(engine, prompts([3], seed=9), SamplingParams(max_tokens=4, stop_tokens=()))
    steps_until_idle(engine)  # the first shape warmed up (4 slots, 4 pages) as a lone decode runs it
    assert alone.n_generated == 4 and engine_module.paged_step._cache_size() == compiled
    params = [SamplingParams(max_tokens=n, stop_tokens=()) for n in new]
    params.append(SamplingParams(max_tokens=12, temperature=0.8, top_k=5, frequency_penalty=0.5, logprobs=3, seed=1))
    _, outs, _ = submit_all(engine, ids + prompts([7], seed=8), params)
    steps_until_idle(engine)
    assert outs[:-1] == solo and len(outs[-1]) == 12
    assert engine.stats.preemptions >= 1
    assert engine_module.paged_step._cache_size() == compiled
    with pytest.raises(RuntimeError, match="idle"):
        engine.submit(ids[0], params[0])
        engine.warmup()


CONFIG = MixtralConfig.tiny(max_seq_len=128, eos_id=127)  # an EOS the random model rarely picks


@functools.cache
def model():
    return Mixtral(CONFIG, RuntimeConfig(param_dtype="float32"), rngs=nnx.Rngs(3))


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 120, n).tolist() for n in lengths]


def run(engine, max_steps=2000):
    """Step until every request is done (bounded)."""
    for _ in range(max_steps):
        if engine.idle:
            return
        engine.step()
    raise AssertionError("engine did not finish in time")


def submit_all(engine, ids, params):
    outs = [[] for _ in ids]
    reasons = [[] for _ in ids]
    requests = [engine.submit(p, params[i] if isinstance(params, list) else params, on_token=outs[i].append,
                              on_finish=reasons[i].append) for i, p in enumerate(ids)]
    return requests, outs, reasons


def steps_until_idle(engine, max_steps=3000, watch=None):
    """Step until idle; `watch(engine)` after each step."""
    for _ in range(max_steps):
        if engine.idle:
            return
        engine.step()
        if watch is not None:
            watch(engine)
    raise AssertionError("engine did not finish in time")


def test_concurrent_greedy_equals_solo_through_mixed_steps_and_preemption():
    """More requests than rows, prompts longer than a step's token budget, and so few pages (6 of 4
    tokens for prompts up to 44 + 32 tokens) that running requests are preempted and prefilled again,
    several times: every greedy answer equals the sampler's for that request alone."""
    lengths, new = [5, 40, 12, 3, 44, 9, 35], [30, 20, 25, 32, 18, 31, 20]  # few sampler compiles (buckets)
    ids = prompts(lengths)
    solo = [mixtral_jax.generate(model(), [p], max_new_tokens=n, stop_tokens=[])[0] for p, n in zip(ids, new)]
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=80, prefill_chunk=16, page_size=4, num_pages=20))
    params = [SamplingParams(max_tokens=n, stop_tokens=()) for n in new]
    requests, outs, reasons = submit_all(engine, ids, params)
    held = []
    steps_until_idle(engine, watch=lambda e: held.append(e.scheduler.pages_held))
    assert outs == solo
    assert all(r == ["length"] for r in reasons)
    assert engine.stats.preemptions >= 2, "the test should run out of pages"
    assert max(held) <= 20 and engine.scheduler.pages_held == 0
    assert engine.stats.tokens_generated == sum(new) and engine.stats.prompt_tokens == sum(lengths)
    assert engine.busy_slots == 0


def test_prefill_chunks_of_several_requests_and_decodes_share_one_step(monkeypatch):
    """One step holds a running decode and the prefill chunks of two new requests; a long prompt is
    prefilled over several steps while the others decode (no request waits for another's whole prefill)."""
    ids, new = prompts([6, 10, 50], seed=5), [12, 12, 8]
    solo = [mixtral_jax.generate(model(), [p], max_new_tokens=n, stop_tokens=[])[0] for p, n in zip(ids, new)]
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=64, prefill_chunk=16, page_size=8))
    seen = []
    launch = engine._launch
    monkeypatch.setattr(engine, "_launch", lambda plan: seen.append(plan) or launch(plan))
    outs = [[] for _ in ids]
    engine.submit(ids[0], SamplingParams(max_tokens=new[0], stop_tokens=()), on_token=outs[0].append)
    engine.step()
    engine.step()
    for i in (1, 2):
        engine.submit(ids[i], SamplingParams(max_tokens=new[i], stop_tokens=()), on_token=outs[i].append)
    steps_until_idle(engine)
    assert outs == solo
    mixed = seen[2]  # request 0 decoding, 1 prefilling whole, 2 its first chunk
    assert mixed.num_seqs[0] == 3 and mixed.from_prev[0, 0] and mixed.cu_q_lens[0, :4].tolist() == [0, 1, 11, 16]
    long_steps = [p for p in seen if 2 in p.rows[0] and p.num_seqs[0] > 1]
    assert len(long_steps) >= 3  # the 50-token prompt took several steps, beside the decodes


def test_int8_pages_answer_like_the_sampler_with_an_int8_cache():
    """int8 pages (a scale per token and head, quantised as the sampler's int8 cache is) give the same
    greedy tokens as the sampler's int8 cache, through preemption."""
    lengths, new = [5, 40, 12], [30, 20, 25]
    ids = prompts(lengths, seed=1)
    solo = [mixtral_jax.generate(model(), [p], max_new_tokens=n, stop_tokens=[], kv_cache_dtype="int8")[0]
            for p, n in zip(ids, new)]
    engine = Engine(model(), EngineConfig(max_batch=2, max_context=64, prefill_chunk=16, cache_dtype="int8",
                                          page_size=4, num_pages=16))
    assert engine.cache.pages[0].dtype == jnp.int8 and engine.cache.scales[0].dtype == jnp.float32
    _, outs, _ = submit_all(engine, ids, [SamplingParams(max_tokens=n, stop_tokens=()) for n in new])
    run(engine)
    assert outs == solo and engine.stats.preemptions >= 1
    with pytest.raises(RequestError, match="unknown cache_dtype 'int4'"):
        EngineConfig(cache_dtype="int4")


def test_stop_token_and_cancel_free_the_slot_at_once():
    ids = prompts([6, 6])
    engine = Engine(model(), EngineConfig(max_batch=1, max_context=64, prefill_chunk=16))
    free_run = mixtral_jax.generate(model(), [ids[0]], max_new_tokens=20, stop_tokens=[])[0]
    stop = free_run[4]  # the 5th greedy token, used as a stop token: the answer is the 4 before it
    first = free_run.index(stop)
    (r1, r2), outs, reasons = submit_all(engine, ids, [SamplingParams(max_tokens=10, stop_tokens=(stop,)),
                                                       SamplingParams(max_tokens=50, stop_tokens=())])
    run(engine)
    assert outs[0] == free_run[:first] and reasons[0] == ["stop"]
    assert len(outs[1]) == 50 and reasons[1] == ["length"]

    # one slot: a cancelled request frees it for the next one, which then runs to the end
    (r3, r4), outs, reasons = submit_all(engine, ids, SamplingParams(max_tokens=40, stop_tokens=()))
    for _ in range(10):
        engine.step()
    assert 0 < len(outs[0]) < 40 and outs[1] == []
    r3.cancel()
    run(engine)
    assert reasons == [["cancelled"], ["length"]] and len(outs[0]) < 40 and len(outs[1]) == 40


def test_sampling_is_per_slot_and_reproducible_by_seed():
    ids = prompts([7, 7, 7], seed=1)
    ids.append(ids[0])
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=64, prefill_chunk=16))
    # (no top_p here: this random model's next-token distribution is nearly uniform, so a nucleus boundary
    # falls between logits 1e-7 apart, where batch-dependent rounding decides; see the next test for top_p)
    hot = SamplingParams(max_tokens=20, temperature=0.8, seed=11, stop_tokens=())
    _, alone, _ = submit_all(engine, ids[:1], hot)
    run(engine)
    # the same seeded request beside greedy and differently seeded ones draws the same tokens
    mixed = [hot, SamplingParams(max_tokens=20, stop_tokens=()), SamplingParams(max_tokens=20, temperature=1.0,
                                                                                 seed=12, stop_tokens=()), hot]
    _, outs, _ = submit_all(engine, ids, mixed)
    run(engine)
    greedy = mixtral_jax.generate(model(), [ids[1]], max_new_tokens=20, stop_tokens=[])[0]
    assert outs[0] == alone[0] == outs[3]
    assert outs[1] == greedy
    assert outs[2] != outs[0]  # another seed: another draw (20 tokens from a 128-word vocabulary)


def test_top_k_and_penalties_per_slot_equal_the_samplers_answers():
    """Requests with their own top_k and penalties, beside plain ones, through row reuse and preemption:
    each greedy answer (penalties included) equals the batched sampler's for that request exactly, a
    sampled one at top_k 1 is the greedy one, and a seeded sampled one (top_k and penalties) draws what
    the sampler draws for that prompt alone with that seed (the same keys: seed, row 0, token index)."""
    ids = prompts([5, 30, 12, 3, 20, 9], seed=4)
    asks = [dict(repetition_penalty=1.4), dict(), dict(presence_penalty=1.5, frequency_penalty=0.5),
            dict(temperature=0.9, top_k=1, frequency_penalty=2.0), dict(frequency_penalty=-0.5, repetition_penalty=0.8),
            dict(temperature=1.0, top_k=12, repetition_penalty=1.3, seed=77)]
    new = [24, 20, 26, 22, 18, 25]
    sampler = Sampler(model())
    solo = [sampler([p], n, stop_tokens=[], **a)[0] for p, n, a in zip(ids, new, asks)]
    greedy = [sampler([p], n, stop_tokens=[], **(a | dict(temperature=0.0)))[0] for p, n, a in zip(ids, new, asks)]
    plain = [sampler([p], n, stop_tokens=[])[0] for p, n in zip(ids, new)]
    engine = Engine(model(), EngineConfig(max_batch=3, max_context=56, prefill_chunk=16, page_size=4, num_pages=16))
    _, outs, reasons = submit_all(engine, ids, [SamplingParams(max_tokens=n, stop_tokens=(), **a)
                                                for n, a in zip(new, asks)])
    steps_until_idle(engine)
    assert all(r == ["length"] for r in reasons) and engine.stats.preemptions >= 1
    assert outs == solo
    assert solo[3] == greedy[3]  # top_k 1: only the top token can be drawn
    assert all(solo[i] != plain[i] for i in (0, 2, 3, 4, 5)) and solo[1] == plain[1]  # the parameters did act


def test_sampling_is_per_slot_and_reproducible_by_seed_with_top_p():
    """top_p in the engine: a seeded request draws the same tokens alone and beside others, and a tiny
    nucleus (only the top token) is greedy."""
    ids = prompts([7, 7, 7], seed=1)
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=64, prefill_chunk=16))
    # a nucleus that is not on a boundary: this random model's distribution is nearly uniform, so top_p
    # 0.5 over ~128 tokens would fall between logits 1e-7 apart, where batch-dependent rounding decides
    hot = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.999, seed=11, stop_tokens=())
    tiny = SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, seed=3, stop_tokens=())
    _, alone, _ = submit_all(engine, ids[:1], hot)
    run(engine)
    _, outs, _ = submit_all(engine, ids, [hot, tiny, SamplingParams(max_tokens=20, temperature=1.0, seed=5,
                                                                    stop_tokens=())])
    run(engine)
    greedy = mixtral_jax.generate(model(), [ids[1]], max_new_tokens=20, stop_tokens=[])[0]
    assert outs[0] == alone[0] and outs[1] == greedy and outs[2] != outs[0]


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([1, 500], SamplingParams(), "token ids"),
    ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2], SamplingParams(temperature=-1.0), "temperature"),
    ([1, 2], SamplingParams(top_p=0.0), "top_p"),
    ([1, 2], SamplingParams(top_k=0), "top_k"),
    ([1, 2], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    ([1, 2], SamplingParams(presence_penalty=2.5), "presence_penalty"),
    ([1, 2], SamplingParams(frequency_penalty=float("nan")), "frequency_penalty"),
    ([1] * 60, SamplingParams(max_tokens=5), "context of 64"),
    ([1] * 30, SamplingParams(max_tokens=20), "need 4 pages of 16 tokens; a sequence shard of this engine has 3"),
])
def test_bad_requests_are_refused_and_nothing_is_queued(prompt, params, message):
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=64, prefill_chunk=16, num_pages=3))
    with pytest.raises(RequestError, match=message):
        engine.submit(prompt, params)
    assert engine.idle and not engine.waiting


def test_background_thread_serves_and_stops_cleanly():
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=64, prefill_chunk=16))
    engine.start()
    try:
        (r,), outs, reasons = submit_all(engine, prompts([4]), SamplingParams(max_tokens=5, stop_tokens=()))
        for _ in range(600):
            if reasons[0]:
                break
            engine._thread.join(0.05)
        assert reasons == [["length"]] and len(outs[0]) == 5
        (r,), outs, reasons = submit_all(engine, prompts([4]), SamplingParams(max_tokens=60, stop_tokens=()))
    finally:
        engine.stop(drain_seconds=0)
    assert not engine._thread.is_alive()
    assert reasons[0] in (["cancelled"], ["length"])
    with pytest.raises(RequestError, match="shutting down"):
        engine.submit([1, 2], SamplingParams())


@pytest.mark.parametrize("mesh", ["expert=4,tensor=2", "data=2,expert=2,tensor=2"])
def test_on_a_sharded_mesh_equals_one_device(mesh):
    """The simulated 8-device CPU mesh (conftest.py): sequences over data x expert (4 shards, each with its
    rows and pages), KV heads over tensor, the MoE expert-parallel; greedy answers equal the single-device
    sampler's, with shards running out of pages and preempting."""
    ids, new = prompts([5, 14, 9, 10, 7, 12, 6, 11], seed=2), [16, 14, 16, 12, 16, 10, 15, 13]
    solo = [mixtral_jax.generate(model(), [p], max_new_tokens=n, stop_tokens=[])[0] for p, n in zip(ids, new)]
    engine = Engine(shard_model(model(), mesh), EngineConfig(max_batch=8, max_context=32, prefill_chunk=16,
                                                             page_size=4, num_pages=32))
    assert engine.layout.shards == 4 and engine.layout.rows == 2 and engine.layout.pages == 8
    pages = engine.cache.pages[0]
    assert pages.sharding.shard_shape(pages.shape) == (8, 4, 2, 16)  # of 4 KV-head entries (K, V x 2 heads) on each
    _, outs, _ = submit_all(engine, ids, [SamplingParams(max_tokens=n, stop_tokens=()) for n in new])
    shards = set()
    steps_until_idle(engine, watch=lambda e: shards.update(q.shard for q in e.scheduler.seqs.values()))
    assert outs == solo
    assert len(shards) >= 3 and engine.stats.preemptions >= 1


def test_plan_broadcast_round_trip(monkeypatch):
    """What a follower process decodes from process 0's broadcast: rows to free, every admitted row's
    sampling field (a 64-bit seed included) and the step's arrays (the real two-process path runs in
    tests/serving/test_serve.py)."""
    sent = []
    monkeypatch.setattr(engine_module.multihost_utils, "broadcast_one_to_all",
                        lambda x: sent.append(np.array(x)) or sent[0])
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=32, prefill_chunk=16, page_size=4))
    params = SamplingParams(max_tokens=9, temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.3,
                            presence_penalty=-0.5, frequency_penalty=1.75, seed=(1 << 63) + 12345,
                            logit_bias=((7, -100.0), (100, 2.5)), logprobs=5)
    for r in prompts([6, 9], seed=3):
        engine.waiting.append(engine_module.Request(r, params, lambda t: None, lambda r: None))
    plan, admitted = engine.scheduler.plan(engine.waiting)
    orders = engine_module._Orders([1, 3], [(row, params, row == 1) for row, _ in admitted], plan)
    assert engine._broadcast(orders) is orders
    got = engine._broadcast(None)
    assert got.free == [1, 3] and not got.shutdown
    assert [(row, c) for row, _, c in got.admit] == [(0, False), (1, True)]
    for _, p, _ in got.admit:
        assert (p.max_tokens, p.top_k, p.seed, p.logit_bias, p.logprobs) == (9, 40, params.seed, params.logit_bias, 5)
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            assert np.float32(getattr(p, name)) == np.float32(getattr(params, name)), name
    for name in engine_module.StepPlan.ARRAYS:
        np.testing.assert_array_equal(getattr(got.plan, name), getattr(plan, name), err_msg=name)
        assert getattr(got.plan, name).dtype.kind == getattr(plan, name).dtype.kind, name
    sent.clear()  # top_k off comes back off, and the neutral penalties; no step
    engine._broadcast(engine_module._Orders([], [(2, SamplingParams(max_tokens=3), False)]))
    got = engine._broadcast(None)
    _, p, constrained = got.admit[0]
    assert (p.top_k, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (None, 1.0, 0.0, 0.0)
    assert (p.logit_bias, p.logprobs, constrained, got.plan) == ((), None, False, None)


def test_a_failing_step_aborts_every_request_and_refuses_new_ones(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine_module, "paged_step", broken)
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=64, prefill_chunk=16))
    _, outs, reasons = submit_all(engine, prompts([4, 6, 5]), SamplingParams(max_tokens=5, stop_tokens=()))
    with pytest.raises(RuntimeError, match="device lost"):
        engine.run()
    assert reasons == [["abort"]] * 3 and engine.failed
    with pytest.raises(RequestError, match="failed"):
        engine.submit([1, 2], SamplingParams())
