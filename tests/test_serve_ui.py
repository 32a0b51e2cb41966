"""The chat page in Debian's chromium (Playwright): streaming, stop aborts in the engine, new chat, no injection."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from serve_fixtures import LiveServer, make_model, make_tokenizer

from murmur.infer.engine import Engine
from murmur.serve.app import create_app
from murmur.settings.serve import ServeSettings

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"
MODEL = "ui-test-model"

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tokenizer = make_tokenizer(tmp_path_factory.mktemp("tok"))
    # 20 ms a step: a reply streams for seconds, long enough to watch it grow and to stop it.
    engine = Engine(make_model(tokenizer.vocab_size, max_seq_len=512, delay_s=0.02), tokenizer)
    engine.stop_ids = set()  # a model that never ends its turn on its own
    with LiveServer(create_app(ServeSettings(), engine=engine, model_name=MODEL)) as server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def aborted(live) -> int:
    text = httpx.get(f"{live.url}/metrics").text
    match = re.search(r'^vllm:request_success_total\{[^}]*finished_reason="abort"[^}]*\} (\S+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0  # the series appears with the first cancelled request


def test_type_stream_stop_and_new_chat(live, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(live.url)
    page.wait_for_function(f"() => document.getElementById('model-name').textContent === '{MODEL}'")
    before = aborted(live)
    page.fill("#input", "hello there")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant') && "
                           "document.querySelector('.msg.assistant').textContent.length > 3")
    first = len(page.inner_text(".msg.assistant"))
    page.wait_for_function(f"() => document.querySelector('.msg.assistant').textContent.length > {first + 3}")
    assert page.is_visible("#stop") and not page.is_visible("#send")
    assert live.engine.num_running == 1
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "serve_ui_streaming.png"))
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .note")
    assert "(stopped)" in page.inner_text(".msg.assistant")
    deadline = time.monotonic() + 10
    while (live.engine.num_running or aborted(live) == before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.engine.num_running == 0 and aborted(live) == before + 1  # cancelled in the engine, not just the page
    stopped_text = page.inner_text(".msg.assistant")

    page.reload()  # the conversation is kept in the browser
    page.wait_for_selector(".msg.assistant")
    assert page.inner_text(".msg.user") == "hello there"
    assert page.inner_text(".msg.assistant") == stopped_text
    page.click("#new-chat")
    assert page.query_selector_all(".msg") == []
    assert len(page.query_selector_all("#history li")) == 2
    assert errors == []
    page.close()


def test_model_output_is_shown_as_text_never_run(live, browser):
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
    evil = "Hi <script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> **bold** `<b>x</b>`"

    sent = []

    def fake_reply(route):
        sent.append(route.request.post_data_json)
        chunks = [{"choices": [{"index": 0, "delta": {"content": evil[i:i + 7]}, "finish_reason": None}]}
                  for i in range(0, len(evil), 7)]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", fake_reply)
    page.goto(live.url)
    page.click("#toggle-settings")
    page.fill("#set-system", "You are a pirate.")
    page.fill("#set-temperature", "0.3")
    page.fill("#set-max-tokens", "40")
    page.click("#toggle-settings")
    page.fill("#input", "say something nasty")
    page.click("#send")
    page.wait_for_function("() => document.querySelector('.msg.assistant strong')")
    reply = page.inner_text(".msg.assistant")
    assert "<script>window.__pwned = 1</script>" in reply and "<b>x</b>" in reply
    assert page.evaluate("() => window.__pwned") is None
    assert page.query_selector(".msg.assistant script") is None and page.query_selector(".msg.assistant img") is None
    assert page.inner_text(".msg.assistant strong") == "bold"
    assert sent[0]["messages"][0] == {"role": "system", "content": "You are a pirate."}
    assert sent[0]["temperature"] == 0.3 and sent[0]["max_tokens"] == 40 and sent[0]["stream"] is True
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "serve_ui_phone.png"))

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=429, json={"error": {
        "message": "Rate limit reached", "type": "rate_limit_exceeded", "param": None, "code": "rate_limit_exceeded"}}))
    page.click("#regenerate")
    page.wait_for_selector("#error:not([hidden])")
    assert "Rate limit reached" in page.inner_text("#error")
    page.close()


def test_report_page_renders_markdown_and_charts_safely(tmp_path, browser):
    import struct
    import zlib

    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# Report card\n\n| metric | value |\n| --- | --- |\n| bpb | 1.23 |\n\n"
                                      "![loss curve](loss.png)\n\n<script>window.__pwned = 1</script>\n")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    (report / "loss.png").write_bytes(png)
    tokenizer = make_tokenizer(tmp_path / "tok")
    engine = Engine(make_model(tokenizer.vocab_size), tokenizer)
    with LiveServer(create_app(engine=engine, model_name=MODEL, report_dir=report)) as server:
        page = browser.new_page()
        page.goto(server.url)
        page.wait_for_selector("#report-link:not([hidden])")
        page.click("#report-link")
        page.wait_for_selector("#report table")
        assert page.inner_text("#report h1") == "Report card"
        assert page.get_attribute("#report img", "src") == "/report/loss.png"
        page.wait_for_function("() => document.querySelector('#report img').naturalWidth === 1")
        assert "<script>window.__pwned = 1</script>" in page.inner_text("#report")
        assert page.evaluate("() => window.__pwned") is None
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "serve_report.png"))
        page.close()
