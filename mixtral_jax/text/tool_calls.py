"""A v3 model's answer as an OpenAI-style assistant message, its `[TOOL_CALLS]` parsed into `tool_calls`.

Mixtral-8x22B-Instruct answers a request for a tool with the control token `[TOOL_CALLS]` followed by a
JSON list, `[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]`, then `</s>`.
The split and the JSON rules are mistral-common's (`experimental/tools.py`, for v2-v7 tokenizers): text
before the first `[TOOL_CALLS]` is the content; each `[TOOL_CALLS]` starts a list of calls, each a dict
with a "name" and a dict of "arguments". A model can write anything, so output that breaks these rules is
not an error here: it comes back as text, with a warning.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import warnings
from collections.abc import Sequence

from mixtral_jax.text.tokenizer import Tokenizer

_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A fresh tool-call id in the form v3 requires (9 letters or digits), for calls the model left unnamed."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(9))


def assistant_message(tokenizer: Tokenizer, ids: Sequence[int]) -> dict:
    """`{"role": "assistant", "content": str | None, "tool_calls": [...]}` from generated token ids.

    `tool_calls` (present only when the model called tools) are OpenAI's: `{"id", "type": "function",
    "function": {"name", "arguments": JSON string}}`; the model's own id is kept where it is a valid v3 id,
    else a fresh one is made, so the message can go straight back into `encode_chat`. Content that is only
    whitespace beside tool calls is None, as OpenAI returns it. Tool-call output that is not a JSON list of
    `{"name": str, "arguments": dict}` is returned as the content text with a `RuntimeWarning`.
    """
    ids = [int(i) for i in ids]
    marker = tokenizer.control_id("[TOOL_CALLS]")
    if marker is None or marker not in ids:
        return {"role": "assistant", "content": tokenizer.decode(ids)}
    first = ids.index(marker)
    segments, start = [], first
    for i in range(first + 1, len(ids) + 1):
        if i == len(ids) or ids[i] == marker:
            segments.append(ids[start + 1 : i])
            start = i
    calls = []
    try:
        for segment in segments:
            calls += _parse_calls(tokenizer.decode(segment))
    except ValueError as e:
        warnings.warn(f"the model's tool call is not usable ({e}); returned as text", RuntimeWarning, stacklevel=2)
        return {"role": "assistant", "content": tokenizer.decode(ids)}
    if not calls:  # an empty list: nothing was called
        return {"role": "assistant", "content": tokenizer.decode(ids)}
    content = tokenizer.decode(ids[:first])
    return {"role": "assistant", "content": content if content.strip() else None, "tool_calls": calls}


def _parse_calls(text: str) -> list[dict]:
    try:
        calls = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from None
    if not isinstance(calls, list):
        raise ValueError(f"expected a JSON list of calls, got {type(calls).__name__}")
    out = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError(f"a call needs a string 'name': {json.dumps(call, ensure_ascii=False):.80}")
        if not isinstance(call.get("arguments"), dict):
            raise ValueError(f"the 'arguments' of {call['name']} are not a JSON object")
        call_id = call.get("id")
        out.append({"id": call_id if isinstance(call_id, str) and _CALL_ID.match(call_id) else new_call_id(),
                    "type": "function",
                    "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
    return out


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ToolCallStream:
    """The text after `[TOOL_CALLS]`, pushed piece by piece, as OpenAI's streamed `tool_calls` deltas: a call's
    `{"index", "id", "type", "function": {"name", "arguments": ""}}` once its name is complete, then pieces
    of its arguments as they arrive. It reads `[{"name": ..., "arguments": {...}}, ...]` with the name first
    (as Mistral's format and a forced call's grammar write it); a call written otherwise yields no deltas,
    and `complete` says whether every call streamed whole."""

    def __init__(self):
        self.text = ""
        self._scanned = 0
        self._depth, self._in_string, self._escape = 0, False, False
        self._call_start: int | None = None  # where the current call's object starts
        self._args: tuple[int, int | None] | None = None  # the current call's arguments [start, end)
        self._sent = 0  # arguments text sent of the current call
        self.calls: list[dict] = []  # {"id", "name", "arguments"} as streamed
        self._closed_whole = 0

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        deltas = []
        for i in range(self._scanned, len(self.text)):
            c = self.text[i]
            if self._in_string:
                self._escape, self._in_string = (False, True) if self._escape else (c == "\\", c != '"')
            elif c == '"':
                self._in_string = True
            elif c in "[{":
                self._depth += 1
                if self._depth == 2 and c == "{":
                    self._call_start, self._args, self._sent = i, None, 0
            elif c in "]}":
                self._depth -= 1
                if self._args is not None and self._args[1] is None and self._depth == 2:
                    self._args = (self._args[0], i + 1)
                if self._depth == 1 and self._call_start is not None:
                    deltas += self._arguments(i)
                    self._closed_whole += self._args is not None and self._args[1] is not None
                    self._call_start = None
            self._scanned = i + 1
            if self._call_start is not None and self._args is None:
                head = _HEAD.match(self.text, self._call_start, i + 1)
                if head and head.end() <= i:  # the name is complete and the arguments' value has begun
                    self._args = (head.end(), None)
                    call = {"id": new_call_id(), "name": json.loads(f'"{head.group(1)}"'), "arguments": ""}
                    self.calls.append(call)
                    deltas.append({"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                   "function": {"name": call["name"], "arguments": ""}})
        return deltas + self._arguments(len(self.text))

    def _arguments(self, upto: int) -> list[dict]:
        if self._args is None or self._call_start is None:
            return []
        start, end = self._args
        stop = min(upto, end) if end is not None else upto
        piece = self.text[start + self._sent:stop]
        if not piece:
            return []
        self._sent += len(piece)
        self.calls[-1]["arguments"] += piece
        return [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]

    @property
    def complete(self) -> bool:
        """Every call streamed with its whole arguments, and the list closed."""
        return bool(self.calls) and self._closed_whole == len(self.calls) and self._depth == 0
