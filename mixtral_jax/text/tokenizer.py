"""Mixtral's SentencePiece tokenizers and chat templates, without mistral-common at runtime.

Mixtral-8x7B(-Instruct) uses Mistral's "v1" SentencePiece vocabulary (32000 pieces, byte fallback) and
the v1 instruct format; Mixtral-8x22B the "v3" one (32768 pieces: the same text pieces plus 768 control
tokens such as `[INST]` and `[TOOL_CALLS]`) and the v3 format with function calling (`chat_v3.py`).
Getting either subtly wrong (a missing leading space, a literal "</s>" in user text turned into a real
EOS, the system prompt on the wrong turn) silently degrades generations, so this module reproduces
mistral-common's `MistralTokenizer.v1()` and `.v3()` token for token, and the tests check it against
mistral-common itself. Only `sentencepiece` is needed at runtime; both model files ship in the package
(byte-identical copies of mistral-common's).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor

from mixtral_jax.text.chat_v3 import encode_chat_v3

__all__ = ["IncrementalDecoder", "Tokenizer", "load_tokenizer", "tokenizer_for"]

# The tokenizers shipped in mixtral_jax/assets, by version; checkpoints record them by mistral-common's name.
_BUNDLED = {"v1": "tokenizer.model.v1", "v3": "tokenizer.model.v3"}
_RECORDED_NAMES = {"mistral-common:tokenizer.model.v1": "v1", "mistral-common:tokenizer.model.v3": "v3"}
# A SentencePiece model with these control pieces speaks the v3 format (tools); without them, v1.
_V3_CONTROLS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                "[/TOOL_RESULTS]")

_ROLES = ("system", "user", "assistant")
# Role transitions mistral-common's v1 validator allows (`MistralRequestValidator._validate_message_order`,
# tool role omitted: v1 cannot encode tools). Note that it does NOT require strict user/assistant
# alternation: runs of same-role messages are merged by the normalizer.
_ALLOWED_NEXT = {
    "system": {"system", "user", "assistant"},
    "user": {"system", "user", "assistant"},
    "assistant": {"user", "assistant"},
}
_JOIN = "\n\n"  # mistral-common's `_DEFAULT_JOIN_STR` for merged messages and the system prompt


class Tokenizer:
    """Mixtral SentencePiece tokenizer: plain text, the v1 or v3 chat template, and streaming decode."""

    __slots__ = ("_sp", "_vocab_size", "_bos_id", "_eos_id", "_unk_id", "_controls", "_version")

    def __init__(self, processor: SentencePieceProcessor) -> None:
        self._sp = processor
        self._vocab_size = int(processor.vocab_size())
        self._bos_id = int(processor.bos_id())
        self._eos_id = int(processor.eos_id())
        self._unk_id = int(processor.unk_id())
        if self._vocab_size <= 0 or min(self._bos_id, self._eos_id) < 0:
            raise ValueError("SentencePiece model has no vocabulary or no <s>/</s> ids")
        self._controls = {piece: i for piece in _V3_CONTROLS
                          if (i := int(processor.PieceToId(piece))) != self._unk_id and processor.IsControl(i)}
        self._version = "v3" if len(self._controls) == len(_V3_CONTROLS) else "v1"

    @property
    def version(self) -> str:
        """'v1' (Mixtral-8x7B: `[INST]` is text, no tools) or 'v3' (Mixtral-8x22B: control tokens, tools)."""
        return self._version

    def control_id(self, piece: str) -> int | None:
        """The id of a v3 control token such as "[TOOL_CALLS]"; None where this vocabulary has none."""
        return self._controls.get(piece)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int:
        return self._unk_id

    def is_special(self, token_id: int) -> bool:
        """True for control tokens (`<s>`, `</s>`), which decode to nothing."""
        return bool(self._sp.IsControl(token_id))

    def is_byte(self, token_id: int) -> bool:
        """True for byte-fallback pieces `<0x00>`..`<0xFF>`."""
        return bool(self._sp.IsByte(token_id))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Tokenize `text`; special-token spellings such as "</s>" in it stay plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids: list[int] = self._sp.encode(text)
        return [self._bos_id] * bos + ids + [self._eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Detokenize, dropping control tokens and joining byte-fallback pieces into UTF-8 text."""
        return self._sp.decode(self._check_ids(ids))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
                    ) -> list[int]:
        """Encode a conversation exactly as mistral-common 1.13's `MistralTokenizer.v1()` or `.v3()` does.

        A v3 tokenizer takes OpenAI-style messages and tools (assistant `tool_calls`, `tool` results): see
        `mixtral_jax.text.chat_v3.encode_chat_v3`. What follows describes v1, which cannot encode tools.

        `messages` are `{"role": "system" | "user" | "assistant", "content": str}`. The result is
        `<s>[INST] user [/INST] assistant</s>[INST] user [/INST]`, ready for generation. As in
        mistral-common (`InstructRequestNormalizer`): all non-empty system messages are joined with
        "\\n\\n" into one system prompt; consecutive same-role messages are merged with "\\n\\n";
        an empty user turn is inserted if the first turn is not a user turn. Rejected with ValueError,
        as mistral-common rejects them: an empty list, an unknown role, a non-str content, an empty
        assistant message, a system message right after an assistant one, and a conversation ending
        with an assistant message (there is nothing to generate; mistral-common's "prefix"
        continuation and its finetuning mode are not supported).
        """
        if self._version == "v3":
            return encode_chat_v3(self._sp.encode, self._controls, self._bos_id, self._eos_id, messages, tools)
        if tools:
            raise ValueError("the v1 tokenizer (Mixtral-8x7B) cannot encode tools; use load_tokenizer('v3') "
                             "(Mixtral-8x22B)")
        system_prompt, turns = _normalize(messages)
        ids = [self._bos_id]
        for i, (role, content) in enumerate(turns):
            if role == "user":
                # InstructTokenizerV1.encode_user_message (mistral-common 1.13.1) puts the system prompt
                # in the FIRST user message (`is_first`; v2/v3 use the last one), and encodes the whole
                # "[INST] ... [/INST]" as text: in the v1 vocabulary [INST] is not a special token.
                if i == 0 and system_prompt:
                    content = system_prompt + _JOIN + content
                ids += self._sp.encode(f"[INST] {content} [/INST]")
            else:  # InstructTokenizerV1.encode_assistant_message: text (not rstripped) then </s>
                ids += self._sp.encode(content) + [self._eos_id]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes, as logprobs report it: "▁" is a space, `<0x0A>` the byte 0x0A, a control
        token its name ("[TOOL_CALLS]")."""
        piece = self._sp.IdToPiece(self._check_ids([token_id])[0])
        if self._sp.IsByte(token_id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def incremental_decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder (see `IncrementalDecoder`)."""
        return IncrementalDecoder(self)

    def stream_decode(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the printable text fragments of `ids` as they arrive; they concatenate to `decode(ids)`."""
        decoder = IncrementalDecoder(self)
        for token_id in ids:
            if fragment := decoder.push(token_id):
                yield fragment
        if fragment := decoder.flush():
            yield fragment

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if bad := [i for i in ids if not 0 <= i < self._vocab_size]:
            raise ValueError(f"token ids out of range [0, {self._vocab_size}): {bad[:5]}")
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, bos_id={self._bos_id}, eos_id={self._eos_id})"


class IncrementalDecoder:
    """Turns token ids, pushed one at a time, into text fragments that are safe to print.

    Each new token is decoded together with the previously emitted tokens as context, so
    SentencePiece's leading "▁" is a space exactly where the full decode has one; text ending in an
    incomplete byte-fallback UTF-8 sequence (U+FFFD) is held back until the character completes.
    The fragments from `push` plus `flush` concatenate to `Tokenizer.decode` of all ids.
    """

    __slots__ = ("_tok", "_ids", "_read")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []  # context (already emitted) + pending tokens
        self._read = 0  # self._ids[:self._read] has been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (often "")."""
        (token_id,) = self._tok._check_ids([token_id])
        self._ids.append(token_id)
        if self._tok.is_byte(token_id) and self._pending_text().endswith("\ufffd"):
            return ""  # possibly a multi-byte character still being spelled out byte by byte
        # Anything else, control tokens included (SentencePiece ends a byte run at them), is final.
        return self.flush()

    def flush(self) -> str:
        """Emit everything held back (call at end of stream); the decoder stays usable."""
        text = self._pending_text()
        # Keep the just-emitted tokens as context, reaching back to a non-control token: decoding
        # from a control token would drop the next piece's leading space, as at the start of text.
        start, special = self._read, self._tok.is_special
        while start > 0 and all(special(i) for i in self._ids[start:]):
            start -= 1
        self._ids = [] if all(special(i) for i in self._ids) else self._ids[start:]
        self._read = len(self._ids)
        return text

    def _pending_text(self) -> str:
        context = self._tok.decode(self._ids[: self._read])
        full = self._tok.decode(self._ids)
        return full[len(context) :]


def load_tokenizer(source: str | os.PathLike | None = None) -> Tokenizer:
    """A tokenizer: "v1" (the default, Mixtral-8x7B) or "v3" (Mixtral-8x22B), both shipped in the package, the
    name a checkpoint records ("mistral-common:tokenizer.model.v3"), or the path of a SentencePiece model file.

    A file with Mistral's control tokens (`[INST]`, `[TOOL_CALLS]`, ...) speaks the v3 chat format, else v1.
    """
    if source is None:
        source = "v1"
    if isinstance(source, str) and (source in _BUNDLED or source in _RECORDED_NAMES):
        return _bundled(_RECORDED_NAMES.get(source, source))
    file = Path(source)
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {file} (or name one: {', '.join(_BUNDLED)})")
    return _from_bytes(file.read_bytes(), str(file))


@functools.cache
def _bundled(version: str) -> Tokenizer:
    # our own copies (identical to mistral-common's, checked by the tests), so generation needs no extra;
    # a Tokenizer is immutable, so one instance serves every caller
    name = _BUNDLED[version]
    asset = importlib.resources.files("mixtral_jax").joinpath(f"assets/{name}")
    return _from_bytes(asset.read_bytes(), f"mixtral_jax/assets/{name}")


def _from_bytes(model: bytes, source: str) -> Tokenizer:
    processor = SentencePieceProcessor()
    try:
        if not model:
            raise RuntimeError("empty file")
        processor.LoadFromSerializedProto(model)
        return Tokenizer(processor)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"not a usable SentencePiece model: {source}") from e


