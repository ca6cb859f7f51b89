"""`/metrics` through `prometheus_client`: latency histograms observed as requests finish, and the engine's own
counters and gauges read at scrape time (the engine keeps plain ints, so a scrape never waits on its thread).

Each app has its own registry, so several servers (or tests) in one process do not collide. `prometheus_client`
is part of the optional `serve` extra, imported when a server is built, like FastAPI.
"""

import threading
import time

from mixtral_jax.inference.engine import Engine, Request

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a small model on a CPU (milliseconds) to a large one behind a long queue (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    """The server's metrics; `observe` a request once it finished, `reject` a request refused before it ran."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("mixtral_time_to_first_token_seconds", "From submission to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("mixtral_time_per_output_token_seconds",
                              "Per request: (last token - first token) / (tokens - 1), requests of 2+ tokens.",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("mixtral_request_latency_seconds", "From submission to the finish, end to end.",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter("mixtral_requests", "Requests finished, by finish reason (cancelled: the client "
                                "went away; abort: the engine failed).", ["finish_reason"], registry=r)
        self.rejected = Counter("mixtral_requests_rejected", "Requests refused before reaching the engine, by "
                                "reason (unauthorized, body_too_large, too_deep, body_timeout, queue_full).",
                                ["reason"], registry=r)
        r.register(_EngineCollector(engine))

    def observe(self, request: Request, reason: str, now: float) -> None:
        """`now` on `time.perf_counter`'s clock, as the request's own timestamps."""
        self.finished.labels(reason).inc()
        self.latency.observe(now - request.submitted)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted)
            if request.n_generated > 1:
                self.tpot.observe((now - request.first_token_at) / (request.n_generated - 1))

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's state and counters, read when scraped."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def describe(self):
        return []  # nothing to check for name clashes ahead of time: the names below are fixed

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        e, s = self.engine, self.engine.stats
        yield GaugeMetricFamily("mixtral_queue_length", "Requests waiting for a slot.", value=len(e.waiting))
        yield GaugeMetricFamily("mixtral_busy_slots", "Decode slots in use (prefilling included).",
                                value=e.busy_slots)
        yield GaugeMetricFamily("mixtral_slots", "Decode slots in all (--max-batch).", value=e.config.max_batch)
        yield GaugeMetricFamily("mixtral_kv_cache_columns_used", "KV tokens the held pages span.",
                                value=e.length)
        yield GaugeMetricFamily("mixtral_kv_cache_columns", "KV tokens all pages hold.", value=e.size)
        yield CounterMetricFamily("mixtral_tokens_generated", "Completion tokens generated.",
                                  value=s.tokens_generated)
        yield CounterMetricFamily("mixtral_prompt_tokens", "Prompt tokens prefilled.", value=s.prompt_tokens)
        yield CounterMetricFamily("mixtral_requests_finished", "Requests finished, cancelled ones included.",
                                  value=s.requests_finished)


class MeteredEngine:
    """The engine as the response code sees it: `submit` also observes each request in `metrics` when it
    finishes, by the reason the client gets: the engine's, except that a request the response code stopped
    because a stop string matched (`stopped_by`, set before it cancels) counts as "stop", and only a client
    going away as "cancelled"; everything else is the engine's own."""

    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self._engine, self._metrics = engine, metrics

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, prompt, params, on_token=lambda t: None, on_finish=lambda r: None, constraint=None,
               adapter=None) -> Request:
        lock, seen = threading.Lock(), {}

        def observe_once():  # the request may finish before `submit` has returned it
            with lock:
                if "request" in seen and "reason" in seen and not seen.get("done"):
                    seen["done"] = True
                    reason, now = seen["reason"]
                    if reason == "cancelled":
                        reason = getattr(seen["request"], "stopped_by", None) or reason
                    self._metrics.observe(seen["request"], reason, now)

        def finished(reason):
            seen["reason"] = (reason, time.perf_counter())
            observe_once()
            on_finish(reason)

        seen["request"] = self._engine.submit(prompt, params, on_token, finished, constraint, adapter)
        observe_once()
        return seen["request"]
