"""Parsing a v3 model's `[TOOL_CALLS]` output into OpenAI-style tool calls, and `chat(tools=...)` end to end.

The reference for the split and the JSON rules is mistral-common's own decoder (`experimental/tools.py`, the one
its FastAPI app uses). The end-to-end tests drive a real (tiny, hand-set) Mixtral through the real sampler: its
weights make each token predict a fixed successor, so greedy decoding writes a chosen tool call.
"""

import json
import re
import warnings

import numpy as np
import pytest

pytest.importorskip("mistral_common")
from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

import mixtral_jax  # noqa: E402
from mixtral_jax import MixtralConfig, RuntimeConfig  # noqa: E402
from mixtral_jax.model.params import assemble_model  # noqa: E402
from mixtral_jax.text.tokenizer import load_tokenizer  # noqa: E402
from mixtral_jax.text.tool_calls import assistant_message, new_call_id  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_CALLS, EOS = 5, 2


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("v3")


@pytest.fixture(scope="module")
def ref():
    return MistralTokenizer.v3()


def output(tok, *segments, content: str = "") -> list[int]:
    """Token ids a model would write: optional text, then `[TOOL_CALLS]` + each segment's text, then `</s>`."""
    ids = tok.encode(content, bos=False) if content else []
    for text in segments:
        ids += [TOOL_CALLS, *tok.encode(text, bos=False)]
    return ids + [EOS]


def reference(ref, ids):
    """mistral-common's reading of the same ids: (content or None, [(id, name, arguments dict)])."""
    raw = ref.instruct_tokenizer.tokenizer
    content, segments = _split_content_and_tool_calls(ids, TOOL_CALLS)
    calls = _decode_tool_calls(segments, raw)
    return (raw.decode(content) if content else None,
            [(c.id, c.function.name, json.loads(c.function.arguments)) for c in calls])


def ours(message):
    return (message["content"], [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                                 for c in message.get("tool_calls", [])])


