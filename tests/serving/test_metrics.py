"""/metrics as Prometheus scrapes it, after real requests to a `mixtral-jax serve` process: the histograms
count each finished request once and agree with what the client measured, and the counters and gauges move
with the requests."""

import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.serve_process import MODEL, get, post, serve_process, wait_for


@pytest.fixture(scope="module")
def server():
    with serve_process("--max-batch", "2", "--max-context", "128", "--prefill-chunk", "16") as (_, base, _port):
        yield base


def _scrape(base) -> dict:
    """{(sample name, labels as a sorted tuple): value}, parsed by prometheus_client's own parser."""
    status, text = get(base, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_histograms_counters_and_gauges_after_real_requests(server):
    base = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    before = _scrape(base)
    assert before[("mixtral_slots", ())] == 2 and before[("mixtral_busy_slots", ())] == 0
    start = time.perf_counter()
    answer = client.completions.create(model=MODEL, prompt="def read_config(path):", max_tokens=12, temperature=0)
    wall = time.perf_counter() - start
    assert answer.usage.completion_tokens == 12
    stop = answer.choices[0].text[4:7]  # matched on text while the engine still runs: the cut is a "stop"
    assert stop.strip() and stop not in answer.choices[0].text[:6]
    cut = client.completions.create(model=MODEL, prompt="def read_config(path):", max_tokens=12, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == answer.choices[0].text[:4]
    stream = client.completions.create(model=MODEL, prompt="import os", max_tokens=40, temperature=0, stream=True)
    next(iter(stream))
    running = _scrape(base)
    assert running[("mixtral_busy_slots", ())] == 1
    stream.close()  # the client goes away: finished as "cancelled"
    assert wait_for(lambda: _scrape(base)[("mixtral_busy_slots", ())] == 0)
    assert post(base, "/v1/completions", b"{bad")[0] == 400  # refused before the engine: no histogram sample
    after = _scrape(base)

    def grew(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("mixtral_requests_total", (("finish_reason", "length"),)) == 1
    assert grew("mixtral_requests_total", (("finish_reason", "cancelled"),)) == 1
    assert grew("mixtral_requests_total", (("finish_reason", "stop"),)) == 1  # the stop string's cut
    assert grew("mixtral_requests_finished_total") == 3
    assert grew("mixtral_request_latency_seconds_count") == 3
    assert grew("mixtral_time_to_first_token_seconds_count") == 3
    assert grew("mixtral_time_per_output_token_seconds_count") >= 1  # the cancelled one: if it got 2+ tokens
    assert grew("mixtral_tokens_generated_total") >= 13
    assert grew("mixtral_request_latency_seconds_sum") > grew("mixtral_time_to_first_token_seconds_sum") > 0
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in after.items()
                     if k[0] == "mixtral_request_latency_seconds_bucket")
    assert buckets[-1] == (float("inf"), after[("mixtral_request_latency_seconds_count", ())])
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))  # cumulative
    assert next(v for le, v in buckets if le >= wall) >= 1  # the plain request took no longer than the client saw
    assert after[("mixtral_queue_length", ())] == 0
