"""mixtral_jax.text.tokenizer against mistral-common's own v1 tokenizer (the reference Mixtral uses)."""

import random
import sys

import pytest

pytest.importorskip("mistral_common")
from mistral_common.exceptions import MistralCommonException  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mixtral_jax.text.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def ref() -> MistralTokenizer:
    return MistralTokenizer.v1()


def ref_chat(ref: MistralTokenizer, messages: list[dict]) -> list[int]:
    return ref.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def U(content: str) -> dict:
    return {"role": "user", "content": content}


def A(content: str) -> dict:
    return {"role": "assistant", "content": content}


def S(content: str) -> dict:
    return {"role": "system", "content": content}


TEXTS = [
    "Hello",
    "Hello, world!",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "a  b   c\t\td",
    "line one\nline two\n\n\nend\n",
    "\r\nwindows\r\n",
    "",
    " ",
    "\n",
    "你好，世界！我们今天讨论混合专家模型。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "naïve café, façade, Ångström, Ťžőű, straße",
    "Emoji 😀🦙👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u200b zero-width \ufeff bom",
    "</s> <s> [INST] [/INST] <unk> literal specials",
    "[INST] nested [/INST]</s><s>",
    "Code: def f(x):\n    return x ** 2  # ✓",
    "Math: ∑ᵢ xᵢ² ≤ ∞, π ≈ 3.14159",
    "\x00\x01 control chars \x7f",
    "مرحبا بالعالم",
    "Привет, мир!",
]