VALID = [
    ([{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123DEF"}], ""),
    ([{"name": "get_weather", "arguments": {"city": "Köln", "unit": "celsius"}, "id": "Zz9Yy8Xx7"},
      {"name": "get_weather", "arguments": {"city": "東京"}, "id": "q1w2e3r4t"},
      {"name": "web_search", "arguments": {"query": "[INST] </s>", "limit": 3, "nested": {"a": [1, None]}},
       "id": "A1b2C3d4E"}], ""),
    ([{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abc123DEF"}], "Let me check that."),
    ([{"name": "now", "arguments": {}, "id": "n0w0n0w0n"}], ""),
]


@pytest.mark.parametrize("calls,content", VALID, ids=range(len(VALID)))
def test_parse_matches_mistral_common(tok, ref, calls, content):
    ids = output(tok, json.dumps(calls, ensure_ascii=False), content=content)
    message = assistant_message(tok, ids)
    assert message["role"] == "assistant"
    assert ours(message) == reference(ref, ids)
    assert all(c["type"] == "function" and isinstance(c["function"]["arguments"], str) for c in message["tool_calls"])


def test_several_tool_call_segments_and_generated_ids(tok, ref):
    ids = output(tok, json.dumps([{"name": "a", "arguments": {"x": 1}}]),
                 json.dumps([{"name": "b", "arguments": {}}, {"name": "c", "arguments": {"y": "z"}, "id": "bad id"}]))
    message = assistant_message(tok, ids)
    names = [c["function"]["name"] for c in message["tool_calls"]]
    assert names == [name for _, name, _ in reference(ref, ids)[1]] == ["a", "b", "c"]
    call_ids = [c["id"] for c in message["tool_calls"]]
    assert all(re.fullmatch(r"[a-zA-Z0-9]{9}", i) for i in call_ids) and len(set(call_ids)) == 3
    assert message["content"] is None


def test_parsed_message_goes_back_into_the_conversation_as_mistral_common_encodes_it(tok, ref):
    ids = output(tok, json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                  {"name": "get_weather", "arguments": {"city": "Köln"}}], ensure_ascii=False))
    message = assistant_message(tok, ids)
    results = [{"role": "tool", "tool_call_id": c["id"], "content": '{"temp_c": 20}'} for c in message["tool_calls"]]
    messages = [{"role": "user", "content": "Weather in Paris and Köln?"}, message, *results]
    expected = ref.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=[WEATHER])).tokens
    assert tok.encode_chat(messages, [WEATHER]) == expected


BROKEN = [
    '[{"name": "get_weather", "arguments": {"city": "Par',  # cut off
    '{"name": "get_weather", "arguments": {}}',  # not a list
    '[{"arguments": {"city": "Paris"}}]',  # no name
    '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]',  # arguments not an object
    '[{"name": 7, "arguments": {}}]',
    "",  # nothing after the marker
    "get_weather(city='Paris')",
]


@pytest.mark.parametrize("text", BROKEN, ids=range(len(BROKEN)))
def test_broken_tool_calls_come_back_as_text_with_a_warning(tok, ref, text):
    ids = output(tok, text, content="Sure.")
    with pytest.raises(ValueError):  # mistral-common's decoder refuses them ...
        reference(ref, ids)
    with pytest.warns(RuntimeWarning, match="tool call"):  # ... we warn and keep the text
        message = assistant_message(tok, ids)
    assert message == {"role": "assistant", "content": tok.decode(ids)}
    assert "tool_calls" not in message and message["content"].startswith("Sure.")


def test_plain_answers_and_v1_are_text(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert assistant_message(tok, tok.encode("Hello there.", bos=False) + [EOS]) == {
            "role": "assistant", "content": "Hello there."}
        v1 = load_tokenizer("v1")
        ids = v1.encode('[TOOL_CALLS] [{"name": "f", "arguments": {}}]', bos=False)
        assert assistant_message(v1, ids)["content"] == v1.decode(ids)  # v1 has no such control token
        assert assistant_message(tok, [TOOL_CALLS, *tok.encode("[]", bos=False), EOS]) == {
            "role": "assistant", "content": "[]"}
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", new_call_id())


# ----------------------------------------------------------------------------------- chat() end to end
def _spelling(tok, text: str, taken: set[int]) -> list[int]:
    """Token ids that decode to `text`, no id used twice (or in `taken`): text pieces and byte pieces."""
    pieces: dict[str, list[int]] = {}
    for i in range(tok.vocab_size):
        if tok.is_special(i) or i == tok.unk_id:
            continue
        piece = tok._sp.IdToPiece(i)
        if tok.is_byte(i):
            value = int(piece[3:5], 16)
            piece = chr(value) if value < 0x80 else None
        if piece and not piece.startswith("\u2581"):
            pieces.setdefault(piece, []).append(i)

    def search(pos: int, used: set[int]) -> list[int] | None:
        if pos == len(text):
            return []
        for end in range(min(len(text), pos + 12), pos, -1):
            for i in pieces.get(text[pos:end], []):
                if i not in used and (rest := search(end, used | {i})) is not None:
                    return [i, *rest]
        return None

    ids = search(0, set(taken))
    assert ids is not None and tok.decode(ids) == text
    return ids


def successor_model(sequence: list[int], vocab_size: int = 32768) -> mixtral_jax.Mixtral:
    """A real Mixtral whose greedy next token after `sequence[k]` is `sequence[k + 1]` (ids all distinct).

    Attention and experts output zero (their output projections are zero), so the last hidden state is the
    current token's embedding: a one-hot e_k for `sequence[k]`, which the LM head maps to `sequence[k + 1]`.
    """
    assert len(set(sequence)) == len(sequence)
    config = MixtralConfig.tiny(vocab_size=vocab_size, dim=64, n_layers=1, max_seq_len=1024)
    assert len(sequence) <= config.dim

    def array(name, spec):
        a = np.ones(spec.shape, np.float32) if name.endswith("scale") else np.zeros(spec.shape, np.float32)
        for k, token in enumerate(sequence):
            if name == "embed":
                a[token, k] = 1.0
            elif name == "lm_head" and k + 1 < len(sequence):
                a[k, sequence[k + 1]] = 1.0
        return a

    return assemble_model(config, RuntimeConfig(), array)


CALL_TEXT = '[{"name":"get_weather","arguments":{"city":"Paris"}}]'
END_INST = 4


def test_chat_with_tools_returns_openai_tool_calls(tok, ref):
    payload = _spelling(tok, CALL_TEXT, {END_INST, TOOL_CALLS, EOS})
    model = successor_model([END_INST, TOOL_CALLS, *payload, EOS])
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"}]
    reply = mixtral_jax.chat(model, messages, tools=[WEATHER], max_new_tokens=64)  # the v3 tokenizer: vocab 32768
    assert reply["role"] == "assistant" and reply["content"] is None
    (call,) = reply["tool_calls"]
    assert call["type"] == "function" and re.fullmatch(r"[a-zA-Z0-9]{9}", call["id"])
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the same conversation, answered by the tool, encodes as mistral-common encodes it
    messages += [reply, {"role": "tool", "tool_call_id": call["id"], "content": '{"temp_c": 21}'}]
    expected = ref.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=[WEATHER])).tokens
    assert tok.encode_chat(messages, [WEATHER]) == expected
    # without tools=, chat() gives the text (control tokens are not text)
    assert mixtral_jax.chat(model, messages[:2], max_new_tokens=64) == CALL_TEXT


def test_chat_with_a_broken_tool_call_warns_and_returns_text(tok):
    broken = CALL_TEXT[:-6]  # '..."Par'
    payload = _spelling(tok, broken, {END_INST, TOOL_CALLS, EOS})
    model = successor_model([END_INST, TOOL_CALLS, *payload, EOS])
    with pytest.warns(RuntimeWarning, match="not usable"):
        reply = mixtral_jax.chat(model, [{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                                 max_new_tokens=64)
    assert reply == {"role": "assistant", "content": broken}


def test_chat_with_tools_needs_a_v3_tokenizer(tok):
    model = successor_model([END_INST, EOS], vocab_size=32000)
    with pytest.raises(ValueError, match="v1 tokenizer"):
        mixtral_jax.chat(model, [{"role": "user", "content": "hi"}], tools=[WEATHER])


def test_a_tokenizer_larger_than_the_model_is_refused():
    model = successor_model([END_INST, EOS], vocab_size=32000)
    with pytest.raises(mixtral_jax.SamplingError, match="v3 tokenizer has 32768 tokens, the model only 32000"):
        mixtral_jax.chat(model, [{"role": "user", "content": "hi"}], tokenizer=load_tokenizer("v3"))
    with pytest.raises(mixtral_jax.SamplingError, match="model's own tokenizer"):
        mixtral_jax.generate(model, ["hi"], tokenizer=load_tokenizer("v3"))
