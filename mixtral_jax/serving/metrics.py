"""`/metrics`: the engine's counters in Prometheus' text format."""

from mixtral_jax.inference.engine import Engine


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
