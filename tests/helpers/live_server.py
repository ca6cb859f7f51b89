"""A real HTTP server in this process (uvicorn on a thread, 127.0.0.1): the app `mixtral-jax serve` runs, over
an engine and model the test also holds, so answers can be checked against the model itself."""

import contextlib
import socket
import threading
import time

import openai

from mixtral_jax.inference.engine import Engine, EngineConfig
from mixtral_jax.serving.app import create_app


@contextlib.contextmanager
def live_server(model, tokenizer, name: str = "test-model", **config):
    """Yields (base URL, openai client, engine); the server and its engine stop at exit."""
    import uvicorn

    engine = Engine(model, EngineConfig(**config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, tokenizer, name, drain_seconds=1), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120), engine
    finally:
        server.should_exit = True
        thread.join(30)
