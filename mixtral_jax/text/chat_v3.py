"""Mistral's v3 instruct format (Mixtral-8x22B): OpenAI-style messages and tools -> token ids.

Reproduces mistral-common 1.13's `MistralTokenizer.v3()` (SentencePiece) on
`ChatCompletionRequest.from_openai(messages, tools)` token for token, its test-mode validation included,
so that what it rejects is rejected here too (tests/test_tokenizer_v3.py checks both against it):

    <s> [INST] user [/INST] answer</s>
        [INST] user [/INST] [TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": "a1b2c3d4e"}]</s>
        [TOOL_RESULTS] {"content": ..., "call_id": "a1b2c3d4e"}[/TOOL_RESULTS] answer</s>
        [AVAILABLE_TOOLS] [{"type": "function", "function": {...}}][/AVAILABLE_TOOLS]
        [INST] system\\n\\nlast user [/INST]

The tool definitions and the system prompt go in front of the LAST user message (v1 puts the system prompt
in the first), so a long conversation keeps them next to the question. Control tokens (`[INST]`,
`[TOOL_CALLS]`, ...) are inserted by id; message text never turns into one, however it is spelled. JSON is
written by `json.dumps(..., ensure_ascii=False)` with arguments and tool results parsed first where they
are JSON, exactly as mistral-common does. Not supported (mistral-common's v3 SentencePiece tokenizer
cannot encode them either): images and other non-text content, and continuing a final assistant message.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_JOIN = "\n\n"  # mistral-common's `_DEFAULT_JOIN_STR`: merged messages, content parts, the system prompt
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # function and tool names
_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")  # v3 tool-call ids
# Role transitions mistral-common's validator allows (`_validate_message_order`): not strict alternation;
# runs of one role are merged afterwards.
_ALLOWED_NEXT = {
    "system": {"system", "user", "assistant"},
    "user": {"system", "user", "assistant"},
    "assistant": {"user", "assistant", "tool"},
    "tool": {"user", "assistant", "tool"},
}

Content = str | list[str] | None  # a message's text, or its text parts as given (their truthiness matters)


@dataclasses.dataclass
class _Message:
    role: str
    content: Content = None
    tool_calls: list[tuple[str, str, str]] | None = None  # (id, name, arguments as a string)
    call_id: str | None = None  # of a tool result


def encode_chat_v3(encode: Callable[[str], list[int]], controls: Mapping[str, int], bos: int, eos: int,
                   messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
                   ) -> list[int]:
    """Token ids of a conversation in the v3 format, ready for generation.

    `messages`: OpenAI chat messages, roles "system" (or "developer"), "user", "assistant" (`content`, or
    `tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}]`) and "tool"
    (`tool_call_id`, `content`); content is a str or a list of `{"type": "text", "text": ...}` parts.
    `tools`: OpenAI tool definitions `[{"type": "function", "function": {"name", "description",
    "parameters"}}]`. `encode` is SentencePiece's plain encode; `controls` maps control pieces to ids.
    ValueError (TypeError for a non-list) for whatever mistral-common rejects; tool-call ids are 9 letters
    or digits, as v3 requires.
    """
    parsed = _parse_messages(messages)
    _check_structure(parsed)
    tool_defs = _parse_tools(tools)
    system_prompt, turns = _normalize(parsed)
    last_user = max(i for i, m in enumerate(turns) if m.role == "user")
    ids = [bos]
    for i, m in enumerate(turns):
        if m.role == "user":
            if i == last_user and tool_defs:
                ids += [controls["[AVAILABLE_TOOLS]"], *encode(_dumps(tool_defs)), controls["[/AVAILABLE_TOOLS]"]]
            text = system_prompt + _JOIN + m.content if i == last_user and system_prompt else m.content
            ids += [controls["[INST]"], *encode(text), controls["[/INST]"]]
        elif m.role == "tool":
            result = {"content": _parse_json(m.content), "call_id": m.call_id}
            ids += [controls["[TOOL_RESULTS]"], *encode(_dumps(result)), controls["[/TOOL_RESULTS]"]]
        elif m.tool_calls and m.content:
            raise ValueError("an assistant turn cannot have both content and tool_calls (after merging "
                             "consecutive assistant messages)")
        elif m.tool_calls:
            calls = [{"name": name, "arguments": _parse_json(args), **({"id": cid} if cid != "null" else {})}
                     for cid, name, args in m.tool_calls]
            ids += [controls["[TOOL_CALLS]"], *encode(_dumps(calls)), eos]
        elif m.content:
            ids += [*encode(m.content.rstrip(" ")), eos]
        else:  # only empty text parts
            raise ValueError(f"assistant turn {i} has no text and no tool_calls")
    return ids


# ------------------------------------------------------------------------------------- validation
def _parse_messages(messages) -> list[_Message]:
    """Each message checked on its own, as `convert_openai_messages` and the v3 validator check it."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict, got {type(m).__name__}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in _ALLOWED_NEXT:
            raise ValueError(f"message {i}: unknown role {role!r} (expected system, user, assistant or tool)")
        if role == "assistant":
            content = _content(m.get("content"), i, optional=True)
            calls = _tool_calls(m.get("tool_calls"), i)
            if bool(content) == bool(calls):
                raise ValueError(f"message {i}: an assistant message needs content or tool_calls, not both, "
                                 f"not neither")
            out.append(_Message(role, content, calls))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not _CALL_ID.match(call_id):
                raise ValueError(f"message {i}: tool_call_id must be 9 letters or digits, got {call_id!r}")
            name = m.get("name")
            if name is not None and not (isinstance(name, str) and _NAME.match(name)):
                raise ValueError(f"message {i}: tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
            out.append(_Message(role, _content(m.get("content"), i), call_id=call_id))
        else:
            out.append(_Message(role, _content(m.get("content"), i)))
    return out


def _content(content, i: int, optional: bool = False) -> Content:
    if content is None and optional or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"message {i}: only text content parts ({{'type': 'text', 'text': ...}}) are "
                                 f"supported, got {part!r:.80}")
            texts.append(part["text"])
        return texts
    raise ValueError(f"message {i}: content must be a str or a list of text parts, got {type(content).__name__}")


