"""`mixtral-jax serve --lora NAME=DIR --lora NAME2=DIR2` end to end with the `openai` client: /v1/models lists
the base and both adapters, a request's `model` picks its adapter, concurrent requests of both adapters and
the base (batched in the same steps) each answer what the demo model with only that adapter (or none)
generates alone, an unknown model is OpenAI's 404 `model_not_found`, and a --lora that is not a PEFT
adapter of this model stops start-up with the reason."""

import concurrent.futures
import os
import subprocess
import sys
import types

import openai
import pytest

import mixtral_jax
from mixtral_jax.config import RuntimeConfig
from mixtral_jax.convert.peft import write_peft
from mixtral_jax.errors import CheckpointError, ConfigError
from mixtral_jax.loading.demo import DEMO_CONFIG, default_model
from mixtral_jax.model import lora
from mixtral_jax.text.tokenizer import load_tokenizer
from tests.helpers.serve_process import MODEL, post, serve_process
from tests.model.test_lora import trained_like

ADAPTERS = {"sql": lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS),
            "poet": lora.LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "w1", "w2"))}
PROMPTS = ["def read_config(path):", "import os\n\n", "class Queue:"]
NEW = 10


def strong(config, cfg, seed):
    """Adapters that move the trained demo model's confident greedy answers: b 6x `trained_like`'s."""
    return {k: v * 6 if k.endswith(lora.B_SUFFIX) else v for k, v in trained_like(config, cfg, seed).items()}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_peft(root / name, DEMO_CONFIG, cfg, strong(DEMO_CONFIG, cfg, seed=i + 1))
            for i, (name, cfg) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def server(adapter_dirs):
    flags = [f for name, path in adapter_dirs.items() for f in ("--lora", f"{name}={path}")]
    fast = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}  # compiles ~30% faster, same numbers (conftest.py)
    with serve_process(*flags, "--max-batch", "4", "--max-context", "128", "--prefill-chunk", "16",
                       env=fast) as (_, base, _):
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def alone(adapter_dirs):
    """The greedy text of (model, prompt) from the demo model with only that adapter (or none), by the
    sampler (no engine, no server)."""
    from mixtral_jax.convert.peft import load_peft

    tokenizer = load_tokenizer()
    answers = {}
    for model in (MODEL, *ADAPTERS):
        m = default_model(RuntimeConfig(param_dtype="float32"))
        if model != MODEL:
            load_peft(m, adapter_dirs[model])
        for prompt in PROMPTS:
            ids = mixtral_jax.generate(m, [tokenizer.encode(prompt)], max_new_tokens=NEW, stop_tokens=[])[0]
            answers[model, prompt] = tokenizer.decode(ids)
    return answers


def test_models_pick_adapters_batched_together(server, alone):
    base, client = server
    assert [m.id for m in client.models.list().data] == [MODEL, "sql", "poet"]
    asks = [(model, prompt) for prompt in PROMPTS for model in (MODEL, *ADAPTERS)]

    def ask(pair):
        model, prompt = pair
        r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0)
        assert r.model == model and r.choices[0].finish_reason == "length"
        return r.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:  # 9 requests on 4 rows: mixed steps
        together = list(pool.map(ask, asks, timeout=300))
    assert together == [alone[pair] for pair in asks]
    for prompt in PROMPTS:
        assert alone["sql", prompt] != alone[MODEL, prompt] and alone["poet", prompt] != alone[MODEL, prompt]
    chat = client.chat.completions.create(model="poet", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "poet" and chat.choices[0].message.content is not None


def test_unknown_model_is_a_404_model_not_found(server):
    base, client = server
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found" and "'sql'" in e.value.message
    status, body, _ = post(base, "/v1/chat/completions", {"model": "sq", "messages": [{"role": "user",
                                                                                      "content": "hi"}]})
    assert status == 404 and body["error"]["param"] == "model" and body["error"]["type"] == "invalid_request_error"


def test_bad_lora_flags_stop_start_up(tmp_path):
    from mixtral_jax.cli.serve import load_adapters, parse_lora_flags

    assert parse_lora_flags(["a=x", "b=y=z"], MODEL) == {"a": "x", "b": "y=z"}
    for flags, message in [(["a"], "NAME=DIR"), (["=x"], "NAME=DIR"), (["a=x", "a=y"], "taken"),
                           ([f"{MODEL}=x"], "base model")]:
        with pytest.raises(ConfigError, match=message):
            parse_lora_flags(flags, MODEL)
    demo = types.SimpleNamespace(config=DEMO_CONFIG)  # failing before anything is attached
    with pytest.raises(CheckpointError, match=f"--lora a={tmp_path}: .* is not a PEFT adapter"):
        load_adapters(demo, {"a": str(tmp_path)})
    tiny = mixtral_jax.MixtralConfig.tiny()
    other = write_peft(tmp_path / "tiny", tiny, ADAPTERS["sql"], trained_like(tiny, ADAPTERS["sql"]))
    with pytest.raises(CheckpointError, match="--lora b=.*expected"):
        load_adapters(demo, {"b": other})
    # as a user sees it: the command exits 2 with the reason, before serving anything
    run = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "serve", "--lora", f"b={other}"],
                         env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "--lora b=" in run.stderr and "expected" in run.stderr, run.stderr[-2000:]
