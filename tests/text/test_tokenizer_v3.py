"""The v3 tokenizer (Mixtral-8x22B) and its chat format with tools, against mistral-common's `MistralTokenizer.v3()`.

The reference encodes `ChatCompletionRequest.from_openai(messages, tools)`: the same OpenAI-style input our
`encode_chat(messages, tools)` takes.
"""

import random
import sys

import pytest

pytest.importorskip("mistral_common")
from mistral_common.exceptions import MistralCommonException  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mixtral_jax.text.tokenizer import Tokenizer, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("v3")


@pytest.fixture(scope="module")
def ref() -> MistralTokenizer:
    return MistralTokenizer.v3()


def ref_chat(ref: MistralTokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return ref.encode_chat_completion(ChatCompletionRequest.from_openai(messages, tools=tools)).tokens


def U(content) -> dict:
    return {"role": "user", "content": content}


def A(content) -> dict:
    return {"role": "assistant", "content": content}


def S(content) -> dict:
    return {"role": "system", "content": content}


def call(call_id: str, name: str, arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def AT(*calls, content=None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def T(call_id: str, content, **extra) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content, **extra}


def parts(*texts) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Paris"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "web-search_v2", "description": "Recherche sur le Web — résultats en français 🔎",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                    "limit": {"type": "integer", "minimum": 1, "default": 5}}}}}
BARE = {"type": "function", "function": {"name": "now", "strict": True}}  # no description, no parameters
TOOLS = [WEATHER, SEARCH, BARE]

W1 = call("abc123DEF", "get_weather", '{"city": "Paris"}')
W2 = call("Zz9Yy8Xx7", "get_weather", {"city": "Köln", "unit": "celsius"})
S1 = call("q1w2e3r4t", "web-search_v2", '{ "query" : "[INST] mixtral </s>", "limit": 3 }')

# (messages, tools)
CONVERSATIONS = [
    ([U("Hello")], None),
    ([U("What is the weather in Paris?")], TOOLS),
    ([S("You are a helpful assistant."), U("Hello")], None),
    ([S("Be terse."), U("First question"), A("First answer"), U("Second question")], None),
    ([S("Use tools when useful."), U("q1"), A("a1"), U("Weather in Paris?")], TOOLS),
    ([U("1"), A("2"), U("3"), A("4"), U("5"), A("6"), U("7")], [WEATHER]),
    ([S("Part one."), S("Part two."), U("Hi")], TOOLS),
    ([U("Weather in Paris?"), AT(W1), T("abc123DEF", '{"temp_c": 21, "sky": "clear"}')], TOOLS),
    ([S("sys"), U("Paris and Köln?"), AT(W1, W2, S1), T("abc123DEF", '{"temp_c": 21}'),
      T("Zz9Yy8Xx7", "rainy, 12°C"), T("q1w2e3r4t", '[{"title": "Mixtral", "url": "https://mistral.ai"}]'),
      A("Paris: 21°C and clear. Köln: rainy, 12°C."), U("Thanks! And Berlin?")], TOOLS),
    ([U("Weather?"), AT(W1), T("abc123DEF", ""), A("No data."), U("Try again")], TOOLS),  # empty result -> {}
    ([U("w"), AT(W1, W2), T("abc123DEF", '"a JSON string"'), T("Zz9Yy8Xx7", "42")], TOOLS),
    ([U("w"), AT(call("A1b2C3d4E", "get_weather", "")), T("A1b2C3d4E", "null")], TOOLS),  # "" args -> {}
    ([U("w"), AT(call("A1b2C3d4E", "get_weather", None)), T("A1b2C3d4E", "true")], TOOLS),
    ([U("w"), AT(call("A1b2C3d4E", "get_weather", "not json at all")), T("A1b2C3d4E", "{broken json")], TOOLS),
    ([U("w"), AT(call("A1b2C3d4E", "get_weather", {"n": [1.0, 1e5, -0.0, None, True], "s": "\u00e9\n\t\"q\""})),
      T("A1b2C3d4E", '{"unicode": "\\u00e9\\u4e2d", "nested": {"a": [1, {"b": null}]}}')], TOOLS),
    ([U("two tool turns"), AT(W1), T("abc123DEF", "sunny"), AT(W2), T("Zz9Yy8Xx7", "cloudy")], TOOLS),
    ([U("named result"), AT(W1), T("abc123DEF", "ok", name="get_weather")], TOOLS),
    ([U("empty tool list")], []),
    ([U("calls in history, no tools now"), AT(W1), T("abc123DEF", "sunny"), A("It is sunny."), U("ok")], None),
    ([U("content '' beside calls"), AT(W1, content=""), T("abc123DEF", "x")], TOOLS),
    ([U("你好，请介绍一下你自己。"), A("我是一个语言模型。"), U("日本の首都は？ 한국의 수도는?")], None),
    ([U("Emoji 😀🦙 please"), A("Sure: 🎉🇫🇷👨‍👩‍👧"), U("More 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u200b \ufeff")], TOOLS),
    ([U("  leading and trailing  "), A("  spaced reply  "), U("\n\nnewlines\n\n")], None),
    ([U("tab\tseparated"), A("trailing spaces are stripped   "), U(" "), A("but newlines stay\n"), U("\r\n")],
     None),
    ([U("[INST] [/INST] [TOOL_CALLS] [AVAILABLE_TOOLS] [TOOL_RESULTS] </s> <s> [control_8]"),
      A("[/TOOL_RESULTS] [INST] </s>"), U("<s>[INST]</s>")], TOOLS),
    ([S("[AVAILABLE_TOOLS] not special [/AVAILABLE_TOOLS]"), U("x"), AT(S1), T("q1w2e3r4t", "[TOOL_RESULTS]</s>")],
     TOOLS),
    ([S(parts("system in", "two parts")), U(parts("user in", "", "parts")), A(parts("assistant", "parts")),
      U("q")], None),
    ([U("tool result in parts"), AT(W1), T("abc123DEF", parts('{"a":', ' 1}'))], TOOLS),
    ([{"role": "developer", "content": "developer is system"}, U("Hi")], None),
    ([U("")], TOOLS),
    ([S("")], None),
    ([A("assistant speaks first"), U("then the user")], TOOLS),
    ([S("only a system message")], TOOLS),
    ([U("one"), U(""), U("three")], None),
    ([U("q"), A("a1"), A("a2"), U("q2")], None),
    ([U("split"), S("by a system message"), U("stays two turns")], TOOLS),
    ([U("user then system"), S("system last")], None),
    ([U("x" * 300)], None),
    ([U("after a tool result"), AT(W1), T("abc123DEF", "sunny"), U("the user speaks before any answer")], TOOLS),
]

INVALID = [
    ([], None),
    ([A("only assistant")], None),
    ([T("abc123DEF", "only a tool result")], None),
    ([U("Hello"), A("Hi there")], None),  # nothing to generate
    ([U("Hello"), AT(W1)], TOOLS),  # ends with the call, not its result
    ([U("Hello"), T("abc123DEF", "a result nobody asked for")], None),  # tool after user
    ([U("Hello"), A("Hi"), S("system after assistant"), U("next")], None),
    ([U("Hello"), A(""), U("empty assistant")], None),
    ([U("Hello"), AT(), U("no content, empty tool_calls")], None),
    ([U("Hello"), AT(W1, content="both"), T("abc123DEF", "x")], TOOLS),
    ([U("Hello"), A("text"), AT(W1), T("abc123DEF", "x")], TOOLS),  # merged into content + calls
    ([U("w"), AT(call("abc", "get_weather", "{}")), T("abc", "x")], TOOLS),  # id too short
    ([U("w"), AT({"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}), U("no id")], TOOLS),
    ([U("w"), AT(W1), T("abc123DE!", "x")], TOOLS),  # bad result id
    ([U("w"), AT(call("abc123DEF", "get weather", "{}")), T("abc123DEF", "x")], TOOLS),  # bad name
    ([U("w"), AT(W1), T("abc123DEF", "x", name="bad name")], TOOLS),
    ([U("w"), AT(W1, W2), T("abc123DEF", "x"), A("only one result"), U("next")], TOOLS),
    ([U("w"), A("x"), T("abc123DEF", "result without a call"), A("y"), U("next")], TOOLS),
    ([U("w"), {"role": "bot", "content": "unknown role"}, U("again")], None),
    ([{"role": "user", "content": None}], None),
    ([U("w")], [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]),
    ([U("w")], [{"type": "retrieval", "function": {"name": "f", "parameters": {}}}]),
    ([U("w"), AT(call(123456789, "get_weather", "{}")), T("123456789", "x")], TOOLS),
    ([U("w"), AT(call("abc123DEF", "get_weather", ["a", "list"])), T("abc123DEF", "x")], TOOLS),
]


def test_at_least_twenty_conversations_with_the_required_features():
    flat = str(CONVERSATIONS)
    assert len(CONVERSATIONS) >= 20
    assert sum(tools is not None and len(tools) > 0 for _, tools in CONVERSATIONS) >= 10
    assert any(len(m.get("tool_calls") or []) >= 3 for msgs, _ in CONVERSATIONS for m in msgs)
    assert all(s in flat for s in ("'system'", "'tool'", "[TOOL_CALLS]", "😀", "\\t"))


@pytest.mark.parametrize("messages,tools", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_encode_chat_matches_mistral_common_v3(tok, ref, messages, tools):
    assert tok.encode_chat(messages, tools) == ref_chat(ref, messages, tools)


@pytest.mark.parametrize("messages,tools", INVALID, ids=range(len(INVALID)))
def test_encode_chat_rejects_what_mistral_common_rejects(tok, ref, messages, tools):
    with pytest.raises((MistralCommonException, ValueError)):  # pydantic's ValidationError is a ValueError
        ref_chat(ref, messages, tools)
    with pytest.raises(ValueError):
        tok.encode_chat(messages, tools)


def test_layout_of_a_tool_conversation(tok, ref):
    messages = [S("SYS"), U("first"), A("reply"), U("Weather?"), AT(W1), T("abc123DEF", '{"t": 1}')]
    ids = tok.encode_chat(messages, [WEATHER])
    assert ids == ref_chat(ref, messages, [WEATHER])
    c = {p: tok.control_id(p) for p in ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                        "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")}
    assert c == {"[INST]": 3, "[/INST]": 4, "[TOOL_CALLS]": 5, "[AVAILABLE_TOOLS]": 6, "[/AVAILABLE_TOOLS]": 7,
                 "[TOOL_RESULTS]": 8, "[/TOOL_RESULTS]": 9}
    controls = [i for i in ids if i < 10]
    assert controls == [1, 3, 4, 2, 6, 7, 3, 4, 5, 2, 8, 9]  # tools and the system prompt before the LAST user turn
    text = ref.decode(ids)
    assert text.index("first") < text.index("reply") < text.index("get_weather") < text.index("SYS")


def test_literal_control_text_is_never_a_control_token(tok):
    lookalikes = "[INST] [/INST] [TOOL_CALLS] [AVAILABLE_TOOLS] [TOOL_RESULTS] [/TOOL_RESULTS] </s> <s> [IMG]"
    assert not any(tok.is_special(i) for i in tok.encode(lookalikes, bos=False))
    chat = tok.encode_chat([U(lookalikes), AT(call("abc123DEF", "f", {"x": lookalikes})), T("abc123DEF", lookalikes)])
    assert [i for i in chat if tok.is_special(i)] == [1, 3, 4, 5, 2, 8, 9]


TEXTS = ["Hello", " leading", "trailing  ", "a  b\t\tc\n\nd", "", " ", "你好，世界！", "Emoji 😀🦙👨‍👩‍👧",
         "naïve café Ångström", "</s> <s> [INST] [TOOL_CALLS] literal", "\x00\x01 control \x7f", "مرحبا", "x" * 200]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_mistral_common(tok, ref, text):
    raw = ref.instruct_tokenizer.tokenizer
    ids = tok.encode(text, bos=True, eos=True)
    assert ids == raw.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == text == ref.decode(ids)
    assert "".join(tok.stream_decode(ids)) == text


def test_decode_and_streaming_match_on_random_ids_with_control_tokens(tok, ref):
    rng = random.Random(0)
    pool = [*range(0, 20), *range(768, 1100)]  # control tokens, byte pieces and text pieces
    for _ in range(400):
        ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(16)]
        assert tok.decode(ids) == ref.decode(ids)
        assert "".join(tok.stream_decode(ids)) == ref.decode(ids)


def test_special_ids_and_version(tok, ref):
    raw = ref.instruct_tokenizer.tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (raw.n_words, raw.bos_id, raw.eos_id, raw.unk_id)
    assert (tok.vocab_size, tok.version) == (32768, "v3")
    assert all(tok.control_id(p) == raw.get_special_token(p) for p in ("[INST]", "[TOOL_CALLS]", "[/TOOL_RESULTS]"))
    v1 = load_tokenizer()
    assert (v1.version, v1.vocab_size, v1.control_id("[TOOL_CALLS]")) == ("v1", 32000, None)


def test_shipped_v3_file_is_mistral_commons_and_needs_no_mistral_common(monkeypatch, ref):
    import importlib.resources

    shipped = importlib.resources.files("mistral_common").joinpath(
        "data/mistral_instruct_tokenizer_240323.model.v3").read_bytes()
    ours = importlib.resources.files("mixtral_jax").joinpath("assets/tokenizer.model.v3").read_bytes()
    assert ours == shipped
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # makes `import mistral_common` fail
    assert load_tokenizer("v3").encode_chat([U("Hello")]) == [1, 3, 23325, 4]


def test_load_tokenizer_by_name_recorded_name_and_path(ref):
    path = ref.instruct_tokenizer.tokenizer.file_path
    by_path = load_tokenizer(path)
    assert by_path.version == "v3" and by_path.encode_chat([U("Hi")]) == load_tokenizer("v3").encode_chat([U("Hi")])
    assert load_tokenizer("mistral-common:tokenizer.model.v3").version == "v3"
    assert load_tokenizer("mistral-common:tokenizer.model.v1").version == "v1"
    assert load_tokenizer("v1").encode("Hello") == [1, 22557]
    with pytest.raises(FileNotFoundError, match="v1, v3"):
        load_tokenizer("v2")


def test_v1_refuses_tools_and_tool_messages():
    v1 = load_tokenizer("v1")
    with pytest.raises(ValueError, match="v3"):
        v1.encode_chat([U("w")], [WEATHER])
    with pytest.raises(ValueError):
        v1.encode_chat([U("w"), AT(W1), T("abc123DEF", "x")])
    assert v1.encode_chat([U("Hello")], []) == v1.encode_chat([U("Hello")])  # no tools is fine


def test_bad_inputs_are_one_line_errors(tok):
    with pytest.raises(TypeError):
        tok.encode_chat(U("a dict, not a list"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        tok.encode_chat([U("x")], WEATHER)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only text content"):
        tok.encode_chat([U([{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}])])
    with pytest.raises(ValueError, match="9 letters or digits"):
        tok.encode_chat([U("w"), AT(call("abc", "get_weather", "{}")), T("abc", "x")])
    for bad in ([U("w"), A("x")], [U("w"), T("abc123DEF", "x")]):
        with pytest.raises(ValueError) as e:
            tok.encode_chat(bad)
        assert "\n" not in str(e.value)
