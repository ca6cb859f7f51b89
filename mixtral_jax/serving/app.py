"""An OpenAI-compatible HTTP layer over the batching engine: /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events or not), /health and /metrics (Prometheus text).

Kept thin: parse and check a request (any problem is an HTTP 400 with OpenAI's error body, and nothing
reaches the engine), submit token ids, turn the engine's tokens into text (stop strings are matched here,
on text), and cancel the engine request when the client goes away. FastAPI and uvicorn are the optional
`serve` extra, imported when a server is built, so the rest of the CLI works without them.
"""

# (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and
# `Request` is imported inside `create_app`)
import asyncio
import contextlib
import dataclasses
import json
import math
import secrets
import signal
import time
import uuid
from collections.abc import Mapping

from mixtral_jax.inference.engine import Engine, RequestError
from mixtral_jax.inference.sampling import SamplingParams
from mixtral_jax.text.tokenizer import Tokenizer

_MAX_STOPS = 4
DISCONNECT_POLL_SECONDS = 0.01  # a small model finishes 100 tokens in well under a second; notice a hang-up sooner


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


def _finish_reason(engine_reason: str, stream: TextStream) -> str:
    if stream.stopped or engine_reason == "stop":
        return "stop"
    return "length" if engine_reason == "length" else "abort"


def prometheus_text(engine: Engine) -> str:
    s = engine.stats
    recent = sorted(s.recent_ttft)

    def quantile(q):
        return recent[min(int(q * len(recent)), len(recent) - 1)] if recent else float("nan")

    lines = [
        ("mixtral_queue_length", "gauge", "Requests waiting for a slot.", [("", len(engine.waiting))]),
        ("mixtral_busy_slots", "gauge", "Decode slots in use (prefilling included).", [("", engine.busy_slots)]),
        ("mixtral_slots", "gauge", "Decode slots in all (--max-batch).", [("", engine.config.max_batch)]),
        ("mixtral_tokens_generated_total", "counter", "Completion tokens generated.", [("", s.tokens_generated)]),
        ("mixtral_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s.prompt_tokens)]),
        ("mixtral_requests_finished_total", "counter", "Requests finished, cancelled ones included.",
         [("", s.requests_finished)]),
        ("mixtral_time_to_first_token_seconds", "summary",
         "From submission to the first token (quantiles over the last 1000 requests).",
         [('{quantile="0.5"}', quantile(0.5)), ('{quantile="0.99"}', quantile(0.99)),
          ("_sum", s.ttft_sum), ("_count", s.ttft_count)]),
    ]
    out = []
    for name, kind, help_text, samples in lines:
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        out += [f"{name}{suffix} {value}" for suffix, value in samples]
    return "\n".join(out) + "\n"


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *, drain_seconds: float = 10.0):
    """The FastAPI app. Its lifespan starts the engine's thread and, at shutdown (SIGTERM included), lets
    running requests finish for up to `drain_seconds`, cancels the rest and stops the engine."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain_seconds)

    app = FastAPI(title="mixtral-jax", lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(BadRequest)
    async def bad_request(_request, e: BadRequest):
        return JSONResponse(error_body(str(e), e.param), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, e):
        return JSONResponse(error_body(f"invalid request: {e.errors()[:1]}"), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind=kind), status_code=e.status_code)

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mixtral-jax", "max_model_len": engine.max_context}]}

    async def handle(http: Request, chat: bool):
        try:
            body = json.loads(await http.body())
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        req = parse_request(body, chat=chat, model_name=model_name, tokenizer=tokenizer, engine=engine)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_token(t):
            loop.call_soon_threadsafe(events.put_nowait, t)

        def on_finish(reason):
            loop.call_soon_threadsafe(events.put_nowait, reason)

        try:
            handle_ = engine.submit(req.prompt, req.params, on_token, on_finish)
        except RequestError as e:  # shutting down
            return JSONResponse(error_body(str(e), kind="server_error"), status_code=503)
        prefix = "chatcmpl" if chat else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        text = TextStream(tokenizer, req.stops)

        async def pieces():
            """(text, None) per token, then ("", finish_reason); cancels the engine request if abandoned."""
            try:
                while True:
                    event = await events.get()
                    if isinstance(event, int):
                        piece = text.push(event)
                        if text.stopped:
                            handle_.cancel()
                            yield piece, None
                            # the engine may still report tokens before it sees the cancel: drain to the finish
                            while isinstance(await events.get(), int):
                                pass
                            yield "", "stop"
                            return
                        yield piece, None
                    else:
                        yield text.push(None), _finish_reason(event, text)
                        return
            finally:
                handle_.cancel()  # a no-op once finished; frees the slot when the client went away

        def usage():
            n = handle_.n_generated
            return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}

        def choice(piece, reason, final):
            if chat:
                key = "message" if final else "delta"
                content = {"role": "assistant", "content": piece} if final else ({"content": piece} if piece else {})
                return {"index": 0, key: content, "logprobs": None, "finish_reason": reason}
            return {"index": 0, "text": piece, "logprobs": None, "finish_reason": reason}

        obj = "chat.completion" if chat else "text_completion"
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        if not req.stream:
            async def watch():  # a client that hangs up before the answer is complete frees the slot too
                while not await http.is_disconnected():  # cheap: reads a queued message, never blocks
                    await asyncio.sleep(DISCONNECT_POLL_SECONDS)
                handle_.cancel()

            watcher = asyncio.create_task(watch())
            parts, reasons = [], []
            try:
                async for piece, reason in pieces():
                    parts.append(piece)
                    reasons.append(reason)
            finally:
                watcher.cancel()
            reason = reasons[-1]
            return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                    "choices": [choice("".join(parts), reason, True)], "usage": usage()}

        async def sse():
            def event(choices, with_usage=None):
                data = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": model_name,
                        "choices": choices}
                if req.include_usage:
                    data["usage"] = with_usage
                return f"data: {json.dumps(data)}\n\n"

            if chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            try:
                async for piece, reason in pieces():
                    if piece or reason:
                        yield event([choice(piece, reason, False)])
            finally:  # the client went away mid-stream: free the slot now, not when the generator is collected
                handle_.cancel()
            if req.include_usage:
                yield event([], usage())
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await handle(http, chat=True)

    return app


def run_server(app, host: str, port: int, drain_seconds: float) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers: stop accepting, then the app's lifespan drains)."""
    import uvicorn

    # uvicorn re-raises the signal that stopped it once it has shut down, under the handler it found: with
    # this no-op one, a drained server returns and the command exits 0 instead of dying by SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=max(drain_seconds, 1))
