"""The chat page shows a grounded reply's citations as links under it (Debian's chromium, Playwright): built
as text, never as HTML, and only http(s) links."""

from __future__ import annotations

from pathlib import Path

import pytest
from assistant_fixtures import ScriptedEngine
from serve_fixtures import LiveServer, make_model, make_tokenizer

from murmur.assistant.service import Assistant
from murmur.index.base import IndexedPost
from murmur.index.sqlite import SqliteIndex
from murmur.serve.app import create_app
from murmur.settings.assistant import AssistantSettings
from murmur.settings.index import IndexSettings
from murmur.settings.serve import ServeSettings

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = Path(__file__).resolve().parent.parent / "test-output"

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")]


def test_citations_are_links_under_the_reply(tmp_path):
    from playwright.sync_api import sync_playwright

    tokenizer = make_tokenizer(tmp_path / "tok")
    engine = ScriptedEngine(make_model(tokenizer.vocab_size, max_seq_len=1024), tokenizer, max_batch_size=2)
    engine.reply = "It moved to **Thursday** [p1], says [p2]."
    index = SqliteIndex(tmp_path / "posts.sqlite", create=True)
    index.add([IndexedPost("p1", "ann", "The Pier 7 meetup moved to Thursday evening"),
               IndexedPost("p2", "eve", "<img src=x onerror=alert(1)> pier 7 meetup news")])
    assistant = Assistant(index, IndexSettings(recency_weight=0),
                          AssistantSettings(citation_url="https://example.social/post/{id}"))
    with LiveServer(create_app(ServeSettings(), engine=engine, model_name="m", assistant=assistant)) as live, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 900, "height": 700})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(live.url)
        page.fill("#input", "when is the pier 7 meetup?")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant .citations a")
        links = page.eval_on_selector_all(".msg.assistant .citations a",
                                          "els => els.map(e => [e.href, e.textContent, e.rel])")
        OUTPUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT / "assistant_citations.png"))
        assert page.inner_text(".msg.assistant strong") == "Thursday"
        assert page.query_selector(".msg.assistant img") is None  # the post's markup is shown as text
        browser.close()
    index.close()
    assert links == [["https://example.social/post/p1", "The Pier 7 meetup moved to Thursday evening",
                      "noopener noreferrer"],
                     ["https://example.social/post/p2", "<img src=x onerror=alert(1)> pier 7 meetup news",
                      "noopener noreferrer"]]
    assert not errors
