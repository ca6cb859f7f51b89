"""The engine over stacked LoRA adapters: greedy requests of adapter A, adapter B and the base, running in the
same steps, each answer what an engine over a model with only that adapter (or the bare base) answers for the
request alone; the prefix cache never hands one adapter's pages to another; sharded over a mesh it answers as
one device."""

import functools

import jax
import pytest
from flax import nnx

from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.inference.engine import Engine, EngineConfig, RequestError, SamplingParams
from mixtral_jax.model import lora
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.placement import shard_model
from tests.inference.test_engine import prompts, steps_until_idle, submit_all
from tests.model.test_lora import trained_like, with_runtime

CONFIG = MixtralConfig.tiny(max_seq_len=128, eos_id=127)
A = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)
B = lora.LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "o_proj", "w1"))
# pages of 16: every page table is 4 wide; prompts of 9-16 tokens: every step has 16 token slots or 4 (decodes),
# so each engine compiles two step shapes
ENGINE = EngineConfig(max_batch=4, max_context=64, prefill_chunk=16, page_size=16)


@functools.cache
def base():
    return Mixtral(CONFIG, RuntimeConfig(param_dtype="float32"), rngs=nnx.Rngs(3))


def adapters():
    return {"a": (A, trained_like(CONFIG, A, 1)), "b": (B, trained_like(CONFIG, B, 2))}


@pytest.fixture(scope="module")
def solo():
    """answer(prompt, max_tokens, adapter) from an engine over the base alone or with only that adapter,
    one request at a time."""
    engines = {None: Engine(base(), ENGINE)}
    for name, (cfg, arrays) in adapters().items():
        engines[name] = Engine(lora.add_adapters(with_runtime(base()), cfg, arrays), ENGINE)

    def answer(prompt, n, adapter):
        _, (out,), _ = submit_all(engines[adapter], [prompt], SamplingParams(max_tokens=n, stop_tokens=()))
        steps_until_idle(engines[adapter])
        return out

    return answer


@pytest.fixture(scope="module")
def stacked():
    return lora.stack_adapters(with_runtime(base()), adapters())


def test_mixed_adapters_in_one_step_equal_each_served_alone(solo, stacked):
    ids = prompts([12, 16, 9, 14, 10, 11], seed=2)
    new = [14, 10, 16, 12, 15, 9]
    picks = ["a", None, "b", "a", "b", None]
    engine = Engine(stacked, ENGINE)
    assert engine.adapters == ("a", "b")
    seen = []
    launch = engine._launch
    engine._launch = lambda plan: seen.append(plan) or launch(plan)
    outs = [[] for _ in ids]
    for i, p in enumerate(ids):
        engine.submit(p, SamplingParams(max_tokens=new[i], stop_tokens=()), on_token=outs[i].append,
                      adapter=picks[i])
    steps_until_idle(engine)
    expected = [solo(p, n, a) for p, n, a in zip(ids, new, picks, strict=True)]
    assert outs == expected
    assert any({0, 1, 2} <= set(p.adapter[p.rows[0][p.rows[0] >= 0]].tolist()) for p in seen)  # all in one step
    base_answers = [solo(p, n, None) for p, n in zip(ids, new, strict=True)]
    assert all(outs[i] != base_answers[i] for i in range(len(ids)) if picks[i] is not None)  # adapters act


def test_prefix_cache_is_per_adapter(solo, stacked):
    """The same 17-token prompt under a, then b, then the base, then a again: only the repeat under a reuses
    pages (b's and the base's keys differ from a's), and every answer is its adapter's own."""
    engine = Engine(stacked, ENGINE)
    prompt = prompts([17], seed=9)[0]
    hits = []
    for adapter in ("a", "b", None, "a"):
        _, (out,), _ = submit_all(engine, [prompt], SamplingParams(max_tokens=6, stop_tokens=()))
        engine.waiting[-1].adapter = engine.adapter_index(adapter)  # (submit_all takes no adapter)
        steps_until_idle(engine)
        hits.append(engine.stats.prefix_hit_tokens)
        assert out == solo(prompt, 6, adapter), adapter
    assert hits == [0, 0, 0, 16]
    with pytest.raises(RequestError, match="no LoRA adapter 'c'; loaded: a, b"):
        engine.submit(prompt, SamplingParams(max_tokens=2), adapter="c")
    with pytest.raises(RequestError, match="loaded: \\(none\\)"):
        Engine(base(), ENGINE).adapter_index("a")


needs_mesh = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU mesh from conftest.py")


@pytest.mark.slow
@needs_mesh
def test_sharded_engine_equals_one_device(stacked):
    """Sequences over data x expert (4 shards), the experts and the masks expert-parallel, the hidden
    dimension over tensor: the same tokens as one device."""
    ids, picks = prompts([12, 16, 9, 14], seed=2), ["a", None, "b", "a"]
    answers = []
    for model in (stacked, shard_model(stacked, "data=2,expert=2,tensor=2")):
        engine = Engine(model, ENGINE)
        outs = [[] for _ in ids]
        for i, p in enumerate(ids):
            engine.submit(p, SamplingParams(max_tokens=8, stop_tokens=()), on_token=outs[i].append,
                          adapter=picks[i])
        steps_until_idle(engine)
        answers.append(outs)
    assert answers[0] == answers[1]
