"""Prometheus metrics under TGI's names, so dashboards built for TGI work unchanged.

Each app owns its registry (no process-global state: two apps in one process, as in the tests,
count separately). Every update and every scrape happens on the event loop thread, so the plain
counters below need no lock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GENERATION_PATHS = frozenset({"/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions"})
DURATION_BUCKETS = tuple(0.0001 * 1.5**i for i in range(35))  # TGI's: 100 µs growing by 1.5x


def linear_buckets(limit: int, steps: int = 20) -> tuple[float, ...]:
    """TGI's token-count buckets: `limit` cut into 20 equal steps."""
    step = max(limit / steps, 1.0)
    return tuple(step * (i + 1) for i in range(steps))


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip(self.bounds, self.counts):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", self.n))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.total)


@dataclass
class RequestTimer:
    """perf_counter stamps of one request's phases (TGI's validation / queue / inference split)."""

    start: float = field(default_factory=time.perf_counter)
    validated: float | None = None
    first_token: float | None = None  # queue time here includes the prefill, which TGI counts as inference
    end: float | None = None

    def mark_validated(self) -> None:
        self.validated = time.perf_counter()

    def mark_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def mark_end(self) -> None:
        self.end = time.perf_counter()

    @property
    def validation_s(self) -> float:
        return (self.validated or self.start) - self.start

    @property
    def queue_s(self) -> float:
        return (self.first_token or self.end or self.start) - (self.validated or self.start)

    @property
    def inference_s(self) -> float:
        return (self.end or time.perf_counter()) - (self.first_token or self.validated or self.start)

    @property
    def total_s(self) -> float:
        return (self.end or time.perf_counter()) - self.start


HISTOGRAM_DOCS = {
    "tgi_request_duration": "End-to-end request time in seconds",
    "tgi_request_validation_duration": "Validation and tokenization time in seconds",
    "tgi_request_queue_duration": "Time from admission to the first token in seconds",
    "tgi_request_inference_duration": "Time from the first to the last token in seconds",
    "tgi_request_mean_time_per_token_duration": "Mean seconds per generated token",
    "tgi_request_generated_tokens": "Generated tokens per request",
    "tgi_request_input_length": "Prompt tokens per request",
    "tgi_request_max_new_tokens": "max_new_tokens per request",
}


class Metrics:
    """Request counters and histograms, plus the engine's queue and batch gauges read at scrape time."""

    def __init__(self, max_input_tokens: int, max_total_tokens: int, engine_stats: Callable[[], object]) -> None:
        self.engine_stats = engine_stats
        self.requests = 0
        self.successes = 0
        self.failures: Counter[str] = Counter()
        self.histograms = {name: Histogram(DURATION_BUCKETS) for name in HISTOGRAM_DOCS if name.endswith("duration")}
        self.histograms["tgi_request_generated_tokens"] = Histogram(linear_buckets(max_total_tokens))
        self.histograms["tgi_request_input_length"] = Histogram(linear_buckets(max_input_tokens))
        self.histograms["tgi_request_max_new_tokens"] = Histogram(linear_buckets(max_total_tokens))
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def request_started(self) -> None:
        self.requests += 1

    def request_validated(self, input_length: int, max_new_tokens: int) -> None:
        self.histograms["tgi_request_input_length"].observe(input_length)
        self.histograms["tgi_request_max_new_tokens"].observe(max_new_tokens)

    def request_failed(self, path: str, error_type: str, reached_route: bool) -> None:
        if path not in GENERATION_PATHS:
            return
        if not reached_route:
            self.requests += 1
        self.failures[error_type] += 1

    def request_succeeded(self, timer: RequestTimer, generated_tokens: int) -> None:
        self.successes += 1
        h = self.histograms
        h["tgi_request_duration"].observe(timer.total_s)
        h["tgi_request_validation_duration"].observe(timer.validation_s)
        h["tgi_request_queue_duration"].observe(timer.queue_s)
        h["tgi_request_inference_duration"].observe(timer.inference_s)
        if generated_tokens:
            h["tgi_request_mean_time_per_token_duration"].observe(timer.inference_s / generated_tokens)
        h["tgi_request_generated_tokens"].observe(generated_tokens)

    def collect(self) -> Iterator[Metric]:
        # Counters are exposed untyped: prometheus_client would rename a counter to `<name>_total`,
        # and TGI's dashboards query `tgi_request_count`, `tgi_request_success`, ... as they are.
        yield _untyped("tgi_request_count", "Requests received by the generation routes", self.requests)
        yield _untyped("tgi_request_success", "Requests that completed", self.successes)
        failure = Metric("tgi_request_failure", "Requests that failed, by error type", "unknown")
        for error_type, n in sorted(self.failures.items()):
            failure.add_sample("tgi_request_failure", {"err": error_type}, n)
        yield failure
        for name, histogram in self.histograms.items():
            yield histogram.family(name, HISTOGRAM_DOCS[name])
        stats = self.engine_stats()
        yield GaugeMetricFamily("tgi_queue_size", "Requests waiting for a batch slot", value=stats.queue_size)
        yield GaugeMetricFamily("tgi_batch_current_size", "Sequences in the running batch", value=stats.batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _untyped(name: str, doc: str, value: float) -> Metric:
    metric = Metric(name, doc, "unknown")
    metric.add_sample(name, {}, value)
    return metric
