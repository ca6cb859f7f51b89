"""`mixtral-jax serve` as users run it: a real server process with the demo model on 127.0.0.1, driven by the
official `openai` client (and raw HTTP for malformed requests). Every wait is bounded."""

import concurrent.futures
import functools
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request

import openai
import pytest

from mixtral_jax.inference.sampling import SamplingParams
from mixtral_jax.serving.protocol import BadRequest, parse_request
from tests.helpers.processes import free_port

MODEL = "mixtral-jax-demo"
MAX_CONTEXT = 128


def _get(base, path, timeout=30):
    with urllib.request.urlopen(f"{base}{path}", timeout=timeout) as r:
        return r.status, r.read().decode()


def _post(base, path, data: bytes, timeout=120):
    req = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metric(base, name) -> float:
    for line in _get(base, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla")


@pytest.fixture(scope="module")
def server(compile_cache):
    """The demo model's server, warmed up (every step shape compiled at start-up) into a compile cache of
    its own (every program kept, however quick its compile)."""
    port = free_port()
    cache = compile_cache
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli", "serve", "--port", str(port), "--max-batch", "4",
                             "--max-context", str(MAX_CONTEXT), "--prefill-chunk", "16", "--drain-seconds", "20",
                             "--compile-cache", str(cache)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
        try:
            if _get(base, "/health", timeout=2)[0] == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("server did not come up in 300 s")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
    yield proc, base, client
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)

def test_the_warm_up_writes_the_step_programs_to_the_compile_cache(server, compile_cache):
    """What a restarted server loads instead of compiling: the warm-up's programs, one entry each at least
    (3 token-slot counts x 2 page-table widths at this context and chunk)."""
    entries = [f for f in compile_cache.rglob("*") if f.is_file()]
    assert len(entries) >= 6, entries


def test_models_completion_and_stream_agree(server):
    _, base, client = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert json.loads(_get(base, "/health")[1]) == {"status": "ok"}
    done = client.completions.create(model=MODEL, prompt="def read_config(path):", max_tokens=12, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.text.strip()
    assert done.usage.completion_tokens == 12 and done.usage.prompt_tokens == 8
    assert done.usage.total_tokens == 20
    chunks = list(client.completions.create(model=MODEL, prompt="def read_config(path):", max_tokens=12,
                                            temperature=0, stream=True))
    assert len(chunks) > 3  # streamed token by token, not in one piece
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streamed_and_not(server):
    _, _, client = server
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string_cuts_the_answer(server):
    _, _, client = server
    prompt = "def read_config(path):"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    # a stop string from the second half of the answer that is not only whitespace
    stop = next((full[i:i + 3] for i in range(len(full) // 2, len(full) - 2) if full[i:i + 3].strip()), None)
    assert stop, full
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


def test_concurrent_requests_equal_their_solo_answers(server):
    """Eight requests of different lengths on four slots: each greedy answer equals the same request served
    alone; a seeded sampled one equals itself alone too."""
    _, base, client = server
    prompts = ["x = 1", "class Parser:\n    def __init__(self, text):", "import sys", "def main(argv=None):\n    ",
               "for i in range(10):", "# Copyright", "return self.", "with open(path) as f:\n        data ="]
    lengths = [6, 20, 9, 14, 3, 17, 11, 8]

    def ask(i):
        seed = {"seed": 5, "temperature": 0.9} if i == 3 else {"temperature": 0}
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i], **seed)
        return r.choices[0].text, r.usage.completion_tokens

    solo = [ask(i) for i in range(len(prompts))]
    finished = _metric(base, "mixtral_requests_finished_total")
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts)), timeout=300))
    assert together == solo
    assert _metric(base, "mixtral_requests_finished_total") == finished + len(prompts)
    assert _metric(base, "mixtral_time_to_first_token_seconds_count") >= 2 * len(prompts)


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"model": MODEL, "prompt": "hi", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": "many"}).encode(), "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "hi", "n": 0}).encode(), "n"),
    (json.dumps({"model": MODEL, "prompt": "word " * 200}).encode(), "prompt"),
    (json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": MAX_CONTEXT}).encode(), "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": [1, 99999]}).encode(), "prompt"),
    (json.dumps(["a", "list"]).encode(), None),
    (json.dumps({"model": MODEL, "prompt": "hi", "top_k": 2.5}).encode(), "top_k"),
    (json.dumps({"model": MODEL, "prompt": "hi", "top_k": -2}).encode(), "top_k"),
    (json.dumps({"model": MODEL, "prompt": "hi", "top_k": "5"}).encode(), "top_k"),
    (json.dumps({"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}).encode(), "presence_penalty"),
    (json.dumps({"model": MODEL, "prompt": "hi", "frequency_penalty": -3}).encode(), "frequency_penalty"),
    (json.dumps({"model": MODEL, "prompt": "hi", "repetition_penalty": 0}).encode(), "repetition_penalty"),
    (json.dumps({"model": MODEL, "prompt": "hi", "repetition_penalty": "high"}).encode(), "repetition_penalty"),
])
def test_bad_completion_requests_get_400_with_an_openai_error(server, body, param):
    _, base, _ = server
    status, error = _post(base, "/v1/completions", body)
    assert status == 400 and error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    assert error["error"]["param"] == param


def test_parse_request_passes_top_k_and_the_penalties_to_the_engine():
    """The body's top_k (-1 or 0: off) and penalties reach the engine's SamplingParams as given."""
    from mixtral_jax.text.tokenizer import load_tokenizer

    seen = []
    engine = types.SimpleNamespace(max_context=MAX_CONTEXT,
                                   validate=lambda prompt, params: seen.append(params) or prompt)
    parse = functools.partial(parse_request, chat=False, model_name=MODEL, tokenizer=load_tokenizer(), engine=engine)
    body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.5, "top_k": 5, "top_p": 0.9, "seed": 3,
            "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.2}
    assert parse(body).params == SamplingParams(max_tokens=4, temperature=0.5, top_k=5, top_p=0.9, seed=3,
                                                presence_penalty=0.5, frequency_penalty=-1.0,
                                                repetition_penalty=1.2)
    for off in (-1, 0, None):
        assert parse(body | {"top_k": off}).params.top_k is None
    plain = parse({"prompt": [5], "seed": 1}).params
    assert (plain.top_k, plain.repetition_penalty, plain.presence_penalty, plain.frequency_penalty) == (None, 1, 0, 0)
    with pytest.raises(BadRequest, match="top_k") as e:
        parse(body | {"top_k": True})
    assert e.value.param == "top_k"
    assert len(seen) == 5  # each good body was checked by the engine, the bad one never reached it


def test_top_k_and_penalties_are_applied(server):
    """top_k 1 makes a hot sampled answer the greedy one whatever the seed; -1 and 0 leave sampling as it
    was; the penalties change the greedy answer, reproducibly, and their neutral values change nothing."""
    _, _, client = server
    prompt = "def read_config(path):"

    def ask(**kwargs):
        extra = {k: kwargs.pop(k) for k in ("top_k", "repetition_penalty") if k in kwargs}
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, extra_body=extra,
                                         **kwargs).choices[0].text

    greedy = ask(temperature=0)
    assert ask(temperature=1.5, seed=1, top_k=1) == ask(temperature=1.5, seed=2, top_k=1) == greedy
    hot = ask(temperature=1.5, seed=1)
    assert hot != greedy and ask(temperature=1.5, seed=1, top_k=-1) == hot == ask(temperature=1.5, seed=1, top_k=0)
    for penalty in (dict(presence_penalty=2.0), dict(frequency_penalty=2.0), dict(repetition_penalty=3.0)):
        penalised = ask(temperature=0, **penalty)
        assert penalised != greedy and ask(temperature=0, **penalty) == penalised, penalty
    assert ask(temperature=0, presence_penalty=0, frequency_penalty=0, repetition_penalty=1) == greedy


def test_bad_chat_requests_through_the_client(server):
    _, base, client = server
    for messages in ([], [{"role": "wizard", "content": "hi"}], [{"role": "assistant", "content": "hi"}]):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
        assert e.value.status_code == 400 and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], top_p=1.5)
    assert _get(base, "/health")[0] == 200


