"""The OpenAI request fields through the real HTTP server and the official client: n, prompt lists, echo,
logit_bias, seed, user, stream_options; and every field the server does not take is a 400 naming it."""

import json
import urllib.error
import urllib.request

import pytest

from mixtral_jax.loading.demo import default_model
from mixtral_jax.text.tokenizer import load_tokenizer
from tests.helpers.live_server import live_server

MODEL = "demo"
PROMPT = "def read_config(path):"


@pytest.fixture(scope="module")
def server():
    tok = load_tokenizer()
    with live_server(default_model(), tok, MODEL, max_batch=4, max_context=128, prefill_chunk=16) as (base, client, _):
        yield base, client, tok


def post(base, path, body):
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ask(client, **kwargs):
    return client.completions.create(model=MODEL, prompt=kwargs.pop("prompt", PROMPT),
                                     max_tokens=kwargs.pop("max_tokens", 8), **kwargs)


def test_n_samples_and_prompt_lists(server):
    """n seeded samples differ from each other and repeat with the seed; a list of prompts answers each, indexed
    prompt-major, each equal to that prompt asked alone."""
    _, client, _ = server
    three = ask(client, n=3, temperature=1.0, seed=11)
    texts = [c.text for c in three.choices]
    assert [c.index for c in three.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert [c.text for c in ask(client, n=3, temperature=1.0, seed=11).choices] == texts
    assert ask(client, temperature=1.0, seed=11).choices[0].text == texts[0]
    assert three.usage.completion_tokens == 24 and three.usage.prompt_tokens == 8
    prompts = ["import os", PROMPT]
    both = ask(client, prompt=prompts, n=2, temperature=0)
    alone = [ask(client, prompt=p, temperature=0).choices[0].text for p in prompts]
    assert [c.text for c in both.choices] == [alone[0], alone[0], alone[1], alone[1]]
    streamed = list(ask(client, prompt=prompts, n=2, temperature=0, stream=True,
                        stream_options={"include_usage": True}))
    joined = {}
    for chunk in streamed:
        for c in chunk.choices:
            joined[c.index] = joined.get(c.index, "") + c.text
    assert joined == {i: c.text for i, c in enumerate(both.choices)}
    assert streamed[-1].usage.completion_tokens == 32


def test_logit_bias_forces_and_bans_tokens(server):
    _, client, tok = server
    greedy = ask(client, temperature=0, logprobs=0).choices[0]
    first = tok.encode(greedy.logprobs.tokens[0].replace(" ", "\u2581"), bos=False)
    forced = tok.encode("return", bos=False)[0]
    forced_text = ask(client, temperature=0, logit_bias={str(forced): 100}, max_tokens=4).choices[0].text
    assert forced_text.strip() == " ".join(["return"] * 4)
    banned = ask(client, temperature=0, logit_bias={str(t): -100 for t in first}).choices[0].text
    assert banned != greedy.text and not banned.startswith(greedy.logprobs.tokens[0])


def test_echo_user_and_seed(server):
    _, client, _ = server
    plain = ask(client, temperature=0).choices[0].text
    assert ask(client, temperature=0, echo=True).choices[0].text == PROMPT + plain
    assert "".join(c.choices[0].text for c in ask(client, temperature=0, echo=True, stream=True)) == PROMPT + plain
    assert ask(client, temperature=0, user="someone").choices[0].text == plain
    sampled = ask(client, temperature=1.2, seed=5).choices[0].text
    assert ask(client, temperature=1.2, seed=5).choices[0].text == sampled != ask(client, temperature=1.2,
                                                                                   seed=6).choices[0].text


@pytest.mark.parametrize("extra, param", [
    ({"bogus": 1}, "bogus"),
    ({"stop": True}, "stop"), ({"stop": {"a": 1}}, "stop"), ({"stop": 0}, "stop"), ({"stop": False}, "stop"),
    ({"stop": ["a", 3]}, "stop"),
    ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"best_of": 2, "n": 3}, "best_of"),
    ({"echo": True, "logprobs": 1}, "echo"), ({"echo": "yes"}, "echo"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"n": 17}, "n"), ({"user": 5}, "user"), ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"prompt": [[1, 2], "x", 5]}, "prompt"),
])
def test_completion_fields_it_does_not_take_are_400s(server, extra, param):
    base, _, _ = server
    status, error = post(base, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2} | extra)
    assert status == 400 and error["error"]["param"] == param, error
    assert error["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra, param", [
    ({"bogus": 1}, "bogus"), ({"functions": []}, "functions"), ({"audio": {}}, "audio"),
    ({"logprobs": 1}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"modalities": ["audio"]}, "modalities"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"echo": True}, "echo"), ({"stop": True}, "stop"),
])
def test_chat_fields_it_does_not_take_are_400s(server, extra, param):
    base, _, _ = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | extra
    status, error = post(base, "/v1/chat/completions", body)
    assert status == 400 and error["error"]["param"] == param, error


def test_chat_takes_its_optional_fields(server):
    base, _, _ = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
            "temperature": 0, "user": "u", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
            "modalities": ["text"], "parallel_tool_calls": True, "response_format": {"type": "text"}}
    status, reply = post(base, "/v1/chat/completions", body)
    assert status == 200 and reply["usage"]["completion_tokens"] == 3
