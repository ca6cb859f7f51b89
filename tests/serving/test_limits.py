"""The server's limits and its API key, on a real `mixtral-jax serve` process run with small limits: each limit
refuses what it should with OpenAI's error body, and what is under it still works."""

import concurrent.futures
import json
import random
import socket
import time

import openai
import pytest

from mixtral_jax.cli.serve import check_vocabulary, exposure_warning
from mixtral_jax.errors import ConfigError
from mixtral_jax.serving.limits import ServerLimits, json_depth
from mixtral_jax.text.tokenizer import load_tokenizer
from tests.helpers.serve_process import (
    MODEL,
    body_of,
    get,
    metric,
    post,
    raw_exchange,
    serve_process,
    status_of,
    wait_for,
)

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 1 << 20
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 48
FLAGS = ("--max-batch", "1", "--max-context", "128", "--prefill-chunk", "16", "--api-key", KEY,
         "--max-body-bytes", str(MAX_BODY), "--max-json-depth", "16", "--max-queue", "1",
         "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", "2", "--max-connections", str(MAX_CONNECTIONS))


@pytest.fixture(scope="module")
def server():
    with serve_process(*FLAGS) as (proc, base, port):
        yield proc, base, port


def _client(base, key=KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


def _request(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


def _response(s: socket.socket) -> bytes:
    """One /health response read off a kept-alive connection (its body is the last thing sent)."""
    out = b""
    while not out.endswith(b"}"):
        out += s.recv(65536) or b"}"
    return out


def test_the_key_is_required_on_v1_and_health_stays_open(server):
    _, base, _ = server
    ok = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        status, error, _ = post(base, "/v1/completions", ok, headers=headers)
        assert status == 401 and error["error"]["code"] == "invalid_api_key", headers
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert get(base, "/v1/models")[0] == 401
    assert post(base, "/v1/completions", ok, headers=AUTH)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        _client(base, key="wrong").models.list()
    assert [m.id for m in _client(base).models.list().data] == [MODEL]
    assert get(base, "/health")[0] == 200 and get(base, "/metrics")[0] == 200
    assert metric(base, "mixtral_requests_rejected_total", 'reason="unauthorized"') >= 6


def test_a_body_over_the_limit_is_413_without_being_read(server):
    _, base, port = server
    # declares 50 MB and sends none of it: refused from Content-Length, at once
    start = time.monotonic()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {50 << 20}\r\n\r\n").encode()
    answer = raw_exchange(port, head, timeout=10)
    assert status_of(answer) == 413 and "--max-body-bytes" in body_of(answer)["error"]["message"]
    assert time.monotonic() - start < 5
    # no length given (chunked): read up to the cap, then refused
    chunk = b"a" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2 * MAX_BODY // len(chunk)))
    answer = raw_exchange(port, head.replace(f"Content-Length: {50 << 20}".encode(), b"Transfer-Encoding: chunked"),
                          then_send=chunked + b"0\r\n\r\n")
    assert status_of(answer) == 413
    assert metric(base, "mixtral_requests_rejected_total", 'reason="body_too_large"') >= 2
    # just under the cap: read and parsed (a 400 for the content, not for the size)
    status, error, _ = post(base, "/v1/completions", b'{"prompt": "' + b"a" * (MAX_BODY - 20) + b'"}', headers=AUTH)
    assert status == 400 and error["error"]["param"] in ("model", "prompt")  # too long a prompt, no model


def test_deep_json_is_400_not_500(server):
    _, base, _ = server
    for depth in (17, 1000, 100_000):
        body = ("[" * depth + "]" * depth).encode()
        status, error, _ = post(base, "/v1/completions", body, headers=AUTH)
        assert status == 400 and "--max-json-depth" in error["error"]["message"], depth
    nested = {"model": MODEL, "prompt": "x", "max_tokens": 2, "user": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}
    assert post(base, "/v1/completions", nested, headers=AUTH)[0] == 200  # brackets in strings do not count
    assert post(base, "/v1/completions", b"\xff\xfe{", headers=AUTH)[0] == 400


def test_json_depth_matches_a_recursive_count():
    def depth(x):
        if isinstance(x, (list, dict)):
            values = x.values() if isinstance(x, dict) else x
            return 1 + max(map(depth, values), default=0)
        return 0

    rng = random.Random(0)
    keys = ["k[", "k\\", "{"]
    leaves = ['a"[\\', "\\\\", "}{", 1, None, '\\"]', '\\\\\\"[', '"', "]]]"]

    def make(level):
        r = rng.random()
        if level > 7 or r < 0.3:
            return rng.choice(leaves)
        if r < 0.65:
            return [make(level + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys) + str(i): make(level + 1) for i in range(rng.randint(0, 3))}

    for _ in range(2000):
        x = make(0)
        assert json_depth(json.dumps(x).encode()) == depth(x), x
    assert json_depth(b"") == 0 and json_depth(b"[" * 1_000_000) == 1_000_000


def test_a_full_queue_is_429_with_retry_after(server):
    """One slot, a queue of one: the third concurrent request is refused; once the others finish, the next
    request is served."""
    _, base, _ = server
    client = _client(base)

    def stream(prompt):
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=120, temperature=0, stream=True)

    first = stream("def main():")
    next(iter(first))  # admitted: it holds the only slot
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        second = pool.submit(lambda: list(stream("import os")))
        assert wait_for(lambda: metric(base, "mixtral_queue_length") == 1, 60)
        status, error, headers = post(base, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2},
                                      headers=AUTH)
        assert status == 429 and error["error"]["type"] == "rate_limit_error"
        assert int(headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        first.close()
        assert second.result(timeout=120)[-1].choices[0].finish_reason == "length"
    assert wait_for(lambda: metric(base, "mixtral_busy_slots") == 0)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
    assert metric(base, "mixtral_requests_rejected_total", 'reason="queue_full"') == 2


def test_headers_and_bodies_that_never_finish_are_cut_off(server):
    _, base, port = server
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and the blank line never comes
        assert s.recv(1024) == b""  # closed by the server
    assert HEADER_TIMEOUT - 0.5 < time.monotonic() - start < HEADER_TIMEOUT + 5
    # an idle keep-alive connection that starts a second request and stalls is cut off too
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(s).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        assert s.recv(1024) == b""
    assert time.monotonic() - start < HEADER_TIMEOUT + 5
    answer = raw_exchange(port, _request("/v1/completions", b'{"model": "x"}' + b" " * 100)[:-90])
    assert status_of(answer) == 408
    assert get(base, "/health")[0] == 200


def test_past_the_connection_cap_the_oldest_idle_connection_makes_room(server):
    """Twice the cap of connections that send nothing: the oldest are closed as new ones arrive, and a client
    connecting after them all is still served."""
    _, base, port = server
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        status, answer, _ = post(base, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2},
                                 headers=AUTH, timeout=30)
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
        assert idle[0].recv(1) == b""  # the first idle one was closed to make room
        idle[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the newest is still open
        assert _response(idle[-1]).startswith(b"HTTP/1.1 200")
    finally:
        for s in idle:
            s.close()


def test_limit_flags_and_start_up_checks():
    with pytest.raises(ConfigError, match="max-queue"):
        ServerLimits(max_queue=-1)
    with pytest.raises(ConfigError, match="API key"):
        ServerLimits(api_key=" ")
    with pytest.raises(ConfigError, match="v1 tokenizer has 32000 tokens but the model has 32768"):
        check_vocabulary(load_tokenizer("v1"), 32768)
    assert check_vocabulary(load_tokenizer("v3"), 32768).version == "v3"
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", KEY) is None and exposure_warning("127.0.0.1", None) is None
