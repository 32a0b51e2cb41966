"""The OpenAI-compatible server, live on loopback, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_fixtures import LiveServer, make_model, make_tokenizer, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.infer.engine import Engine
from murmur.serve.app import create_app
from murmur.settings.serve import ServeSettings

KEY = "test-key"
MODEL = "tiny-test"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def live(tokenizer):
    """One server for the whole module: a tiny model that sleeps 3 ms a step, so long requests stay long."""
    model = make_model(tokenizer.vocab_size, max_seq_len=256, delay_s=0.003)
    engine = Engine(model, tokenizer, max_batch_size=16, max_queue=200, prefix_cache=4)
    settings = ServeSettings(api_keys=[KEY], default_max_tokens=16, max_body_bytes=100_000)
    app = create_app(settings, engine=engine, model_name=MODEL)
    with LiveServer(app) as server:
        server.engine = engine
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def metric(live, name: str) -> float:
    text = httpx.get(f"{live.url}/metrics").text
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)  # any labels
    return float(match.group(1))


def finished(live, *reasons: str) -> float:
    """Engine requests finished for one of `reasons` (vLLM's request_success counter by finished_reason)."""
    text = httpx.get(f"{live.url}/metrics").text
    [family] = [f for f in text_string_to_metric_families(text) if f.name == "vllm:request_success"]
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["finished_reason"] in reasons)