def test_client_disconnect_mid_stream_frees_the_slot(server):
    _, base, client = server
    stream = client.completions.create(model=MODEL, prompt="def parse(text):", max_tokens=100, temperature=0,
                                       stream=True)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices[0].text)
        if got == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60
    while _metric(base, "mixtral_busy_slots") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(base, "mixtral_busy_slots") == 0
    tokens = _metric(base, "mixtral_tokens_generated_total")
    answer = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens == 3
    assert _metric(base, "mixtral_tokens_generated_total") == tokens + 3  # the abandoned stream stopped


def test_client_hanging_up_before_a_plain_answer_frees_the_slot(server):
    _, base, _ = server
    tokens = _metric(base, "mixtral_tokens_generated_total")
    conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": MODEL, "prompt": "def f(x):",
                                                                "max_tokens": 100, "temperature": 0}),
                 headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while _metric(base, "mixtral_tokens_generated_total") < tokens + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.close()
    while _metric(base, "mixtral_busy_slots") > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(base, "mixtral_busy_slots") == 0
    assert _metric(base, "mixtral_tokens_generated_total") < tokens + 100


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_serve_what_one_does(server):
    """A 2-process run joined by jax.distributed (gloo on 127.0.0.1), the demo model expert-parallel over
    both: process 0 serves HTTP and broadcasts each step's plan, process 1 runs the same steps; the answers
    equal the one-process server's, and SIGTERM to process 0 ends both cleanly."""
    _, _, client = server
    port, coordinator = free_port(), free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                   MIXTRAL_JAX_COORDINATOR=f"127.0.0.1:{coordinator}", MIXTRAL_JAX_NUM_PROCESSES="2",
                   MIXTRAL_JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli", "serve", "--port", str(port),
                                       "--mesh", "expert=2", "--max-batch", "2", "--max-context", str(MAX_CONTEXT),
                                       "--prefill-chunk", "16"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            try:
                if _get(base, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert all(p.poll() is None for p in procs), [p.communicate(timeout=30)[0][-3000:] for p in procs]
        two = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300)
        asks = [dict(prompt="import os\n", max_tokens=8, temperature=0),
                dict(prompt="def main():", max_tokens=12, temperature=0.9, seed=3),
                dict(prompt="x = 1", max_tokens=5, temperature=0)]
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            got = list(pool.map(lambda a: two.completions.create(model=MODEL, **a).choices[0].text, asks,
                                timeout=300))
        assert got == [client.completions.create(model=MODEL, **a).choices[0].text for a in asks]
        procs[0].send_signal(signal.SIGTERM)
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


def test_sigterm_drains_and_exits_cleanly(server):
    proc, base, client = server
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.completions.create, model=MODEL, prompt="import os", max_tokens=30,
                              temperature=0)
        deadline = time.monotonic() + 60
        while _metric(base, "mixtral_busy_slots") == 0 and time.monotonic() < deadline and not running.done():
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        answer = running.result(timeout=120)  # the in-flight request still completes (drained)
    assert answer.usage.completion_tokens == 30
    assert proc.wait(timeout=60) == 0
