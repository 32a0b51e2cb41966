"""Server metrics for Prometheus, through `prometheus_client`, in a registry of each app's own.

The engine's series carry vLLM's names, label (`model_name`) and histogram buckets, so that a Grafana
dashboard or alert written for vLLM reads a Murmur server unchanged; series vLLM has no counterpart for
(HTTP requests, step errors, slots) are `murmur_*` (docs/serve.md lists both). Histograms and HTTP counters
are updated from the handlers and the engine's thread (prometheus_client's metrics are thread-safe); the
engine's own counters and gauges are read from it when `/metrics` is scraped. Every label has a fixed set of
values (anything else is "other"), so no client can make a series.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# /v1 request latency (HTTP, whole response sent): Murmur's own series.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# vLLM's buckets (vllm/v1/metrics/loggers.py), so that its dashboards' quantiles mean the same here.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
TOKEN_COUNT_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 500000

METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
STATUSES = {status.value for status in HTTPStatus} | {499}  # 499: the client went away
FINISH_REASONS = ("stop", "length", "abort", "error")  # the engine's, as vLLM's finished_reason label


class RouteLabels:
    """The `path` label of a request: a route of the server, `PREFIX/*` for a route with parameters or a
    mounted folder (`/report/*`, `/ui/*`), or "other".

    Made from the app's own path templates (`/report/{name}`, `/ui/{path}`), so a new route gets its label
    without a list to keep in step. `timed` is the prefix of the routes whose latency is measured (/v1/).
    """

    def __init__(self, templates: Iterable[str] = (), timed: str = "/v1/"):
        self.exact = {t for t in templates if "{" not in t}
        self.prefixes = sorted({t[:t.index("{")] for t in templates if "{" in t}, key=len, reverse=True)
        self.timed = timed

    def label(self, path: str) -> str:
        if path in self.exact:
            return path
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return prefix + "*"
        return "other"


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if status in STATUSES else "other"


def finish_label(reason: str | None) -> str:
    return reason if reason in FINISH_REASONS else "error"


class EngineCollector:
    """The engine's cumulative counters and current state, read at scrape time (the engine owns them)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.engine = None  # set by Metrics.render; None while the model loads

    def describe(self):
        return []  # the series exist only once an engine does

    def collect(self):
        engine = self.engine
        if engine is None:
            return
        labels, value = ["model_name"], [self.model_name]

        def family(kind, name: str, help_text: str, number: float):
            metric = kind(name, help_text, labels=labels)
            metric.add_metric(value, number)
            return metric

        counters = engine.counters
        yield family(CounterMetricFamily, "vllm:prompt_tokens", "Prompt tokens prefilled.", counters["prompt_tokens"])
        yield family(CounterMetricFamily, "vllm:generation_tokens", "Tokens generated.", counters["generation_tokens"])
        yield family(CounterMetricFamily, "murmur_engine_step_errors", "Engine steps that failed.", counters["errors"])
        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Requests in the running batch.",
                     engine.num_running)
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting for a KV-cache slot.",
                     engine.num_waiting)
        # Murmur preallocates one full-context slot per running request, so the share of slots held is
        # what vLLM's block usage means to an operator: at 1 a new request waits.
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc",
                     "KV-cache usage: share of slots held by running requests; 1 means 100 percent.",
                     engine.num_running / engine.max_batch_size)
        yield family(GaugeMetricFamily, "murmur_max_batch_size", "KV-cache slots (requests run at once).",
                     engine.max_batch_size)


class Metrics:
    """Everything `/metrics` reports, in a registry of its own (several apps in one process do not collide)."""

    def __init__(self, routes: RouteLabels | None = None, model_name: str = "murmur"):
        self.routes = routes or RouteLabels()
        self.registry = CollectorRegistry()
        self.engine_collector = EngineCollector(model_name)
        self.registry.register(self.engine_collector)
        reg, labels = self.registry, ["model_name"]
        self.requests = Counter("murmur_http_requests", "HTTP requests by method, path and status.",
                                ["method", "path", "status"], registry=reg)
        self.request_latency = Histogram("murmur_request_latency_seconds", "Latency of /v1 HTTP requests, until "
                                         "the whole response is sent.", buckets=LATENCY_BUCKETS, registry=reg)
        self.request_success = Counter("vllm:request_success", "Engine requests finished, by finished_reason "
                                       "(stop, length, abort: cancelled, error).", [*labels, "finished_reason"],
                                       registry=reg)
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first "
                                             "sampled token.", labels, buckets=TTFT_BUCKETS, registry=reg)
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive "
                                             "tokens of a request.", labels, buckets=INTER_TOKEN_BUCKETS, registry=reg)
        self.e2e_latency = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival in the engine to "
                                     "the last token.", labels, buckets=E2E_BUCKETS, registry=reg)
        self.request_prompt_tokens = Histogram("vllm:request_prompt_tokens", "Prompt tokens of a finished "
                                               "request.", labels, buckets=TOKEN_COUNT_BUCKETS, registry=reg)
        self.request_generation_tokens = Histogram("vllm:request_generation_tokens", "Tokens generated by a "
                                                   "finished request.", labels, buckets=TOKEN_COUNT_BUCKETS,
                                                   registry=reg)
        self.model_name = model_name

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        """An HTTP request finished (its whole response sent); `method` and `path` as the client sent them."""
        path = self.routes.label(path)
        self.requests.labels(method_label(method), path, status_label(status)).inc()
        if path.startswith(self.routes.timed):
            self.request_latency.observe(seconds)

    def observe_generation(self, request) -> None:
        """An engine request finished: its reason, token counts, time to first token, gaps and total time."""
        name = self.model_name
        self.request_success.labels(name, finish_label(request.finish_reason)).inc()
        self.request_prompt_tokens.labels(name).observe(len(request.prompt_ids))
        self.request_generation_tokens.labels(name).observe(len(request.output_ids))
        self.e2e_latency.labels(name).observe(time.monotonic() - request.arrival)
        times = request.token_times
        if times:
            self.time_to_first_token.labels(name).observe(times[0] - request.arrival)
            gaps = self.inter_token_latency.labels(name)
            for before, after in itertools.pairwise(times):
                gaps.observe(after - before)

    def render(self, engine=None) -> str:
        """The Prometheus exposition text; the engine's series when `engine` is given."""
        self.engine_collector.engine = engine
        return generate_latest(self.registry).decode()
