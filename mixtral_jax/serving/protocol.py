"""The OpenAI request/response protocol, apart from HTTP: a request body checked and turned into token ids
and `SamplingParams` (any problem is a `BadRequest`, an HTTP 400 with OpenAI's error body, and nothing
reaches the engine), and token ids turned back into text with stop strings cut (`TextStream`).
"""

import dataclasses
import math
import secrets
from collections.abc import Mapping

from mixtral_jax.errors import RequestError
from mixtral_jax.inference.engine import Engine
from mixtral_jax.inference.sampling import SamplingParams
from mixtral_jax.text.tokenizer import Tokenizer

_MAX_STOPS = 4


class BadRequest(ValueError):
    """Reported to the client as HTTP 400, OpenAI's `invalid_request_error`."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclasses.dataclass(frozen=True)
class Parsed:
    prompt: list[int]
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool


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
                  "seed", "max_tokens")


def parse_request(body, *, chat: bool, model_name: str, tokenizer: Tokenizer, engine: Engine) -> Parsed:
    """Check an OpenAI request body and turn it into token ids and sampling parameters (BadRequest if not).
    Besides OpenAI's, it takes vLLM's `top_k` and transformers' `repetition_penalty`."""
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise BadRequest(f"unknown model {body.get('model')!r}; this server serves {model_name!r}", "model")
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise BadRequest("only n = 1 is supported", "n")
    try:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
            prompt = tokenizer.encode_chat(messages)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                prompt = tokenizer.encode(prompt)
            elif not (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
                raise BadRequest("'prompt' must be a string or a non-empty list of token ids", "prompt")
    except (ValueError, TypeError) as e:  # the chat template's own checks (roles, order, content)
        if isinstance(e, BadRequest):
            raise
        raise BadRequest(str(e), "messages" if chat else "prompt") from None
    room = engine.max_context - len(prompt)
    if room < 1:
        raise BadRequest(f"the prompt has {len(prompt)} tokens; this server's context holds {engine.max_context} "
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
    stop = body.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stops) or len(stops) > _MAX_STOPS:
        raise BadRequest(f"'stop' must be a string or a list of at most {_MAX_STOPS} non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                            repetition_penalty=repetition, presence_penalty=float(presence),
                            frequency_penalty=float(frequency), seed=seed % (1 << 64))
    try:
        prompt = engine.validate(prompt, params)
    except RequestError as e:
        message = str(e)
        field = next((f for f in _ENGINE_FIELDS if message.startswith(f)), None)
        raise BadRequest(message, field or ("max_tokens" if "max_tokens" in message else "prompt")) from None
    return Parsed(prompt, params, stops, stream, bool(options.get("include_usage")))


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
