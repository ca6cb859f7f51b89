"""An OpenAI-compatible HTTP layer over the batching engine: /v1/models, /v1/completions,
/v1/chat/completions (streamed as server-sent events or not), /health and /metrics (Prometheus text). A
request's `model` picks the base or one of the engine's LoRA adapters (`serve --lora NAME=DIR`); any other
name is OpenAI's 404 `model_not_found`.

Kept thin: the limits and the API key are checked first (`serving/limits.py`), then parse and check a
request (any problem is an HTTP 400 with OpenAI's error body, and nothing reaches the engine), submit token
ids, turn the engine's tokens into text (stop strings are matched here, on text), and cancel the engine
request when the client goes away. FastAPI and uvicorn are the optional
`serve` extra, imported when a server is built, so the rest of the CLI works without them.
"""

# (no `from __future__ import annotations`: FastAPI reads the endpoints' annotations at runtime, and
# `Request` is imported inside `create_app`)
import asyncio
import contextlib
import json
import signal
import time

from mixtral_jax.inference.engine import Engine
from mixtral_jax.serving.limits import ServerLimits, guard_requests, guarded_protocol
from mixtral_jax.serving.metrics import CONTENT_TYPE, MeteredEngine, ServerMetrics
from mixtral_jax.serving.protocol import BadRequest, error_body, parse_request
from mixtral_jax.serving.responses import respond
from mixtral_jax.text.tokenizer import Tokenizer

DEFAULT_LIMITS = ServerLimits()
RETRY_AFTER_SECONDS = 1  # a slot frees as soon as any running request finishes


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *, drain_seconds: float = 10.0,
               limits: ServerLimits = DEFAULT_LIMITS):
    """The FastAPI app, inside the `limits` guard. Its lifespan starts the engine's thread and, at shutdown
    (SIGTERM included), lets running requests finish for up to `drain_seconds`, cancels the rest and stops
    the engine."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, drain_seconds)

    app = FastAPI(title="mixtral-jax", lifespan=lifespan)
    created = int(time.time())
    meter = ServerMetrics(engine)
    metered = MeteredEngine(engine, meter)

    @app.exception_handler(BadRequest)
    async def bad_request(_request, e: BadRequest):
        return JSONResponse(error_body(str(e), e.param, code=getattr(e, "code", None)),
                            status_code=getattr(e, "status", 400))

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
        return Response(meter.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():  # the base, then each LoRA adapter (vLLM's fields: `root`, `parent`)
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "mixtral-jax",
                "max_model_len": engine.max_context, "root": model_name, "parent": None}
        return {"object": "list", "data": [base] + [base | {"id": name, "root": name, "parent": model_name}
                                                    for name in engine.adapters]}

    async def handle(http: Request, chat: bool):
        try:
            body = json.loads(await http.body())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("the request body is not valid JSON") from None
        req = parse_request(body, chat=chat, model_name=model_name, tokenizer=tokenizer, engine=engine)
        if limits.max_queue and len(engine.waiting) >= limits.max_queue:
            meter.reject("queue_full")
            return JSONResponse(error_body(f"{len(engine.waiting)} requests are already waiting for a slot "
                                           "(--max-queue); retry later", kind="rate_limit_error"),
                                status_code=429, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return await respond(http, req, chat=chat, engine=metered, tokenizer=tokenizer, model_name=req.model)

    @app.post("/v1/completions")
    async def completions(http: Request):
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        return await handle(http, chat=True)

    return guard_requests(app, limits, on_reject=meter.reject)


def run_server(app, host: str, port: int, drain_seconds: float, limits: ServerLimits = DEFAULT_LIMITS) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers: stop accepting, then the app's lifespan drains), with
    `limits`' connection guard and keep-alive timeout."""
    import uvicorn

    # uvicorn re-raises the signal that stopped it once it has shut down, under the handler it found: with
    # this no-op one, a drained server returns and the command exits 0 instead of dying by SIGTERM.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=max(drain_seconds, 1),
                http=guarded_protocol(limits), timeout_keep_alive=limits.keep_alive_timeout,
                backlog=max(2048, limits.max_connections))
