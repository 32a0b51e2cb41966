"""The one generation service behind chat and text completions: one prompt check with one wording, one
error shape on both routes, and a client that leaves taking its generation (and its KV-cache slot) with it.

The disconnect tests drive the ASGI app directly, so the test decides exactly when the client goes: after
the request holds the engine's only slot, and long before its 200 tokens could be done.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.errors import RequestError
from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams
from murmur.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL = "http://localhost"
LONG_REPLY = {"max_tokens": 200, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size)


def refusal(engine: Engine, ids: list[int], max_tokens: int | None) -> RequestError:
    """What the engine itself says about a prompt it cannot serve."""
    with pytest.raises(RequestError) as refused:
        engine.generate([ids], SamplingParams(max_tokens=max_tokens))
    return refused.value


def test_chat_and_completions_refuse_an_over_long_prompt_alike(model, tokenizer):
    engine = Engine(model, tokenizer, max_seq_len=64)
    messages = [{"role": "user", "content": "hello world " * 40}]
    ids = tokenizer.render_chat(messages, add_generation_prompt=True)  # what the chat route submits
    assert len(ids) > 64
    too_long = refusal(engine, ids, max_tokens=None)
    short = [{"role": "user", "content": "hi"}]
    short_ids = tokenizer.render_chat(short, add_generation_prompt=True)
    no_room = refusal(engine, short_ids, max_tokens=60)
    with TestClient(create_app(engine=engine), base_url=LOCAL) as http:
        answers = [
            (http.post("/v1/chat/completions", json={"messages": messages}), too_long, "messages"),
            (http.post("/v1/completions", json={"prompt": ids}), too_long, "prompt"),
            (http.post("/v1/chat/completions", json={"messages": short, "max_completion_tokens": 60}), no_room,
             "max_completion_tokens"),
            (http.post("/v1/chat/completions", json={"messages": short, "max_tokens": 60}), no_room, "max_tokens"),
            (http.post("/v1/completions", json={"prompt": short_ids, "max_tokens": 60}), no_room, "max_tokens"),
        ]
    for response, expected, param in answers:
        assert response.status_code == 400, response.text
        # The engine's words, its code, and the request field the caller should change.
        assert response.json() == {"error": {"message": str(expected), "type": "invalid_request_error",
                                             "param": param, "code": "context_length_exceeded"}}
    assert too_long.code == no_room.code == "context_length_exceeded"
    assert (too_long.param, no_room.param) == ("prompt", "max_tokens")


def test_token_ids_outside_the_vocabulary_are_refused_by_the_one_check(model, tokenizer):
    engine = Engine(model, tokenizer)
    expected = refusal(engine, [1, tokenizer.vocab_size], max_tokens=4)
    with TestClient(create_app(engine=engine), base_url=LOCAL) as http:
        response = http.post("/v1/completions", json={"prompt": [1, tokenizer.vocab_size], "max_tokens": 4})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": str(expected), "type": "invalid_request_error",
                                        "param": "prompt", "code": "invalid_value"}


async def leave_while_generating(app, engine: Engine, body: dict) -> list[dict]:
    """POST `body` to the chat route as a client that disconnects once its request is generating; returns
    the ASGI messages the app sent."""
    sent: list[dict] = []
    gone = asyncio.Event()
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 5000), "server": ("localhost", 80),
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")]}
    call = asyncio.ensure_future(app(scope, receive, send))
    deadline = time.monotonic() + 30  # a guard against hanging, not a measurement
    while engine.counters["generation_tokens"] < 2 and not call.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert engine.num_running == 1, "the request never started generating"
    gone.set()
    await asyncio.wait_for(call, timeout=60)
    return sent


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_its_engine_slot(tokenizer, stream):
    # 200 tokens at >= 5 ms a step: the request cannot end on its own before the client leaves.
    engine = Engine(make_model(tokenizer.vocab_size, delay_s=0.005), tokenizer, max_batch_size=1)
    app = create_app(engine=engine)
    body = {"messages": [{"role": "user", "content": "tell me everything"}], "stream": stream, **LONG_REPLY}
    try:
        sent = asyncio.run(leave_while_generating(app, engine, body))
        deadline = time.monotonic() + 30
        while (engine.num_running or engine.counters["aborted"] == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_running == 0 and engine.num_waiting == 0 and not engine._requests
        assert engine.counters["aborted"] == 1 and engine.counters["finished"] == 0
        assert engine.counters["generation_tokens"] < 200
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == (200 if stream else 499)
        # The slot is free again: the next request is served.
        [after] = engine.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert after.completion_tokens == 3
    finally:
        engine.shutdown(0)


def test_every_route_has_its_own_metrics_label(model, tokenizer, tmp_path):
    (tmp_path / "report.md").write_text("# Report\n")
    (tmp_path / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    app = create_app(engine=Engine(model, tokenizer), report_dir=tmp_path)
    paths = ["/", "/report", "/report/loss.png", "/ui/app.js", "/health", "/metrics", "/v1/models", "/openapi.json"]
    with TestClient(app, base_url=LOCAL) as http:
        for path in paths:
            assert http.get(path).status_code == 200, path
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 1}).status_code == 200
        text = http.get("/metrics").text
    labels = {"/report/loss.png": "/report/*", "/ui/app.js": "/ui/*"}
    for path in [*paths, "/v1/completions", "/v1/chat/completions"]:
        assert f'path="{labels.get(path, path)}",status="200"' in text, path
