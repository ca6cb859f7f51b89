"""Function calling through the real HTTP server and the official client on a tiny random 8x22B-shaped model
(the v3 tokenizer). A random model never calls a tool by itself, so the call is forced by a named (or
"required") tool_choice: a grammar holds the output to `[TOOL_CALLS]` and the function's JSON."""

import json

import jsonschema
import openai
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral_jax.config import MixtralConfig
from mixtral_jax.loading.demo import default_model
from mixtral_jax.text.tokenizer import load_tokenizer
from tests.helpers.live_server import live_server

MODEL = "tiny-8x22b"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                           "parameters": {"type": "object", "properties": {
                                               "zone": {"type": "string", "maxLength": 8}},
                                               "required": ["zone"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(reference):
    model = reference(MixtralConfig.tiny(vocab_size=32768)).model()
    with live_server(model, load_tokenizer("v3"), MODEL, max_batch=4, max_context=256, prefill_chunk=64) as live:
        yield live


def mistral_common_tokens(messages, tools):
    request = ChatCompletionRequest.from_openai(messages, tools=tools)
    return MistralTokenizer.v3().encode_chat_completion(request).tokens


def test_prompt_tokens_are_mistral_commons_encoding(server):
    """The request with tools is encoded as mistral-common encodes it (the engine sees exactly those ids)."""
    _, client, engine = server
    seen = []
    submit = engine.submit
    engine.submit = lambda prompt, *a, **k: seen.append(list(prompt)) or submit(prompt, *a, **k)
    try:
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=2, temperature=0)
    finally:
        engine.submit = submit
    assert seen == [mistral_common_tokens(ASK, TOOLS)]
    assert reply.usage.prompt_tokens == len(seen[0]) > 40


def test_tool_call_round_trip(server):
    """A forced call comes back as tool_calls (finish_reason "tool_calls") whose arguments validate; the call and
    its result go back in the next turn (encoded as mistral-common does), which answers in text."""
    _, client, engine = server
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=80,
                                           temperature=0.8, seed=3)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and len(call.id) == 9
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    turn = ASK + [choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    seen = []
    submit = engine.submit
    engine.submit = lambda prompt, *a, **k: seen.append(list(prompt)) or submit(prompt, *a, **k)
    try:
        answer = client.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, tool_choice="none",
                                                max_tokens=6, temperature=0)
    finally:
        engine.submit = submit
    assert seen == [mistral_common_tokens(turn, TOOLS)]
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"


def test_required_tool_choice_calls_some_tool(server):
    _, client, _ = server
    for seed in (1, 2):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                               max_tokens=80, temperature=1.0, seed=seed)
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and calls
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_streamed_tool_call_deltas(server):
    """Streamed as OpenAI streams a call: id, type and name first, then the arguments in pieces; together they
    equal the same request's answer unstreamed."""
    _, client, _ = server
    kwargs = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=80, temperature=0.8, seed=3)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for c in chunks if c.choices and c.choices[0].delta.tool_calls for d in c.choices[0].delta.tool_calls]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    pieces = [d.function.arguments for d in deltas[1:]]
    assert len(pieces) > 3 and all(d.index == 0 for d in deltas)
    assert json.loads("".join(pieces)) == json.loads(whole.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_on_a_v1_model_are_a_400():
    with live_server(default_model(), load_tokenizer(), "demo", max_batch=1, max_context=64,
                     prefill_chunk=16) as (_, client, _):
        with pytest.raises(openai.BadRequestError, match="v3 tokenizer") as e:
            client.chat.completions.create(model="demo", messages=ASK, tools=TOOLS, max_tokens=4)
    assert e.value.body["param"] == "tools"


@pytest.mark.parametrize("extra, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="sometimes"), "tool_choice"),
    (dict(tool_choice=NAMED, response_format={"type": "json_object"}), "response_format"),
])
def test_bad_tool_requests_are_400s(server, extra, param):
    _, client, _ = server
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=4, **extra)
    assert e.value.body["param"] == param
