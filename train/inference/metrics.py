"""Prometheus metrics of the completion server (``GET /metrics``, prometheus-client's text format).

One registry per app (tests run several apps in one process). Routes are labelled by their
template, never by the raw path, so a client probing random URLs cannot grow the label set.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
KNOWN_ROUTES = frozenset({"/health", "/metrics", "/v1/models", "/v1/completions", "/tokenize", "/detokenize",
                          "/tokenizer_info", "/docs", "/openapi.json"})


class ServerMetrics:
    """Counters, gauges and histograms of one server; ``render()`` is the /metrics body."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("codeneo_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.queue_depth = Gauge("codeneo_queue_depth", "Completions waiting for the engine", registry=r)
        self.queue_depth.set_function(lambda: engine.queue.qsize())
        self.rows_running = Gauge("codeneo_rows_running", "Completion rows being decoded now", registry=r)
        self.rows_running.set_function(lambda: getattr(engine, "rows_running", 0))
        self.ttft = Histogram("codeneo_time_to_first_token_seconds",
                              "From the request's arrival to its first generated token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.latency = Histogram("codeneo_request_latency_seconds", "End-to-end latency of completion requests",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("codeneo_generated_tokens", "Tokens generated (all choices)", registry=r)
        self.prompt_tokens = Counter("codeneo_prompt_tokens", "Prompt tokens of accepted requests", registry=r)

    def count(self, path: str, status: int) -> None:
        """Count one answered request."""
        self.requests.labels(path if path in KNOWN_ROUTES else "other", str(status)).inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
