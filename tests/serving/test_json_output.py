"""response_format through the real HTTP server: the demo model (which writes Python, never JSON, by itself)
answers JSON that parses, and validates against the schema, greedy and sampled, streamed and not."""

import json

import jsonschema
import openai
import pytest

from mixtral_jax.loading.demo import default_model
from mixtral_jax.text.tokenizer import load_tokenizer
from tests.helpers.live_server import live_server

MODEL = "demo"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "size": {"type": "integer", "minimum": 0, "maximum": 1000},
    "kind": {"enum": ["file", "dir", "link"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["name", "size", "kind", "tags"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "def read_config(path):"}]


@pytest.fixture(scope="module")
def client():
    with live_server(default_model(), load_tokenizer(), MODEL, max_batch=4, max_context=256,
                     prefill_chunk=16) as (_, client, _):
        yield client


def test_unconstrained_output_is_not_json(client):
    text = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.choices[0].message.content)


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=1),
                                      dict(temperature=1.3, seed=2)])
def test_json_schema_output_validates(client, sampling):
    fmt = {"type": "json_schema", "json_schema": {"name": "entry", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, response_format=fmt,
                                           **sampling)
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    streamed = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, response_format=fmt,
                                              stream=True, **sampling)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == reply.choices[0].message.content


def test_json_object_output_parses_in_every_choice(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200, temperature=1.0, seed=4,
                                           n=4, response_format={"type": "json_object"})
    assert len(reply.choices) == 4
    for c in reply.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict)


@pytest.mark.parametrize("fmt", [{"type": "xml"}, {"type": "json_schema"}, "json",
                                 {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}])
def test_bad_response_formats_are_400s(client, fmt):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, response_format=fmt)
    assert e.value.body["param"] == "response_format"
