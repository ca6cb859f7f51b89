"""What keeps one client from taking the server from the others: the request limits (`ServerLimits`), an ASGI
guard that checks the API key and reads a body with a cap before anything parses it, and a uvicorn protocol
that bounds how long and how many connections may sit without a complete request.

uvicorn alone does not stop slow clients: it has no timeout for a request's headers (its keep-alive timer is
cancelled by the first byte of the next request), and `limit_concurrency` is checked only once the headers are
in, counting the slow connections too, so a few thousand of them turn every legitimate request into a 503.
`guarded_protocol` adds the header timeout and a connection cap that evicts the oldest connection without a
request in progress rather than refusing the newest (see docs/serving.md for the measurements).
"""

# (no `from __future__ import annotations`, as in app.py: the ASGI callables are plain functions either way)
import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import resource  # POSIX (the project runs on Linux)

import numpy as np

from mixtral_jax.errors import ConfigError
from mixtral_jax.serving.protocol import error_body

_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Per-server limits; 0 (or None for the key) turns one off. Sizes in bytes, times in seconds.

    `max_queue`: requests waiting for a decode slot before new ones get 429; `max_connections`: open
    connections before the oldest idle one (or one still sending its headers) is closed for a new one."""

    max_body_bytes: int = 2 * 1024 * 1024
    max_json_depth: int = 64
    max_queue: int = 256
    max_connections: int = 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    api_key: str | None = None

    def __post_init__(self):
        for name in ("max_body_bytes", "max_json_depth", "max_queue", "max_connections", "header_timeout",
                     "body_timeout", "keep_alive_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; give a real one or none")


def json_depth(data: bytes) -> int:
    """How deeply `data`'s arrays and objects nest, found in a few vectorized passes without parsing (Python's own
    parser recurses, and raises RecursionError some thousand levels down): brackets inside strings do not count,
    and a quote is a string's end unless an odd number of backslashes precede it."""
    b = np.frombuffer(data, np.uint8)
    quotes = np.flatnonzero(b == ord('"'))
    if quotes.size and (b == ord("\\")).any():  # drop the escaped quotes: those after an odd backslash run
        others = np.flatnonzero(b != ord("\\"))
        previous = others[np.maximum(np.searchsorted(others, quotes) - 1, 0)]
        run = np.where(previous < quotes, quotes - previous - 1, quotes)  # backslashes just before each quote
        quotes = quotes[run % 2 == 0]
    brackets = np.flatnonzero(_OPEN[b])
    outside = np.searchsorted(quotes, brackets) % 2 == 0  # an even number of quotes before it: not in a string
    return int(np.cumsum(_OPEN[b[brackets[outside]]], dtype=np.int64).max(initial=0))


def _error_response(send, status: int, message: str, *, kind: str = "invalid_request_error", code=None,
                    headers: dict | None = None):
    body = error_body(message, kind=kind)
    body["error"]["code"] = code
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
           (b"connection", b"close")]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]

    async def respond():
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": data})

    return respond()


def guard_requests(app, limits: ServerLimits, on_reject=lambda reason: None):
    """ASGI middleware: a Bearer key on /v1/* (401 otherwise, compared in constant time), then the whole body
    read before the app runs, at most `max_body_bytes` of it (413 beyond, decided from Content-Length when
    there is one) within `body_timeout` (408), nested at most `max_json_depth` deep (400). Each refusal is
    also reported to `on_reject(reason)`."""
    key = limits.api_key.encode() if limits.api_key else None

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = dict(scope["headers"])
        if key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if not given:
                on_reject("unauthorized")
                return await _error_response(send, 401, "You didn't provide an API key: send it as "
                                             "'Authorization: Bearer <key>'.", code="invalid_api_key")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key):
                on_reject("unauthorized")
                return await _error_response(send, 401, "Incorrect API key provided.", code="invalid_api_key")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await app(scope, receive, send)
        cap = limits.max_body_bytes or None
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if cap and declared > cap:
            on_reject("body_too_large")
            return await _error_response(send, 413, f"the request body is {declared} bytes; this server takes at "
                                         f"most {cap} (--max-body-bytes)")
        try:
            body = await asyncio.wait_for(_read_body(receive, cap), limits.body_timeout or None)
        except TimeoutError:
            on_reject("body_timeout")
            return await _error_response(send, 408, f"the request body did not arrive within "
                                         f"{limits.body_timeout:g} s")
        except _Disconnected:
            return None
        if body is None:
            on_reject("body_too_large")
            return await _error_response(send, 413, f"the request body is over {cap} bytes (--max-body-bytes)")
        if limits.max_json_depth and json_depth(body) > limits.max_json_depth:
            on_reject("too_deep")
            return await _error_response(send, 400, f"the request body nests deeper than {limits.max_json_depth} "
                                         "levels (--max-json-depth)")
        return await app(scope, _replay(body, receive), send)

    return guarded


class _Disconnected(Exception):
    pass


async def _read_body(receive, cap: int | None) -> bytes | None:
    """The body, or None as soon as it passes `cap` bytes (the rest is never read)."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if cap and size > cap:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """A `receive` that hands the app the body already read, then the connection's own messages (disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def guarded_protocol(limits: ServerLimits):
    """uvicorn's HTTP protocol with two additions: a connection that has not sent a complete request's headers
    within `header_timeout` (counted from connect, or from the end of its previous response) is closed; and
    when `max_connections` are open, a new one closes the oldest that is idle or still sending headers."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    waiting: collections.OrderedDict = collections.OrderedDict()  # connections without a request in progress

    class GuardedProtocol(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._deadline = None
            if limits.max_connections and len(self.connections) > limits.max_connections:
                if waiting:
                    waiting.popitem(last=False)[0]._drop()
                else:  # every connection has a request running: this one waits its turn elsewhere
                    self.transport.close()
                    return
            self._wait_for_request()

        def _wait_for_request(self):
            self._seen_cycle = self.cycle
            waiting[self] = None
            if limits.header_timeout:
                self._deadline = self.loop.call_later(limits.header_timeout, self._drop)

        def _request_started(self):
            waiting.pop(self, None)
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _drop(self):
            self._request_started()
            if not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data):
            super().data_received(data)
            if self in waiting and self.cycle is not self._seen_cycle:  # a new request's headers are in
                self._request_started()

        def on_response_complete(self):
            done = self.cycle
            super().on_response_complete()  # may start a pipelined request at once
            if not self.transport.is_closing() and self in self.connections and self.cycle is done:
                self._request_started()
                self._wait_for_request()

        def connection_lost(self, exc):
            self._request_started()
            super().connection_lost(exc)

    return GuardedProtocol


def raise_open_file_limit(wanted_connections: int) -> int:
    """Raise this process's soft open-file limit toward its hard one (each connection is a descriptor; 1024,
    a common default, is under the default `max_connections` plus what JAX holds open). Returns the new soft
    limit (or a large number where there is none)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = wanted_connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (1 << 30) if soft == resource.RLIM_INFINITY else soft