CONVERSATIONS = [
    [U("Hello")],
    [U("What is the capital of France?")],
    [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke.")],
    [U("1"), A("2"), U("3"), A("4"), U("5"), A("6"), U("7")],
    [S("You are a helpful assistant."), U("Hello")],
    [S("Be terse."), U("First question"), A("First answer"), U("Second question")],
    [U("First question"), A("First answer"), U("Second question"), S("Late system prompt")],
    [S("Part one."), S("Part two."), U("Hi")],
    [S(""), U("empty system prompt is ignored")],
    [U("你好，请介绍一下你自己。"), A("我是一个语言模型。"), U("谢谢！")],
    [U("日本の首都は？"), A("東京です。"), U("한국의 수도는?")],
    [U("Emoji 😀🦙 please"), A("Sure: 🎉🇫🇷👨‍👩‍👧"), U("More 𝔘𝔫𝔦𝔠𝔬𝔡𝔢")],
    [S("Réponds en français, s'il te plaît."), U("Qu'est-ce qu'une crème brûlée ?")],
    [U("  leading and trailing  "), A("  spaced reply  "), U("\n\nnewlines\n\n")],
    [U("tab\tseparated\tvalues"), A("ok\n"), U(" ")],
    [U("")],
    [U("Please print </s> and [INST] literally"), A("Here: </s> [INST] [/INST] <s>"), U("</s>")],
    [S("[INST] not special [/INST]"), U("<s>[INST]</s>")],
    [U("مرحبا"), A("Привет"), U("Γειά σου")],
    [U("x" * 300)],
    [U("Code:\n```python\nprint('hi')\n```"), A("```\nhi\n```"), U("Thanks")],
    [U("\x00\x7f control"), A("\u200b zero width"), U("\ufeff bom")],
    # Accepted by mistral-common although not strictly alternating; mirrored, not rejected.
    [U("one"), U("two")],
    [U("one"), U(""), U("three")],
    [U("q"), A("a1"), A("a2"), U("q2")],
    [A("assistant speaks first"), U("then the user")],
    [S("only a system message")],
    [U("user then system"), S("system after user")],
    [U("split"), S("by a system message"), U("stays two turns")],
]

INVALID_CONVERSATIONS = [
    [],
    [A("only assistant")],
    [U("Hello"), A("Hi there")],  # ends in assistant: nothing to generate
    [S("sys"), U("Hello"), A("Hi"), A("again")],
    [U("Hello"), A("Hi"), S("system after assistant"), U("next")],
    [U("Hello"), A(""), U("empty assistant")],
    [{"role": "tool", "content": "v1 has no tools"}],
    [U("Hello"), A("Hi"), {"role": "tool", "content": "v1 has no tools"}, U("again")],
    [U("Hello"), {"role": "bot", "content": "unknown role"}, U("again")],
    [{"role": "user", "content": None}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_encode_chat_matches_mistral_common(tok, ref, messages):
    assert tok.encode_chat(messages) == ref_chat(ref, messages)


@pytest.mark.parametrize("messages", INVALID_CONVERSATIONS, ids=range(len(INVALID_CONVERSATIONS)))
def test_encode_chat_rejects_what_mistral_common_rejects(tok, ref, messages):
    with pytest.raises((MistralCommonException, ValueError)):  # pydantic's ValidationError is a ValueError
        ref_chat(ref, messages)
    with pytest.raises(ValueError):
        tok.encode_chat(messages)


def test_encode_chat_ground_truth(tok):
    assert tok.encode_chat([U("Hello")]) == [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]


def test_system_prompt_goes_to_first_user_turn(tok, ref):
    messages = [S("SYSTEM"), U("first"), A("reply"), U("second")]
    ids = tok.encode_chat(messages)
    assert ids == ref_chat(ref, messages)
    text = tok.decode(ids)
    assert text.index("SYSTEM") < text.index("first") < text.index("second")
    assert text.count("SYSTEM") == 1


def test_literal_special_text_is_not_special(tok, ref):
    messages = [U("</s><s>[INST]"), A("[/INST]</s>"), U("<s>")]
    ids = tok.encode_chat(messages)
    assert ids == ref_chat(ref, messages)
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1  # only the real <s> and turn-ending </s>
    assert tok.eos_id not in tok.encode("</s>") and tok.bos_id not in tok.encode("<s>", bos=False)


def test_special_ids(tok, ref):
    raw = ref.instruct_tokenizer.tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (raw.n_words, raw.bos_id, raw.eos_id, raw.unk_id)
    assert (tok.bos_id, tok.eos_id) == (1, 2)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("bos,eos", [(True, False), (False, False), (True, True)])
def test_encode_matches_mistral_common(tok, ref, text, bos, eos):
    assert tok.encode(text, bos=bos, eos=eos) == ref.instruct_tokenizer.tokenizer.encode(text, bos=bos, eos=eos)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tok, ref, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert tok.decode(ids) == text == ref.decode(ids)


def test_decode_matches_mistral_common_on_random_ids(tok, ref):
    rng = random.Random(0)
    for _ in range(500):
        ids = [rng.randrange(tok.vocab_size) if rng.random() < 0.5 else rng.randrange(300) for _ in range(20)]
        assert tok.decode(ids) == ref.decode(ids)


def test_decode_split_byte_fallback(tok, ref):
    ids = tok.encode("🦙", bos=False)  # "▁" + four <0x..> byte pieces
    assert sum(tok.is_byte(i) for i in ids) == 4
    assert tok.decode(ids) == "🦙"
    for cut in range(1, len(ids)):  # an incomplete character decodes like mistral-common (U+FFFD)
        assert tok.decode(ids[:cut]) == ref.decode(ids[:cut])


def test_decode_chat_skips_specials(tok, ref):
    ids = tok.encode_chat([U("Hi"), A("Hello"), U("Bye")])
    text = tok.decode(ids)
    assert text == ref.decode(ids) and "<s>" not in text and "</s>" not in text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_matches_full_decode(tok, ref, text):
    ids = tok.encode(text, bos=True, eos=True)
    decoder = tok.incremental_decoder()
    fragments = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(fragments) == ref.decode(ids) == text
    assert not any("\ufffd" in f for f in fragments)  # never a partial character
    assert "".join(tok.stream_decode(ids)) == text


def test_incremental_decoder_holds_partial_characters(tok):
    ids = tok.encode("a🦙b", bos=False)
    decoder = IncrementalDecoder(tok)
    out = [decoder.push(i) for i in ids]
    assert "".join(out) == "a🦙b"
    llama = out.index("🦙")
    assert out[llama - 3 : llama] == ["", "", ""]  # three leading bytes of the 4-byte character held back


def test_incremental_decoder_leading_spaces(tok):
    ids = tok.encode("Hello world  again", bos=True)
    out = list(tok.stream_decode(ids))
    assert out[0] == "Hello" and "".join(out) == "Hello world  again"
    assert any(f.startswith(" ") for f in out[1:])


def test_incremental_decoder_random_ids(tok, ref):
    rng = random.Random(1)
    # unk, control tokens, byte pieces, "▁", "▁▁", "�", then anything
    pool = [tok.unk_id, tok.bos_id, tok.eos_id, *range(3, 259), 28705, 259, 29137]
    for _ in range(1000):
        n = rng.randint(0, 16)
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(n)]
        assert "".join(tok.stream_decode(ids)) == ref.decode(ids)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)  # a directory
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(tmp_path / "empty.model")
    (tmp_path / "bogus.model").write_text('{"not": "a sentencepiece model"}')
    with pytest.raises(ValueError, match="SentencePiece"):
        load_tokenizer(tmp_path / "bogus.model")


def test_load_tokenizer_explicit_path(tok, ref):
    path = ref.instruct_tokenizer.tokenizer.file_path
    assert load_tokenizer(path).encode("Hello") == tok.encode("Hello")
    assert load_tokenizer(str(path)).vocab_size == tok.vocab_size


def test_default_tokenizer_works_without_mistral_common_and_is_its_v1_file(monkeypatch):
    import importlib.resources

    shipped = importlib.resources.files("mistral_common").joinpath("data/tokenizer.model.v1").read_bytes()
    ours = importlib.resources.files("mixtral_jax").joinpath("assets/tokenizer.model.v1").read_bytes()
    assert ours == shipped
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # makes `import mistral_common` fail
    assert load_tokenizer().encode("Hello") == [1, 22557]


def test_bad_inputs(tok):
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.incremental_decoder().push(-1)
    with pytest.raises(ValueError, match="unknown role"):
        tok.encode_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="at least one message"):
        tok.encode_chat([])
    with pytest.raises(ValueError, match="end with a user"):
        tok.encode_chat([U("q"), A("a")])
    with pytest.raises(TypeError):
        tok.encode_chat(U("a dict, not a list"))  # type: ignore[arg-type]


def test_tokenizer_is_read_only(tok):
    with pytest.raises(AttributeError):
        tok.bos_id = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        tok.extra = 1  # type: ignore[attr-defined]
