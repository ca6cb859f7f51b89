"""The engine's prefix cache on a model: a shared system prompt is prefilled once and the answers that reuse
its pages equal the sampler's for each request alone; the `n` choices the server builds for one request
(serving/protocol.py) share their prompt's prefill; LRU eviction under a small pool keeps answers exact."""

import functools

import numpy as np
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.inference.engine import Engine, EngineConfig, SamplingParams
from mixtral_jax.loading.demo import default_model
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.serving.protocol import choice_params, parse_request
from mixtral_jax.text.tokenizer import tokenizer_for

CONFIG = MixtralConfig.tiny(max_seq_len=128, eos_id=127)


@functools.cache
def model():
    return Mixtral(CONFIG, RuntimeConfig(param_dtype="float32"), rngs=nnx.Rngs(3))


def _serve(engine, prompts, params):
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.submit(p, params[i] if isinstance(params, list) else params, on_token=outs[i].append)
    for _ in range(3000):
        if engine.idle:
            return outs
        engine.step()
    raise AssertionError("engine did not finish in time")


def test_a_shared_system_prompt_is_prefilled_once_and_answers_stay_exact():
    rng = np.random.default_rng(7)
    system = rng.integers(3, 120, 37).tolist()
    prompts = [system + rng.integers(3, 120, n).tolist() for n in (4, 9, 2, 6)]
    new = 12
    solo = [mixtral_jax.generate(model(), [p], max_new_tokens=new, stop_tokens=[])[0] for p in prompts]
    engine = Engine(model(), EngineConfig(max_batch=4, max_context=64, prefill_chunk=16, page_size=8))
    params = SamplingParams(max_tokens=new, stop_tokens=())
    first = _serve(engine, prompts[:1], params)
    assert engine.stats.prefix_hit_tokens == 0
    rest = _serve(engine, prompts[1:], params)
    assert first + rest == solo
    assert engine.stats.prefix_hit_tokens == 3 * 32  # the system prompt's 4 full pages, for each later request
    # a request with penalties counts every prompt token, so it prefills its whole prompt (and is exact)
    penalised = SamplingParams(max_tokens=new, stop_tokens=(), presence_penalty=1.0)
    expected = mixtral_jax.generate(model(), [prompts[0]], max_new_tokens=new, stop_tokens=[], presence_penalty=1.0)
    assert _serve(engine, prompts[:1], penalised) == expected and engine.stats.prefix_hit_tokens == 3 * 32


def test_eviction_under_a_small_pool_keeps_answers_exact():
    """A pool too small to keep every prompt's pages: cached pages are reclaimed least recently used first,
    and a later repeat of an evicted prompt is prefilled again, correctly."""
    rng = np.random.default_rng(8)
    prompts = [rng.integers(3, 120, 30).tolist() for _ in range(3)]
    prompts += [prompts[2], prompts[0]]  # [2] is still cached when it comes back; [0] was evicted
    solo = [mixtral_jax.generate(model(), [p], max_new_tokens=6, stop_tokens=[])[0] for p in prompts[:3]]
    engine = Engine(model(), EngineConfig(max_batch=1, max_context=40, prefill_chunk=16, page_size=8, num_pages=8))
    hits = []
    for p in prompts:
        before = engine.stats.prefix_hit_tokens
        assert _serve(engine, [p], SamplingParams(max_tokens=6, stop_tokens=())) == [solo[prompts.index(p)]]
        hits.append(engine.stats.prefix_hit_tokens - before)
    assert hits == [0, 0, 0, 24, 0]


def test_the_n_choices_of_one_request_share_their_prompts_prefill():
    """`n: 3` as the server parses it (three engine requests, one per choice, submitted one after another):
    the first prefills the prompt, the other two wait for its pages and take them; greedy, all three are
    the sampler's answer."""
    demo = default_model(RuntimeConfig(param_dtype="float32"))
    tokenizer = tokenizer_for(demo)
    engine = Engine(demo, EngineConfig(max_batch=4, max_context=256, prefill_chunk=32, page_size=16))
    text = "def read_config(path):\n    \"\"\"Read the configuration file at path and return a dict.\"\"\"\n" * 2
    parsed = parse_request({"model": "demo", "prompt": text, "n": 3, "max_tokens": 10, "temperature": 0},
                           chat=False, model_name="demo", tokenizer=tokenizer, engine=engine)
    (prompt,) = parsed.prompts
    assert parsed.n == 3 and len(prompt) > 40
    outs = _serve(engine, [prompt] * 3, [choice_params(parsed, i) for i in range(3)])
    shared = (len(prompt) - 1) // 16 * 16
    assert engine.stats.prefix_hit_tokens == 2 * shared
    assert engine.stats.prompt_tokens == 3 * len(prompt)
    expected = mixtral_jax.generate(demo, [prompt], max_new_tokens=10)[0]
    assert outs == [expected] * 3