def chat(client, content="hello there", **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_plain_and_streamed_chat_agree_with_usage(client, tokenizer, live):
    plain = chat(client, seed=7, temperature=0.9)
    prompt_ids = tokenizer.render_chat([{"role": "user", "content": "hello there"}], add_generation_prompt=True)
    assert plain.model == MODEL and plain.object == "chat.completion"
    assert plain.usage.prompt_tokens == len(prompt_ids)
    assert plain.usage.completion_tokens == 12 or plain.choices[0].finish_reason == "stop"
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(chat(client, seed=7, temperature=0.9, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_raw_stream_is_openai_sse_ending_with_done(live):
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", headers=auth(), json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert '"object":"chat.completion.chunk"' in events[0]


def test_seed_reproducibility_and_n_choices(client):
    a = chat(client, seed=123, temperature=1.0)
    b = chat(client, seed=123, temperature=1.0)
    assert a.choices[0].message.content == b.choices[0].message.content
    many = chat(client, seed=5, temperature=1.0, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.message.content for c in many.choices}) > 1
    # Usage counts every choice's tokens: with the end token ignored, each choice runs to max_tokens.
    full = chat(client, seed=5, temperature=1.0, n=3, extra_body={"ignore_eos": True})
    assert [c.finish_reason for c in full.choices] == ["length"] * 3
    assert full.usage.completion_tokens == 3 * 12 and full.usage.total_tokens == full.usage.prompt_tokens + 36


def test_stop_strings_cut_the_reply(client):
    free = chat(client, temperature=0, max_tokens=20, extra_body={"ignore_eos": True}).choices[0].message.content
    assert len(free) >= 6
    stop = free[2:5]
    cut = chat(client, temperature=0, max_tokens=20, stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == free[:free.index(stop)]


def test_logprobs_and_text_completions(client, tokenizer):
    reply = chat(client, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    done = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.object == "text_completion" and done.usage.prompt_tokens == len(tokenizer.encode("the quick brown"))
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5


def test_errors_in_openai_shape(live, client):
    bad_key = openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        chat(bad_key)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{live.url}/v1/models").status_code == 401
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, content="hello world " * 300)
    assert err.value.body["param"] == "messages" and err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.parametrize("body,param", [
    (b'{"model": "tiny-test", "messages": [', None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
    (b'{"messages": []}', "messages"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0.role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000000}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}',
     "stream_options"),
    (b'[1, 2, 3]', None),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages.0.content.str"),
])
def test_bad_input_gets_400_naming_the_param(live, body, param):
    r = httpx.post(f"{live.url}/v1/chat/completions", content=body,
                   headers={**auth(), "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_a_body_without_json_content_type_is_refused(live):
    # A web page may send a form or text/plain body cross-origin without asking: only JSON is parsed.
    r = httpx.post(f"{live.url}/v1/chat/completions", headers={**auth(), "Content-Type":
                   "application/x-www-form-urlencoded"}, content=b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_oversized_body_is_413_and_the_server_keeps_serving(live, client):
    r = httpx.post(f"{live.url}/v1/chat/completions", content=b"x" * 10_000_000,
                   headers={**auth(), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert chat(client, max_tokens=2).choices[0].message.content is not None


def test_sixteen_concurrent_streams_equal_their_solo_outputs(live):
    def run(seed: int) -> str:
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = chat(client, content=f"hello number {seed}", seed=seed, temperature=1.0, max_tokens=10,
                      stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    solo = [run(seed) for seed in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, range(16)))
    assert together == solo
    assert metric(live, "vllm:num_requests_running") == 0


def test_clients_that_time_out_vanish_from_the_engine(live):
    assert httpx.get(f"{live.url}/health").status_code == 200
    aborted_before = finished(live, "abort")
    finished_before = finished(live, "stop", "length")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 220,
            "ignore_eos": True}

    async def impatient(http, i: int) -> str:
        if i % 2:
            return await leaves_after_first_token(http)
        # A total deadline of half a second, as a client library's request timeout gives.
        try:
            async with asyncio.timeout(0.5):
                await http.post(f"{live.url}/v1/chat/completions", json=body)
        except TimeoutError:
            return "timeout"
        return "finished"

    async def leaves_after_first_token(http) -> str:
        # Reading a generated token proves the request is running in the engine, whatever the machine's
        # speed; the client then hangs up (leaving the stream closes the connection).
        async with http.stream("POST", f"{live.url}/v1/chat/completions", json={**body, "stream": True}) as r:
            async for line in r.aiter_lines():
                if '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                    return "left"
        return "finished"

    async def all_of_them():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(headers=auth(), timeout=30, limits=limits) as http:
            return await asyncio.gather(*(impatient(http, i) for i in range(100)))

    outcomes = asyncio.run(all_of_them())
    assert outcomes.count("timeout") == 50 and outcomes.count("left") == 50
    deadline = time.monotonic() + 30
    while (metric(live, "vllm:num_requests_running") or metric(live, "vllm:num_requests_waiting")) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(live, "vllm:num_requests_running") == 0 and metric(live, "vllm:num_requests_waiting") == 0
    assert not live.engine._requests
    # 220 tokens at >= 3 ms a step cannot finish in half a second, nor in the moment after a streamed first
    # token: every request that reached the engine was cancelled (the 50 that streamed a token at least),
    # none ran on to the end for a client that had gone.
    assert finished(live, "stop", "length") == finished_before
    assert finished(live, "abort") - aborted_before >= 50
    quick = httpx.post(f"{live.url}/v1/chat/completions", headers=auth(), timeout=10,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert quick.status_code == 200 and quick.json()["usage"]["completion_tokens"] >= 1
    assert metric(live, "vllm:num_requests_running") == 0


def test_health_and_metrics(live):
    r = httpx.get(f"{live.url}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("murmur_http_requests_total", "murmur_request_latency_seconds_bucket",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_sum",
                 "vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:generation_tokens_total"):
        assert name in text
    assert metric(live, "vllm:generation_tokens_total") > 0


def test_schemathesis_finds_no_server_errors(live):
    cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{live.url}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", "25", "--phases", "examples,fuzzing",
           "--generation-deterministic", "-H", f"Authorization: Bearer {KEY}", "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert re.search(r"(\d+) generated, \1 passed", done.stdout), done.stdout[-2000:]
    assert httpx.get(f"{live.url}/health").status_code == 200