def _tool_calls(calls, i: int) -> list[tuple[str, str, str]] | None:
    if calls is None:
        return None
    if not isinstance(calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list, got {type(calls).__name__}")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            raise ValueError(f"message {i}: a tool call is {{'id', 'type': 'function', 'function': {{'name', "
                             f"'arguments'}}}}, got {call!r:.80}")
        call_id, name, args = call.get("id", "null"), function.get("name"), function.get("arguments")
        if not isinstance(call_id, str) or not _CALL_ID.match(call_id):
            raise ValueError(f"message {i}: tool call id must be 9 letters or digits, got {call_id!r}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"message {i}: function name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if isinstance(args, dict):
            args = json.dumps(args)  # as mistral-common's FunctionCall stores a dict
        elif args is None:
            args = "{}"
        elif not isinstance(args, str):
            raise ValueError(f"message {i}: arguments of {name} must be a JSON string or a dict")
        out.append((call_id, name, args))
    return out


def _check_structure(messages: list[_Message]):
    """The order rules of mistral-common's `_validate_message_list_structure` (test mode)."""
    if not messages:
        raise ValueError("conversation must have at least one message")
    if len(messages) == 1 and messages[0].role not in ("user", "system"):
        raise ValueError("a conversation of one message must be a user or system message")
    if len(messages) > 1 and messages[-1].role == "assistant":
        raise ValueError("conversation must end with a user or tool message to prompt a reply (continuing an "
                         "assistant message is not supported)")
    for i in range(1, len(messages)):
        if messages[i].role not in _ALLOWED_NEXT[messages[i - 1].role]:
            raise ValueError(f"message {i}: role {messages[i].role!r} cannot follow {messages[i - 1].role!r}")
    pending = 0  # tool calls of the last assistant message still without a result
    for m in messages[1:]:
        if m.role == "tool":
            pending -= 1
        elif m.role == "assistant":
            if pending:
                raise ValueError("each tool call needs exactly one tool message before the next assistant message")
            if m.tool_calls is not None:
                pending = len(m.tool_calls)


def _parse_tools(tools) -> list[dict]:
    """OpenAI tool definitions as mistral-common dumps them (`Tool.model_dump()`, `strict` left out)."""
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError("tools must be a list of {'type': 'function', 'function': {...}} dicts")
    out = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise ValueError(f"a tool is {{'type': 'function', 'function': {{'name', 'description', "
                             f"'parameters'}}}}, got {tool!r:.80}")
        name = function.get("name")
        description = "" if function.get("description") is None else function["description"]
        parameters = {} if function.get("parameters") is None else function["parameters"]
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if not isinstance(description, str):
            raise ValueError(f"tool {name}: description must be a str")
        if not isinstance(parameters, dict) or not all(isinstance(k, str) for k in parameters):
            raise ValueError(f"tool {name}: parameters must be a JSON schema object")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out


# ---------------------------------------------------------------------------------- normalization
def _normalize(messages: list[_Message]) -> tuple[str | None, list[_Message]]:
    """mistral-common's `InstructRequestNormalizer`: system messages joined into one prompt, runs of user or
    assistant messages merged (tool results stay one per message), an empty user turn in front if needed."""
    system = [_join([m.content]) for m in messages if m.role == "system" and m.content]
    turns: list[_Message] = []
    start = 0
    for i in range(len(messages) + 1):
        if i < len(messages) and messages[i].role == messages[start].role:
            continue
        run, role = messages[start:i], messages[start].role
        if role == "user":
            turns.append(_Message("user", _join([m.content for m in run])))
        elif role == "assistant":
            calls = [(cid, name, args or "{}") for m in run for cid, name, args in m.tool_calls or []]
            turns.append(_Message("assistant", _join([m.content for m in run]), calls or None))
        elif role == "tool":
            turns += [_Message("tool", _join([m.content]) or "{}", call_id=m.call_id) for m in run]
        start = i
    if not turns or turns[0].role != "user":
        turns.insert(0, _Message("user", ""))
    return (_JOIN.join(system) if system else None), turns


def _join(contents: list[Content]) -> str:
    """The non-empty texts of several messages' contents, joined (text parts and messages alike)."""
    texts = []
    for content in contents:
        texts += [content] if isinstance(content, str) else (content or [])
    return _JOIN.join(t for t in texts if t)


def _parse_json(text: str) -> Any:
    """Arguments and tool results go into the JSON as values where they are JSON (empty ones are {}), else as
    strings. (mistral-common also re-serializes them first, which changes nothing once they are parsed.)"""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)
