"""The server's HTTP layer under attack: bounded work per request, slow clients, rate-limit keys, metrics
labels, content types, Host and CORS, page headers, /health's discretion, surrogates and key comparison.

Each test builds a tiny model; the slow-client tests run a real uvicorn server (configured exactly as
`murmur serve` configures it) on a free loopback port and talk to it over raw sockets.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_fixtures import free_port, make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.errors import MurmurError
from murmur.infer.engine import Engine
from murmur.serve.access import RateLimiter
from murmur.serve.app import create_app
from murmur.serve.connections import uvicorn_config
from murmur.serve.metrics import Metrics
from murmur.settings.serve import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL = "http://localhost"  # TestClient's own default Host, "testserver", is refused like any unknown name
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size)


def client(app, base_url: str = LOCAL, **kw) -> TestClient:
    return TestClient(app, base_url=base_url, raise_server_exceptions=False, **kw)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@contextlib.contextmanager
def live_server(app, settings: ServeSettings):
    """uvicorn on a free loopback port, configured by `uvicorn_config` as `murmur serve` does."""
    import uvicorn

    settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{settings.port}", settings.port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ---- (1) work per request is bounded before any of it is done -----------------------------------

LIMITS = ServeSettings(max_prompts=8, max_messages=5, max_n=4, max_choices=6, max_prompt_chars=200,
                       max_reply_tokens=20)


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"prompt": ["hi"] * 9}, "prompt"),                                 # max_prompts
    ("/v1/completions", {"prompt": "hi", "n": 5}, "n"),                                    # max_n
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 5}, "n"),
    ("/v1/completions", {"prompt": ["hi"] * 3, "n": 3}, "n"),                              # prompts x n
    ("/v1/completions", {"prompt": ["x" * 150, "y" * 51]}, "prompt"),                      # characters
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x" * 150},
                                           {"role": "user", "content": [{"type": "text", "text": "y" * 51}]}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}] * 6}, "messages"),  # max_messages
    ("/v1/completions", {"prompt": "hi", "max_tokens": 21}, "max_tokens"),                 # max_reply_tokens
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 21},
     "max_completion_tokens"),
])
def test_oversized_requests_are_refused_before_any_work(model, tokenizer, monkeypatch, route, body, param):
    engine = Engine(model, tokenizer)
    work = []
    for name in ("encode", "render_chat"):
        monkeypatch.setattr(tokenizer, name, lambda *a, name=name, **k: work.append(name))
    monkeypatch.setattr(engine, "submit", lambda *a, **k: work.append("submit"))
    with client(create_app(LIMITS, engine=engine)) as http:
        response = http.post(route, json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert re.search(r"\d", error["message"])  # it says what the limit is
    assert work == []


def test_a_flood_of_prompts_is_refused_at_once(model, tokenizer, monkeypatch):
    """The issue's attack, scaled to a small body: thousands of prompts times n=16, with default settings."""
    engine = Engine(model, tokenizer)
    encoded = []
    monkeypatch.setattr(tokenizer, "encode", lambda text: encoded.append(text) or [1])
    with client(create_app(ServeSettings(), engine=engine)) as http:
        response = http.post("/v1/completions", json={"prompt": ["a"] * 5000, "n": 16, "max_tokens": 1})
    assert response.status_code == 400 and error_of(response)["param"] == "prompt"
    assert encoded == [] and engine.num_waiting == 0


