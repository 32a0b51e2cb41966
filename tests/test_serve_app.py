"""Server behaviour around the engine: rate limits, a full queue, loading, a stuck engine, the report, shutdown."""

from __future__ import annotations

import argparse
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import SlowTransformer, make_model, make_tokenizer, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.cli import main as cli_main
from murmur.commands.serve import settings_from_args
from murmur.errors import MurmurError
from murmur.infer.engine import Engine, EngineClosed
from murmur.infer.sampling import SamplingParams
from murmur.serve.app import create_app
from murmur.serve.launch import report_dir_of, served_name
from murmur.settings.serve import ServeSettings

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
LOCAL = "http://localhost"  # the Host a local client sends; TestClient's default, "testserver", is refused


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size)


def test_per_key_rate_limit_gives_429(model, tokenizer):
    app = create_app(ServeSettings(rate_limit_per_minute=2, api_keys=["a", "b"]), engine=Engine(model, tokenizer))
    with TestClient(app, base_url=LOCAL) as http:
        for _ in range(2):
            assert http.get("/v1/models", headers={"Authorization": "Bearer a"}).status_code == 200
        limited = http.get("/v1/models", headers={"Authorization": "Bearer a"})
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert http.get("/v1/models", headers={"Authorization": "Bearer b"}).status_code == 200


def test_full_queue_gives_429(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=1, max_queue=1)
    gate = threading.Event()
    with TestClient(create_app(engine=engine), base_url=LOCAL) as http:
        ids = tokenizer.encode("hello")
        first = engine.submit(ids, LONG, lambda out: gate.wait(5))  # holds the engine thread in its sink
        deadline = time.monotonic() + 10
        while engine.num_waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        second = engine.submit(ids, LONG, lambda out: None)
        response = http.post("/v1/chat/completions", json=CHAT)
        gate.set()
        engine.abort(first)
        engine.abort(second)
    assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"


def test_503_while_loading_then_ready(model, tokenizer):
    ready = threading.Event()

    def loader():
        ready.wait(10)
        return Engine(model, tokenizer)

    with TestClient(create_app(loader=loader), base_url=LOCAL) as http:
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "model_loading"
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 503
        ready.set()
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


class BlockingTransformer(SlowTransformer):
    """A model whose forward waits for a gate: an engine stuck in a kernel, as far as the server can tell."""

    gate: threading.Event

    def forward(self, *args, **kwargs):
        self.gate.wait(10)
        return super().forward(*args, **kwargs)


def test_a_stuck_engine_is_not_healthy(model, tokenizer):
    stuck = BlockingTransformer(model.settings).eval()
    stuck.load_state_dict(model.state_dict())
    stuck.gate = threading.Event()
    engine = Engine(stuck, tokenizer, stuck_after_s=0.2)
    settings = ServeSettings(health_timeout_s=0.5)
    with TestClient(create_app(settings, engine=engine), base_url=LOCAL) as http:
        engine.submit(tokenizer.encode("hello"), SamplingParams(max_tokens=2), lambda out: None)
        time.sleep(0.4)
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stuck"
        stuck.gate.set()
        deadline = time.monotonic() + 10
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/health").status_code == 200


def test_report_of_a_run_folder_is_served_safely(tmp_path, model, tokenizer):
    run = tmp_path / "myrun"
    (run / "report").mkdir(parents=True)
    (run / "model").mkdir()
    (run / "report" / "report.md").write_text("# Report\n\n![loss](loss.png)\n\n<script>alert(1)</script>\n")
    (run / "report" / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "secret.md").write_text("no")
    assert report_dir_of(run / "model") == run / "report" and served_name(run / "model") == "myrun"
    assert report_dir_of(tmp_path / "elsewhere") is None
    with TestClient(create_app(engine=Engine(model, tokenizer), report_dir=run / "report"), base_url=LOCAL) as http:
        page = http.get("/report")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert http.head("/report").status_code == 200  # the chat page shows its link when this answers
        assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self' covers scripts
        assert http.get("/report/report.md").text.startswith("# Report")
        assert http.get("/report/loss.png").headers["content-type"] == "image/png"
        assert http.get("/report/..%2Fsecret.md").status_code == 404
        assert http.get("/report/missing.png").status_code == 404
    with TestClient(create_app(engine=Engine(model, tokenizer)), base_url=LOCAL) as http:
        assert http.get("/report").status_code == 404 and http.head("/report").status_code == 404
        assert "Murmur chat" in http.get("/").text


def test_shutdown_finishes_short_requests_and_cancels_long_ones(model, tokenizer):
    engine = Engine(model, tokenizer)
    engine.start()
    outs = []
    ids = tokenizer.encode("hello")
    engine.submit(ids, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), outs.append)
    engine.shutdown(grace_s=5)
    assert [o.finish_reason for o in outs if o.finished] == ["length"]
    with pytest.raises(EngineClosed):
        engine.submit(ids, LONG, outs.append)
    slow = Engine(make_model(tokenizer.vocab_size, delay_s=0.01), tokenizer)
    slow.start()
    long_outs = []
    slow.submit(ids, LONG, long_outs.append)
    time.sleep(0.1)
    slow.shutdown(grace_s=0.1)
    assert long_outs[-1].finish_reason == "abort" and slow.num_running == 0


def test_serve_command_line(tmp_path, capsys, monkeypatch):
    assert cli_main(["serve", str(tmp_path / "absent")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", "--help"])
    assert exit_info.value.code == 0
    monkeypatch.setenv("MURMUR_API_KEYS", "k1, k2")
    args = argparse.Namespace(recipe=None, set=["serve.max_queue=7"], host=None, port=9000, model_name=None,
                              device="cpu", max_batch_size=None, rate_limit=None, api_key=["k0"], compile=True,
                              allowed_hosts=None, allowed_origins=None, trusted_proxy=None, quantize=None)
    settings = settings_from_args(args)
    assert settings.api_keys == ["k0", "k1", "k2"] and settings.max_queue == 7 and settings.port == 9000
    assert settings.compile is True
    args.set = ["train.lr=1"]
    with pytest.raises(MurmurError, match="serve"):
        settings_from_args(args)


class FailingTransformer(SlowTransformer):
    """A model whose decode steps raise: a generation that fails after the stream has begun."""

    def forward(self, tokens, *args, **kwargs):
        if tokens.shape[1] == 1:
            raise RuntimeError("simulated device failure")
        return super().forward(tokens, *args, **kwargs)


def test_a_failure_after_streaming_began_is_an_error_event(model, tokenizer):
    failing = FailingTransformer(model.settings).eval()
    failing.load_state_dict(model.state_dict())
    engine = Engine(failing, tokenizer)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True}
    with TestClient(create_app(engine=engine), base_url=LOCAL) as http:
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert events[0].startswith('data: {"id"') and events[-1] == "data: [DONE]"
        error = events[-2]
        # The reason stays in the server's log; the event names the stream's id instead (docs/security.md).
        assert error.startswith('data: {"error"') and "simulated device failure" not in error
        assert json.loads(events[0].removeprefix("data: "))["id"] in error
        plain = http.post("/v1/chat/completions", json=body)
        assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
        assert engine.num_running == 0 and engine.counters["errors"] == 2
