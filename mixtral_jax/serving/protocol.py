"""The OpenAI request/response protocol, apart from HTTP: a request body checked and turned into token ids
and `SamplingParams` (any problem is a `BadRequest`, an HTTP 400 with OpenAI's error body, and nothing
reaches the engine), and token ids turned back into text with stop strings cut (`TextStream`).
"""

import dataclasses
import json
import math
import secrets
from collections.abc import Mapping

from mixtral_jax.errors import RequestError
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams
from mixtral_jax.text.grammar import Banned, Grammar, GrammarError, json_grammar, tool_call_schema
from mixtral_jax.text.tokenizer import Tokenizer

_MAX_STOPS = 4


class BadRequest(ValueError):
    """Reported to the client as HTTP 400, OpenAI's `invalid_request_error`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFound(BadRequest):
    """A `model` this server does not serve: HTTP 404 with code `model_not_found`, as OpenAI answers."""

    status, code = 404, "model_not_found"


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# Every field OpenAI defines for the two endpoints, and what this server does with it: taken (True), or
# refused unless absent or at its neutral value (a message saying why). Anything else is a 400 naming it.
_COMMON = {"model": True, "frequency_penalty": True, "presence_penalty": True, "logit_bias": True, "logprobs": True,
           "max_tokens": True, "n": True, "seed": True, "stop": True, "stream": True, "stream_options": True,
           "temperature": True, "top_p": True, "user": True,
           "top_k": True, "repetition_penalty": True}  # the last two: vLLM's and transformers' extensions
_COMPLETION_FIELDS = _COMMON | {"prompt": True, "best_of": True, "echo": True, "suffix": True}
_CHAT_FIELDS = _COMMON | {
    "messages": True, "max_completion_tokens": True, "top_logprobs": True, "response_format": True, "tools": True,
    "tool_choice": True, "parallel_tool_calls": True, "metadata": True, "store": True, "service_tier": True,
    "modalities": True, "prompt_cache_key": True, "safety_identifier": True,
    "audio": "audio output is not supported", "prediction": "predicted outputs are not supported",
    "functions": "the deprecated 'functions' are not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_choice'",
    "reasoning_effort": "this model does not reason", "verbosity": "'verbosity' is not supported",
    "web_search_options": "web search is not supported"}
_MAX_N = 16


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A checked request: its prompts (one for chat; completions may send several), `n` choices of each, and
    how to answer: logprobs (None: off), echo, a grammar for constrained decoding, tools; `model`: the
    name the client asked for, `adapter` the LoRA adapter it names (None: the base model)."""

    prompts: list[list[int]]
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False
    grammar: str | None = None  # llguidance grammar the answer must match (JSON, or a forced tool call)
    prefix: tuple[int, ...] = ()  # token ids forced before the grammar ([TOOL_CALLS])
    banned: tuple[int, ...] = ()  # token ids never drawn (tool_choice "none": [TOOL_CALLS])
    tools: bool = False  # the answer is parsed for tool calls
    model: str = ""
    adapter: str | None = None

    @property
    def prompt(self) -> list[int]:
        return self.prompts[0]

    def constraint(self, tokenizer: Tokenizer, vocab_size: int):
        """A fresh constraint for one choice (each keeps its own grammar state), or None."""
        words = -(-vocab_size // 32)
        if self.grammar is not None:
            return Grammar(tokenizer, self.grammar, words, self.prefix)
        return Banned(self.banned, words) if self.banned else None


def _check_fields(body: Mapping, chat: bool) -> None:
    known = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name, value in body.items():
        rule = known.get(name)
        if rule is None:
            raise BadRequest(f"Unrecognized request argument supplied: {name}", name)
        if rule is not True and value is not None:
            raise BadRequest(f"'{name}': {rule}", name)
    if body.get("suffix") not in (None, ""):
        raise BadRequest("'suffix' (insertion) is not supported by this model", "suffix")
    if body.get("modalities") not in (None, ["text"]):
        raise BadRequest("'modalities' may only be [\"text\"]", "modalities")
    for flag in ("echo", "store", "parallel_tool_calls", "logprobs" if chat else "echo"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise BadRequest(f"'{flag}' must be true or false", flag)
    for text in ("user", "service_tier", "prompt_cache_key", "safety_identifier"):
        if body.get(text) is not None and not isinstance(body[text], str):
            raise BadRequest(f"'{text}' must be a string", text)
    if body.get("metadata") is not None and not isinstance(body["metadata"], Mapping):
        raise BadRequest("'metadata' must be an object", "metadata")


def _logit_bias(body, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id": bias}`, bias in [-100, 100]."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, Mapping):
        raise BadRequest("'logit_bias' must be an object mapping token ids to numbers in [-100, 100]", "logit_bias")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.strip().isdigit() and int(key) < vocab_size):
            raise BadRequest(f"'logit_bias' key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequest(f"'logit_bias' values must be numbers in [-100, 100], got {value!r}", "logit_bias")
        out.append((int(key), float(value)))
    if len(out) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' has {len(out)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias")
    return tuple(sorted(out))


def _logprobs(body, chat: bool) -> int | None:
    """Chat: `logprobs: true` and `top_logprobs` in [0, 20]; completions: the integer `logprobs` in [0, 20]."""
    if not chat:
        value = body.get("logprobs")
        return None if value is None else _number(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    top = body.get("top_logprobs")
    if not body.get("logprobs"):
        if top is not None:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return None
    return _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)


def _stops(body) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > _MAX_STOPS:
        raise BadRequest(f"'stop' must be a string or a list of at most {_MAX_STOPS} non-empty strings, got "
                         f"{json.dumps(stop)[:80]}", "stop")
    return stops


def _response_format(body) -> str | None:
    """The grammar `response_format` asks for: None for text, else JSON (any object, or a schema)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    try:
        if kind == "json_object":
            return json_grammar(None)
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
                raise BadRequest("'response_format.json_schema' must be {\"name\", \"schema\": {...}}",
                                 "response_format")
            return json_grammar(spec.get("schema") or {})
    except GrammarError as e:
        raise BadRequest(str(e), "response_format") from None
    raise BadRequest("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                     "{\"type\": \"json_schema\", \"json_schema\": {...}}", "response_format")


def _tools(body, tokenizer: Tokenizer):
    """(tools, tool_choice) of a chat request: tools only on a v3 tokenizer (the v1 template has no place
    for them); tool_choice "none", "auto" (the default with tools), "required" or a named function."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise BadRequest("'tool_choice' needs 'tools'", "tool_choice")
        return None, "none"
    if tokenizer.version != "v3":
        raise BadRequest("'tools' need a model with Mistral's v3 tokenizer (Mixtral-8x22B): this model's "
                         f"{tokenizer.version} chat template has no function calling", "tools")
    if not isinstance(tools, list) or not tools:
        raise BadRequest("'tools' must be a non-empty list of {\"type\": \"function\", \"function\": {...}}",
                         "tools")
    if choice is None:
        choice = "auto"
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        names = [t.get("function", {}).get("name") for t in tools if isinstance(t, Mapping)]
        if choice.get("type") != "function" or name not in names:
            raise BadRequest(f"'tool_choice' names no function in 'tools' ({', '.join(map(str, names))})",
                             "tool_choice")
        return tools, name
    if choice not in ("none", "auto", "required"):
        raise BadRequest("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}", "tool_choice")
    return tools, choice


def _prompts(body, tokenizer: Tokenizer) -> list[list[int]]:
    """A completion `prompt`: a string, a list of strings, a list of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and len(prompt) <= _MAX_N * 8:
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(tokenizer.encode(p))
            elif isinstance(p, list) and p and all(type(t) is int for t in p):
                out.append(p)
            else:
                break
        else:
            return out
    raise BadRequest("'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt")


def _number(body, name, default, lo, hi, integer=False):
    value = body.get(name, default)
    if value is None:
        value = default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


def _top_k(body) -> int | None:
    """`top_k` (not OpenAI's; vLLM's meaning): an integer >= 1, or -1 or 0 (or absent) for off."""
    value = body.get("top_k")
    if value is None or (type(value) is int and value in (-1, 0)):
        return None
    if type(value) is not int or value < 1:
        raise BadRequest(f"'top_k' must be an integer >= 1 (or -1 or 0: off), got {value!r}", "top_k")
    return value


def _repetition_penalty(body) -> float:
    """transformers' `repetition_penalty` (not OpenAI's): a number > 0, 1 (the default) is off."""
    value = body.get("repetition_penalty")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise BadRequest(f"'repetition_penalty' must be a number > 0, got {value!r}", "repetition_penalty")
    return float(value)


# what the engine's check may name first in its message, so a 400 names that field
_ENGINE_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                  "seed", "max_tokens", "logit_bias", "logprobs")


def parse_request(body, *, chat: bool, model_name: str, tokenizer: Tokenizer, engine: Engine) -> Parsed:
    """Check an OpenAI request body and turn it into token ids and sampling parameters (BadRequest if not).
    Besides OpenAI's, it takes vLLM's `top_k` and transformers' `repetition_penalty`. `model` picks the base
    (`model_name`, or absent) or one of the engine's LoRA adapters by name."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    _check_fields(body, chat)
    adapters = tuple(getattr(engine, "adapters", ()))
    model = body.get("model")
    if model not in (None, model_name, *adapters):
        served = ", ".join(repr(m) for m in (model_name, *adapters))
        raise ModelNotFound(f"The model {model!r} does not exist; this server serves {served}", "model")
    adapter = model if model in adapters and model != model_name else None
    n = _number(body, "n", 1, 1, _MAX_N, integer=True)
    if not chat and body.get("best_of") is not None and _number(body, "best_of", 1, 1, _MAX_N, integer=True) != n:
        raise BadRequest("'best_of' other than n is not supported (every sample is returned)", "best_of")
    echo = bool(body.get("echo"))
    logprobs = _logprobs(body, chat)
    if echo and logprobs is not None:
        raise BadRequest("'echo' with 'logprobs' (the prompt's log probabilities) is not supported", "echo")
    grammar, prefix, banned, tools = _response_format(body) if chat else None, (), (), None
    try:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
            tools, choice = _tools(body, tokenizer)
            prompts = [tokenizer.encode_chat(messages, tools)]
        else:
            prompts = _prompts(body, tokenizer)
    except (ValueError, TypeError) as e:  # the chat template's own checks (roles, order, content)
        if isinstance(e, BadRequest):
            raise
        raise BadRequest(str(e), "tools" if chat and "tool" in str(e) and "message" not in str(e)
                         else "messages" if chat else "prompt") from None
    if tools is not None:
        marker = tokenizer.control_id("[TOOL_CALLS]")
        if choice == "none":
            banned = (marker,)
        elif choice != "auto":
            if grammar is not None:
                raise BadRequest("'response_format' cannot be combined with a forced tool call", "response_format")
            try:
                grammar = json_grammar(tool_call_schema(tools, None if choice == "required" else choice))
            except GrammarError as e:
                raise BadRequest(f"a tool's parameters: {e}", "tools") from None
            prefix = (marker,)
    if len(prompts) * n > _MAX_N * 8:
        raise BadRequest(f"{len(prompts)} prompts times n = {n} is over {_MAX_N * 8} choices", "n")
    longest = max(map(len, prompts))
    room = engine.max_context - longest
    if room < 1:
        raise BadRequest(f"the prompt has {longest} tokens; this server's context holds {engine.max_context} "
                         "(prompt and completion together)", "prompt")
    default_max = max(room, 1) if chat else 16
    max_tokens = body.get("max_tokens")
    if chat and max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max, 1, 1 << 30, integer=True)
    temperature = _number(body, "temperature", 1.0, 0, 2)
    top_p = _number(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise BadRequest("'top_p' must be in (0, 1]", "top_p")
    top_k = _top_k(body)
    presence = _number(body, "presence_penalty", 0.0, -2, 2)
    frequency = _number(body, "frequency_penalty", 0.0, -2, 2)
    repetition = _repetition_penalty(body)
    seed = body.get("seed")
    seed = secrets.randbits(63) if seed is None else _number(body, "seed", 0, -(1 << 63), (1 << 64) - 1, integer=True)
    stops = _stops(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping) or not isinstance(options.get("include_usage", False), bool):
        raise BadRequest("'stream_options' must be an object like {\"include_usage\": true}", "stream_options")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                            repetition_penalty=repetition, presence_penalty=float(presence),
                            frequency_penalty=float(frequency), seed=seed % (1 << 64),
                            logit_bias=_logit_bias(body, tokenizer.vocab_size), logprobs=logprobs)
    try:
        prompts = [engine.validate(p, params) for p in prompts]
    except RequestError as e:
        message = str(e)
        field = next((f for f in _ENGINE_FIELDS if message.startswith(f)), None)
        raise BadRequest(message, field or ("max_tokens" if "max_tokens" in message else "prompt")) from None
    return Parsed(prompts, params, stops, stream, bool(options.get("include_usage")), n=n, echo=echo,
                  grammar=grammar, prefix=prefix, banned=banned, tools=tools is not None,
                  model=model or model_name, adapter=adapter)


def choice_params(parsed: Parsed, i: int) -> SamplingParams:
    """Choice i's parameters: choice 0 draws with the request's seed, the others with seeds of their own."""
    if i % parsed.n == 0:
        return parsed.params
    return dataclasses.replace(parsed.params, seed=(parsed.params.seed + 0x9E3779B97F4A7C15 * (i % parsed.n))
                               % (1 << 64))


class TextStream:
    """Token ids in, text out, with stop strings cut off: text that could be the start of a stop string is
    held back until it cannot be."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.decoder = tokenizer.incremental_decoder()
        self.stops = stops
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int | None) -> str:
        """Add a token (None: the end) and return the text that is now safe to send."""
        self.text += self.decoder.flush() if token is None else self.decoder.push(token)
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        hold = 0 if token is None or self.stopped else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out


def finish_reason(engine_reason: str, stream: TextStream) -> str:
    if stream.stopped or engine_reason == "stop":
        return "stop"
    return "length" if engine_reason == "length" else "abort"
