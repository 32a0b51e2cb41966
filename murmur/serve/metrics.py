"""Server metrics in the Prometheus text format (version 0.0.4), without a client library.

Counters and histograms are updated from the HTTP handlers and from the engine's thread, hence the
lock. Queue depth and running batch size are read from the engine when `/metrics` is scraped.
Every label has a fixed set of values (anything else is "other"), so no client can make a series.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict
from collections.abc import Iterable
from http import HTTPStatus

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
STATUSES = {status.value for status in HTTPStatus} | {499}  # 499: the client went away


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


class Histogram:
    """Cumulative-bucket histogram, rendered as Prometheus `_bucket`, `_sum` and `_count` series."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{bound}"}} {n}' for bound, n in zip(self.buckets, self.counts)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """Everything `/metrics` reports."""

    def __init__(self, routes: RouteLabels | None = None):
        self.routes = routes or RouteLabels()
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.request_latency = Histogram(LATENCY_BUCKETS)
        self.time_to_first_token = Histogram(LATENCY_BUCKETS)
        self.inter_token_latency = Histogram(TOKEN_LATENCY_BUCKETS)

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        """An HTTP request finished (its whole response sent); `method` and `path` as the client sent them."""
        path = self.routes.label(path)
        with self.lock:
            self.requests[(method_label(method), path, status_label(status))] += 1
            if path.startswith(self.routes.timed):
                self.request_latency.observe(seconds)

    def observe_generation(self, request) -> None:
        """An engine request finished: record its time to first token and gaps between tokens."""
        times = request.token_times
        if not times:
            return
        with self.lock:
            self.time_to_first_token.observe(times[0] - request.arrival)
            for before, after in itertools.pairwise(times):
                self.inter_token_latency.observe(after - before)

    def render(self, engine=None) -> str:
        """The Prometheus exposition text."""
        out = ["# HELP murmur_http_requests_total HTTP requests by method, path and status.",
               "# TYPE murmur_http_requests_total counter"]
        with self.lock:
            for (method, path, status), n in sorted(self.requests.items()):
                out.append(f'murmur_http_requests_total{{method="{method}",path="{_escape(path)}",'
                           f'status="{status}"}} {n}')
            for name, help_text, hist in (
                    ("murmur_request_latency_seconds", "End-to-end latency of /v1 requests.", self.request_latency),
                    ("murmur_time_to_first_token_seconds", "Time from arrival to the first sampled token.",
                     self.time_to_first_token),
                    ("murmur_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                     self.inter_token_latency)):
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.render(name)]
        if engine is not None:
            counters = engine.counters
            for name, kind, help_text, value in (
                    ("murmur_prompt_tokens_total", "counter", "Prompt tokens prefilled.", counters["prompt_tokens"]),
                    ("murmur_generation_tokens_total", "counter", "Tokens generated.", counters["generation_tokens"]),
                    ("murmur_engine_requests_finished_total", "counter", "Engine requests that ended normally.",
                     counters["finished"]),
                    ("murmur_engine_requests_aborted_total", "counter",
                     "Engine requests cancelled (client gone, stop pressed, shutdown).", counters["aborted"]),
                    ("murmur_engine_step_errors_total", "counter", "Engine steps that failed.", counters["errors"]),
                    ("murmur_queue_depth", "gauge", "Requests waiting for a slot.", engine.num_waiting),
                    ("murmur_running_batch_size", "gauge", "Requests in the running batch.", engine.num_running),
                    ("murmur_max_batch_size", "gauge", "KV-cache slots.", engine.max_batch_size)):
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
