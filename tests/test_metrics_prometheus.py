"""/metrics as Prometheus reads it: scraped from a served app and parsed by prometheus_client's own parser,
with vLLM's series names, so that dashboards written for vLLM read a Murmur server."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serve_fixtures import make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams
from murmur.serve.app import create_app
from murmur.serve.metrics import Metrics

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size)


def scrape(http) -> dict[str, dict]:
    """Every sample of /metrics by series name (with its suffix), parsed the way Prometheus parses it."""
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_metrics_parse_with_vllm_names_and_count_what_was_served(model, tokenizer):
    app = create_app(engine=Engine(model, tokenizer, max_batch_size=4), model_name="tiny")
    with TestClient(app, base_url=LOCAL) as http:
        for max_tokens in (3, 5):
            r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": max_tokens, "ignore_eos": True})
            assert r.status_code == 200
        usage = r.json()["usage"]
        samples = scrape(http)
    tiny = {"model_name": "tiny"}
    # The HTTP series: two chat completions answered 200 (the scrape itself is counted after it is sent).
    assert value(samples, "murmur_http_requests_total", method="POST", path="/v1/chat/completions",
                 status="200") == 2
    assert value(samples, "murmur_request_latency_seconds_count") == 2
    # The engine's series under vLLM's names and label. Only the two requests reached the engine.
    assert value(samples, "vllm:request_success_total", finished_reason="length", **tiny) == 2
    assert value(samples, "vllm:generation_tokens_total", **tiny) == 3 + 5
    assert value(samples, "vllm:request_generation_tokens_sum", **tiny) == 3 + 5
    assert value(samples, "vllm:request_prompt_tokens_sum", **tiny) == 2 * usage["prompt_tokens"]
    assert value(samples, "vllm:prompt_tokens_total", **tiny) == 2 * usage["prompt_tokens"]
    assert value(samples, "vllm:time_to_first_token_seconds_count", **tiny) == 2
    assert value(samples, "vllm:inter_token_latency_seconds_count", **tiny) == (3 - 1) + (5 - 1)
    assert value(samples, "vllm:e2e_request_latency_seconds_count", **tiny) == 2
    # Cumulative buckets: the +Inf bucket holds every observation.
    assert value(samples, "vllm:time_to_first_token_seconds_bucket", le="+Inf", **tiny) == 2
    # Nothing runs or waits once the answers are back; the cache is free.
    assert value(samples, "vllm:num_requests_running", **tiny) == 0
    assert value(samples, "vllm:num_requests_waiting", **tiny) == 0
    assert value(samples, "vllm:kv_cache_usage_perc", **tiny) == 0
    assert value(samples, "murmur_max_batch_size", **tiny) == 4


def test_queue_depth_running_and_kv_cache_use_come_from_the_engine(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2)
    engine.max_queue = 8
    metrics = Metrics(model_name="m")
    # Not started: submitted requests stay put, so the state is exactly what was submitted.
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    for i in range(3):
        engine.submit(tokenizer.encode(f"hello {i}"), params, sink=lambda out: None)
    engine.step()  # two slots taken (each has two of its four tokens), one request left waiting
    text = metrics.render(engine)
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["vllm:num_requests_running"] == 2
    assert samples["vllm:num_requests_waiting"] == 1
    assert samples["vllm:kv_cache_usage_perc"] == 1.0


def test_each_app_has_its_own_registry(model, tokenizer):
    first = create_app(engine=Engine(model, tokenizer, max_batch_size=1))
    second = create_app(engine=Engine(model, tokenizer, max_batch_size=1))
    with TestClient(first, base_url=LOCAL) as a, TestClient(second, base_url=LOCAL) as b:
        for _ in range(3):
            a.get("/v1/models")
        b.get("/v1/models")
        counted_a = value(scrape(a), "murmur_http_requests_total", method="GET", path="/v1/models", status="200")
        counted_b = value(scrape(b), "murmur_http_requests_total", method="GET", path="/v1/models", status="200")
    assert (counted_a, counted_b) == (3, 1)


def test_a_loading_server_reports_http_series_without_engine_series(model, tokenizer):
    import threading

    release = threading.Event()

    def loader():
        release.wait(30)
        return Engine(model, tokenizer, max_batch_size=1)

    app = create_app(loader=loader)
    with TestClient(app, base_url=LOCAL) as http:
        samples = scrape(http)
        release.set()
    assert "vllm:num_requests_running" not in samples and "vllm:prompt_tokens_total" not in samples