def tokenizer_for(model) -> Tokenizer:
    """The tokenizer a model's weights expect: the one its checkpoint recorded (`model.tokenizer_name`, set by
    `mixtral_jax.load`), else by its vocabulary: 32768 pieces is Mixtral-8x22B's v3, anything else v1."""
    recorded = getattr(model, "tokenizer_name", None)
    if recorded:
        return load_tokenizer(recorded)
    config = getattr(model, "config", model)
    return load_tokenizer("v3" if config.vocab_size == 32768 else "v1")


def _normalize(messages: Sequence[Mapping[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate like mistral-common's v1 `MistralRequestValidator` (test mode), then normalize like its
    `InstructRequestNormalizer`: returns (system prompt or None, merged user/assistant turns)."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise ValueError("conversation must have at least one message")
    roles: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
        if role == "assistant" and not content:
            raise ValueError(f"message {i}: assistant message must have content")
        if roles and role not in _ALLOWED_NEXT[roles[-1]]:
            raise ValueError(f"message {i}: role {role!r} cannot follow {roles[-1]!r}")
        roles.append(role)
    if roles[-1] == "assistant":
        raise ValueError("conversation must end with a user (or system) message to prompt a reply")

    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    turns: list[tuple[str, str]] = []
    run: list[str] = []
    for i, message in enumerate(messages):  # merge runs of one role; system runs are dropped
        run.append(message["content"])
        if i + 1 == len(messages) or messages[i + 1]["role"] != message["role"]:
            if message["role"] != "system":
                turns.append((message["role"], _JOIN.join(c for c in run if c)))
            run = []
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    return (_JOIN.join(system) if system else None), turns
