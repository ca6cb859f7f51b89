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
import json
import signal
import time
import uuid

from mixtral_jax.inference.engine import Engine, RequestError
from mixtral_jax.serving.metrics import prometheus_text
from mixtral_jax.serving.protocol import BadRequest, TextStream, error_body, finish_reason, parse_request
from mixtral_jax.text.tokenizer import Tokenizer

DISCONNECT_POLL_SECONDS = 0.01  # a small model finishes 100 tokens in well under a second; notice a hang-up sooner


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
                        yield text.push(None), finish_reason(event, text)
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
