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