def test_requests_within_the_limits_are_served(model, tokenizer):
    with client(create_app(LIMITS, engine=Engine(model, tokenizer))) as http:
        response = http.post("/v1/completions", json={"prompt": ["hi", "yo"], "n": 3, "max_tokens": 20,
                                                      "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 6
    assert response.json()["usage"]["completion_tokens"] == 6 * 20


# ---- (2) slow clients ---------------------------------------------------------------------------

def held_open(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(payload)
    return sock


def closed_by_server(sock: socket.socket, within_s: float) -> bytes | None:
    """What the server sent before closing `sock`, or None if it still held it open after `within_s`."""
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def test_uvicorn_is_configured_from_the_settings(model, tokenizer):
    settings = ServeSettings(keep_alive_timeout_s=3, trusted_proxies=["10.0.0.1"])
    config = uvicorn_config(create_app(settings, engine=Engine(model, tokenizer)), settings)
    assert config.timeout_keep_alive == 3
    assert config.proxy_headers is True and config.forwarded_allow_ips == ["10.0.0.1"]
    assert uvicorn_config(config.app, ServeSettings()).proxy_headers is False  # no X-Forwarded-For by default


def test_a_slowloris_is_cut_off_and_health_keeps_answering(model, tokenizer):
    settings = ServeSettings(header_timeout_s=0.5, max_connections=4)
    app = create_app(settings, engine=Engine(model, tokenizer))
    with live_server(app, settings) as (url, port):
        # More half-sent requests than the connection cap, each dribbling a header line now and then.
        slow = [held_open(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(6)]
        silent = held_open(port, b"")

        def dribble():
            for _ in range(20):
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.1)

        dribbler = threading.Thread(target=dribble, daemon=True)
        dribbler.start()
        health = httpx.get(f"{url}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        for sock in [*slow, silent]:
            assert closed_by_server(sock, within_s=10) is not None, "a slow client was never cut off"
            sock.close()
        dribbler.join()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_a_body_that_never_finishes_gets_408(model, tokenizer):
    settings = ServeSettings(body_timeout_s=0.5)
    app = create_app(settings, engine=Engine(model, tokenizer))
    with live_server(app, settings) as (url, port):
        sock = held_open(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
        answer = closed_by_server(sock, within_s=10)
        sock.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 408")
        assert b'"code":"request_timeout"' in answer.replace(b" ", b"")
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10).status_code == 200


def test_over_the_connection_cap_generation_is_refused_but_health_answers(model, tokenizer):
    settings = ServeSettings(header_timeout_s=30, max_connections=2)
    app = create_app(settings, engine=Engine(model, tokenizer))
    with live_server(app, settings) as (url, port):
        idle = [held_open(port, b"GET /health HTTP/1.1\r\n") for _ in range(3)]
        try:
            with httpx.Client(timeout=10) as http:
                refused = http.post(f"{url}/v1/chat/completions", json=CHAT)
                assert refused.status_code == 503 and error_of(refused)["code"] == "too_many_connections"
                assert http.get(f"{url}/health").status_code == 200
        finally:
            for sock in idle:
                sock.close()


# ---- (3) rate limits keyed on what a caller cannot mint -----------------------------------------

def test_fresh_bearer_values_do_not_bypass_the_rate_limit(model, tokenizer):
    app = create_app(ServeSettings(rate_limit_per_minute=2), engine=Engine(model, tokenizer))
    with client(app) as http:
        codes = [http.get("/v1/models", headers={"Authorization": f"Bearer made-up-{i}"}).status_code
                 for i in range(4)]
    assert codes == [200, 200, 429, 429]
    assert len(app.state.murmur.access.limiter.windows) == 1  # the one client address


def test_wrong_keys_create_no_buckets_and_count_against_the_address(model, tokenizer):
    app = create_app(ServeSettings(rate_limit_per_minute=3, api_keys=["right"]), engine=Engine(model, tokenizer))
    with client(app) as http:
        codes = [http.get("/v1/models", headers={"Authorization": f"Bearer guess-{i}"}).status_code
                 for i in range(5)]
        assert codes == [401, 401, 401, 429, 429]  # guessing keys is rate limited too
        assert http.get("/v1/models", headers={"Authorization": "Bearer right"}).status_code == 200
    assert set(app.state.murmur.access.limiter.windows) == {"testclient", "key:right"}


def test_forwarded_for_headers_do_not_mint_addresses(model, tokenizer):
    settings = ServeSettings(rate_limit_per_minute=2)
    with live_server(create_app(settings, engine=Engine(model, tokenizer)), settings) as (url, _):
        codes = [httpx.get(f"{url}/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code
                 for i in range(3)]
    assert codes == [200, 200, 429]


def test_the_limiter_forgets_old_keys_and_stays_bounded():
    now = [0.0]
    limiter = RateLimiter(per_minute=1, max_keys=100, clock=lambda: now[0])
    for i in range(10_000):
        assert limiter.allow(f"client-{i}")
    assert len(limiter.windows) == 100
    assert not limiter.allow("client-9999")  # the most recent keys are still limited
    now[0] = 61.0
    assert limiter.allow("client-0")
    assert set(limiter.windows) == {"client-0"}  # a minute on, the idle ones are gone


def test_ipv6_clients_are_limited_per_network():
    limiter = RateLimiter(per_minute=1)
    assert limiter.allow(RateLimiter.client_key("2001:db8:1:2::1"))
    assert not limiter.allow(RateLimiter.client_key("2001:db8:1:2:ffff::9"))  # the same /64
    assert limiter.allow(RateLimiter.client_key("2001:db8:1:3::1"))
    assert RateLimiter.client_key("192.0.2.7") == "192.0.2.7"


# ---- (4) metrics labels ---------------------------------------------------------------------------

def test_made_up_methods_and_paths_collapse_into_other(model, tokenizer):
    app = create_app(engine=Engine(model, tokenizer))
    with client(app) as http:
        for i in range(50):
            http.request(f"BREW{i}", f"/scan/{i}")
        text = http.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("murmur_http_requests_total{")]
    assert 'method="other",path="other"' in text
    assert not any("BREW" in line or "/scan/" in line for line in series)
    assert len(series) <= 4


def test_metrics_series_are_bounded_whatever_is_observed():
    metrics = Metrics()
    for i in range(1000):
        metrics.observe_request(f"M{i}", f"/p{i}", 600 + i, 0.01)
    series = [line for line in metrics.render().splitlines() if line.startswith("murmur_http_requests_total{")]
    # prometheus_client writes every value as a float
    assert series == ['murmur_http_requests_total{method="other",path="other",status="other"} 1000.0']


# ---- (5) content type, Host, CORS -------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_only_json_bodies_are_parsed(model, tokenizer, content_type):
    with client(create_app(engine=Engine(model, tokenizer))) as http:
        headers = {"Content-Type": content_type} if content_type else {}
        response = http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=headers)
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]


def test_json_with_a_charset_is_parsed(model, tokenizer):
    with client(create_app(engine=Engine(model, tokenizer))) as http:
        response = http.post("/v1/chat/completions", content=json.dumps(CHAT).encode(),
                             headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("base_url, allowed, status", [
    ("http://evil.example", [], 421),                 # a rebound DNS name
    ("http://testserver", [], 421),
    ("http://localhost:8000", [], 200),
    ("http://127.0.0.1:8000", [], 200),
    ("http://[::1]:8000", [], 200),
    ("http://192.0.2.10", [], 200),                   # an address literal cannot be rebound
    ("http://chat.example.com", ["chat.example.com"], 200),
    ("http://evil.example", ["chat.example.com"], 421),
    ("http://anything.example", ["*"], 200),
])
def test_the_host_header_is_checked(model, tokenizer, base_url, allowed, status):
    app = create_app(ServeSettings(allowed_hosts=allowed), engine=Engine(model, tokenizer))
    with client(app, base_url=base_url) as http:
        response = http.get("/v1/models")
    assert response.status_code == status
    if status == 421:
        assert error_of(response)["code"] == "invalid_host" and "--allowed-hosts" in error_of(response)["message"]


def test_a_named_bind_address_is_an_allowed_host(model, tokenizer):
    app = create_app(ServeSettings(host="mybox.lan"), engine=Engine(model, tokenizer))
    with client(app, base_url="http://mybox.lan:8000") as http:
        assert http.get("/v1/models").status_code == 200


def test_cors_is_off_unless_origins_are_allowed(model, tokenizer):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with client(create_app(engine=Engine(model, tokenizer))) as http:
        assert "access-control-allow-origin" not in http.options("/v1/chat/completions", headers=preflight).headers
        assert "access-control-allow-origin" not in http.get("/v1/models", headers={"Origin": "http://a.example"}
                                                             ).headers
    app = create_app(ServeSettings(allowed_origins=["http://app.example"]), engine=Engine(model, tokenizer))
    with client(app) as http:
        allowed = http.options("/v1/chat/completions", headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
        other = http.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"
        response = http.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://app.example"})
        assert response.headers["access-control-allow-origin"] == "http://app.example"


# ---- (6) page headers and the report folder --------------------------------------------------------

def test_every_html_response_carries_the_csp(tmp_path, model, tokenizer):
    (tmp_path / "report.md").write_text("# Report\n")
    app = create_app(engine=Engine(model, tokenizer), report_dir=tmp_path)
    with client(app) as http:
        for path in ("/", "/report", "/ui/index.html", "/ui/report.html"):
            response = http.get(path)
            assert response.status_code == 200 and "text/html" in response.headers["content-type"], path
            assert "frame-ancestors 'none'" in response.headers.get("content-security-policy", ""), path
            assert response.headers.get("x-content-type-options") == "nosniff", path


def test_report_files_are_regular_files_inside_the_folder(tmp_path, model, tokenizer):
    report = tmp_path / "run" / "report"
    report.mkdir(parents=True)
    (report / "report.md").write_text("# Report\n")
    (tmp_path / "secret.md").write_text("private notes")
    (report / "leak.md").symlink_to(tmp_path / "secret.md")
    (report / "sub.png").mkdir()
    app = create_app(engine=Engine(model, tokenizer), report_dir=report)
    with client(app) as http:
        assert http.get("/report/report.md").text == "# Report\n"
        for name in ("leak.md", "sub.png"):
            response = http.get(f"/report/{name}")
            assert response.status_code == 404 and "private" not in response.text


# ---- (7) /health tells only what a caller may know -------------------------------------------------

def failing_loader():
    raise MurmurError("cannot read /home/alice/secret-run/model.safetensors: header is corrupt")


def wait_for_load(http, headers=None):
    deadline = time.monotonic() + 10
    while (response := http.get("/health", headers=headers or {})).json().get("error", {}).get("code") \
            == "model_loading" and time.monotonic() < deadline:
        time.sleep(0.02)
    return response


def test_health_hides_the_load_error_from_strangers(model, tokenizer):
    with client(create_app(loader=failing_loader)) as http:
        response = wait_for_load(http)
        assert response.status_code == 503
        error = error_of(response)
        assert error["code"] == "model_failed" and "secret" not in response.text and "corrupt" not in response.text
        request = http.post("/v1/chat/completions", json=CHAT)
        assert request.status_code == 503 and "secret" not in request.text


def test_health_tells_an_authenticated_caller_why(model, tokenizer):
    with client(create_app(ServeSettings(api_keys=["k"]), loader=failing_loader)) as http:
        assert "secret" not in wait_for_load(http).text
        assert "secret" not in http.get("/health", headers={"Authorization": "Bearer wrong"}).text
        told = http.get("/health", headers={"Authorization": "Bearer k"})
        assert told.status_code == 503 and "header is corrupt" in error_of(told)["message"]


def test_health_says_ok_and_loading(model, tokenizer):
    ready = threading.Event()

    def loader():
        ready.wait(10)
        return Engine(model, tokenizer)

    with client(create_app(loader=loader)) as http:
        assert error_of(http.get("/health"))["code"] == "model_loading"
        ready.set()
        assert wait_for_load(http).json()["status"] == "ok"


# ---- (8) surrogate code points ----------------------------------------------------------------------

@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/completions", b'{"prompt": ["ok", "\\ud83d"]}', "prompt.1"),
    ("/v1/completions", b'{"prompt": "hi", "stop": "\\ud800"}', "stop"),
])
def test_lone_surrogates_get_400(model, tokenizer, route, body, param):
    with client(create_app(engine=Engine(model, tokenizer))) as http:
        response = http.post(route, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"].startswith(param) and "surrogate" in error["message"]


# ---- (9) API keys ---------------------------------------------------------------------------------

def test_api_keys_are_compared_in_constant_time(model, tokenizer, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    app = create_app(ServeSettings(api_keys=["first", "second"]), engine=Engine(model, tokenizer))
    with client(app) as http:
        assert http.get("/v1/models", headers={"Authorization": "Bearer second"}).status_code == 200
        assert len(compared) == 2  # every configured key is compared, not only until a match
        assert http.get("/v1/models", headers={"Authorization": "Bearer sec"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s\u00e9cond".encode("latin-1")}
                        ).status_code == 401


def test_command_line_flags_reach_the_settings():
    from murmur.cli import build_parser
    from murmur.commands.serve import settings_from_args

    args = build_parser().parse_args(["serve", "run", "--allowed-hosts", "chat.example.com,api.example.com",
                                      "--allowed-hosts", "other.example", "--allowed-origins", "https://app.example",
                                      "--trusted-proxy", "10.0.0.1", "--set", "serve.max_connections=9"])
    settings = settings_from_args(args)
    assert settings.allowed_hosts == ["chat.example.com", "api.example.com", "other.example"]
    assert settings.allowed_origins == ["https://app.example"] and settings.trusted_proxies == ["10.0.0.1"]
    assert settings.max_connections == 9
    assert settings_from_args(build_parser().parse_args(["serve", "run"])).allowed_hosts == []
