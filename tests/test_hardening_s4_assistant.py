"""Hardening of the assistant's routes, on both index backends: the deleted-thread check looks up the few ids it
needs (never every tombstone), a mention delivered twice is answered once (over HTTP, after a restart, at the
same instant, and across the HTTP route and the stream follower), and a failed generation tells the caller a
request id, not the exception's text."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from assistant_fixtures import ScriptedEngine, model  # noqa: F401 (model: a fixture)
from fastapi.testclient import TestClient
from index_fixtures import backend, make_index, postgres_url  # noqa: F401 (fixtures)
from serve_fixtures import tokenizer  # noqa: F401 (fixture)

from murmur.assistant.follow import MentionFollower, ReplyLedger
from murmur.assistant.mentions import MentionDesk
from murmur.assistant.service import Assistant
from murmur.index.base import IndexedPost, PostIndex
from murmur.infer.engine import StepOutput
from murmur.serve.app import create_app
from murmur.settings.assistant import AssistantSettings
from murmur.settings.index import IndexSettings
from murmur.settings.serve import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = "sk-test"
POSTS = [
    IndexedPost("p1", "ann", "The Pier 7 meetup moved to Thursday evening", 1_700_000_000.0, "p1"),
    IndexedPost("p2", "bob", "Fishing off the pier all day, nothing biting", 1_700_000_100.0, "p2"),
    IndexedPost("p4", "dan", "Is the meetup still on Wednesday?", 1_700_000_300.0, "p1", "p1"),
]
SECRET = "/srv/secret/tenant-42/weights.safetensors"


@pytest.fixture
def index(make_index):
    index = make_index()
    index.add(POSTS)
    return index


def mention(ident="m1", author="eve", reply_to="p4", conversation="p1", text="@murmurbot when is the pier meetup?"):
    post = {"id": ident, "text": text, "author_id": author, "conversation_id": conversation}
    if reply_to:
        post["referenced_tweets"] = [{"type": "replied_to", "id": reply_to}]
    return post


def serve(tokenizer, model, index, engine=None, **assistant):
    engine = engine or ScriptedEngine(model, tokenizer, max_batch_size=4)
    helper = Assistant(index, IndexSettings(recency_weight=0),
                       AssistantSettings(handle="murmurbot", user_id="bot", **assistant))
    app = create_app(ServeSettings(api_keys=[KEY]), engine=engine, model_name="m", assistant=helper)
    return TestClient(app, base_url="http://localhost", headers={"Authorization": f"Bearer {KEY}"}), engine


# -- 1. the deleted-thread check is a lookup of the mention's ids -------------------------------------------

def test_a_deleted_thread_is_found_without_reading_every_tombstone(tokenizer, model, index, monkeypatch):
    index.delete(posts=[f"old{i}" for i in range(300)] + ["p1"], accounts=[f"gone{i}" for i in range(50)])

    def every_tombstone(self, kind):
        raise AssertionError("the mention path read every tombstone")

    monkeypatch.setattr(type(index), "_tombstones", every_tombstone)
    client, engine = serve(tokenizer, model, index)
    with client:
        # p1 is the conversation's root: deleted, so the thread gets no answer.
        gone = client.post("/v1/mentions", json=mention(reply_to=None))
        assert gone.status_code == 200, gone.text
        assert gone.json()["reply"] is None and gone.json()["skipped"] == "deleted"
        dead_author = client.post("/v1/mentions", json=mention("m2", author="gone3", reply_to="p2", conversation="p2"))
        assert dead_author.json()["skipped"] == "deleted"
        live = client.post("/v1/mentions", json=mention("m3", reply_to="p2", conversation="p2"))
        assert live.status_code == 200 and live.json()["reply"]["text"] == "hello"
    assert len(engine.prompts) == 1
    assert index.tombstoned("post", ["p1", "p2", "old7", "nope"]) == {"p1", "old7"}
    assert index.tombstoned("account", ["gone3", "eve"]) == {"gone3"}
    assert index.audit(["p1"], ["gone3"]) == []  # the audit asks by id too


# -- 2. a mention delivered twice is answered once -----------------------------------------------------------

def test_a_retried_mention_gets_the_first_reply_and_nothing_is_generated(tokenizer, model, index):
    client, engine = serve(tokenizer, model, index, replies_per_author=1)
    engine.reply = "Thursday, per [p2]."
    with client:
        first = client.post("/v1/mentions", json=mention())
        engine.reply = "a different answer"
        again = client.post("/v1/mentions", json={"data": mention()})  # the stream message form: same post
    assert first.status_code == again.status_code == 200, again.text
    one, two = first.json(), again.json()
    assert one["replayed"] is False and two["replayed"] is True
    assert two["reply"] == one["reply"] and two["reply"]["text"] == "Thursday, per [p2]."
    assert two["id"] == one["id"] and two["retrieved"] == one["retrieved"] and two["usage"] == one["usage"]
    assert len(engine.prompts) == 1  # and the author's one reply of the window was not spent by the retry


def test_the_record_survives_a_restart_and_forgets_deleted_mentions(tokenizer, model, index):
    client, engine = serve(tokenizer, model, index)
    engine.reply = "It is on Thursday [p2]"
    with client:
        first = client.post("/v1/mentions", json=mention()).json()
    restarted, engine2 = serve(tokenizer, model, index)  # a new server on the same index
    with restarted:
        again = restarted.post("/v1/mentions", json=mention()).json()
        assert again["replayed"] and again["reply"]["text"] == first["reply"]["text"] and not engine2.prompts
        # A cited post deleted since is no longer cited, and its title is not sent.
        assert [a["url_citation"]["title"] for a in again["reply"]["annotations"]] == \
            ["Fishing off the pier all day, nothing biting"]
        index.delete(posts=["p2"])
        assert restarted.post("/v1/mentions", json=mention()).json()["reply"]["annotations"] == []
        index.delete(posts=["m1"])  # the mention itself: no answer, and its record goes with it
        assert restarted.post("/v1/mentions", json=mention()).json()["skipped"] == "deleted"
    assert index.answer_of("m1") is None


def test_the_same_mention_at_the_same_instant_is_generated_once(tokenizer, model, index, monkeypatch):
    client, engine = serve(tokenizer, model, index)
    planned = MentionDesk.plan
    both_in = threading.Barrier(2, timeout=1)

    def slow_plan(self, *args, **kwargs):
        try:  # both deliveries planning together: without a lock per mention both would generate
            both_in.wait()
        except threading.BrokenBarrierError:
            pass
        return planned(self, *args, **kwargs)

    monkeypatch.setattr(MentionDesk, "plan", slow_plan)
    answers = []
    with client:
        threads = [threading.Thread(target=lambda: answers.append(client.post("/v1/mentions", json=mention())))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(client.app.state.murmur.assistant.answering) == 0  # no lock outlives its requests
    assert [a.status_code for a in answers] == [200, 200]
    assert sorted(a.json()["replayed"] for a in answers) == [False, True]
    assert len(engine.prompts) == 1


def test_a_mention_answered_over_http_is_not_answered_again_from_the_stream(tokenizer, model, index, tmp_path):
    client, engine = serve(tokenizer, model, index)
    with client:
        assert client.post("/v1/mentions", json=mention()).json()["replayed"] is False
    asked = len(engine.prompts)
    stream, replies = tmp_path / "stream.jsonl", tmp_path / "replies.jsonl"
    stream.write_text(json.dumps({"data": mention()}) + "\n" + json.dumps({"data": mention("m2")}) + "\n")
    desk = MentionDesk(Assistant(index, IndexSettings(recency_weight=0),
                                 AssistantSettings(handle="murmurbot", user_id="bot")))
    counts = MentionFollower(desk, engine, stream, ReplyLedger(replies), poll_interval_s=0.05,
                             max_record_bytes=65536).run(until_idle=True)
    assert counts["already_answered"] == 1 and counts["replied"] == 1
    assert [json.loads(x)["reply"]["in_reply_to_tweet_id"] for x in replies.read_text().splitlines()] == ["m2"]
    assert len(engine.prompts) == asked + 1
    # ... and one answered from the stream is a replay over HTTP.
    client2, engine2 = serve(tokenizer, model, index)
    with client2:
        assert client2.post("/v1/mentions", json=mention("m2")).json()["replayed"] is True and not engine2.prompts


def test_a_reply_written_but_not_recorded_is_recorded_at_start(tokenizer, model, index, tmp_path):
    replies = tmp_path / "replies.jsonl"
    lines = [{"text": f"old {i}", "reply": {"in_reply_to_tweet_id": f"x{i}"}, "annotations": []} for i in range(500)]
    lines.append({"text": "the last", "reply": {"in_reply_to_tweet_id": "m1"}, "annotations": []})
    replies.write_text("".join(json.dumps(x) + "\n" for x in lines))  # killed before m1 reached the index
    ledger = ReplyLedger(replies)
    assert ledger.answered == {"m1"}  # the tail alone: memory does not grow with the file
    stream = tmp_path / "stream.jsonl"
    stream.write_text(json.dumps({"data": mention()}) + "\n")
    engine = ScriptedEngine(model, tokenizer, max_batch_size=2)
    desk = MentionDesk(Assistant(index, IndexSettings(recency_weight=0), AssistantSettings(handle="murmurbot")))
    follower = MentionFollower(desk, engine, stream, ledger, poll_interval_s=0.05, max_record_bytes=65536)
    assert index.answer_of("m1")["text"] == "the last"
    ledger.answered.clear()  # the index alone must know: its record is what every path asks
    assert follower.run(until_idle=True)["already_answered"] == 1 and not engine.prompts


# -- 3. a failed generation does not tell the caller why ----------------------------------------------------

class FailingEngine(ScriptedEngine):
    """Every request ends in an engine error whose text holds a path that must stay on the server."""

    def submit(self, prompt_ids, params, sink, request_id=None, prefix_len=0) -> str:
        self.check_prompt(prompt_ids, params)
        request_id = request_id or "failing"
        sink(StepOutput(request_id, finished=True, finish_reason="error",
                        error=f"generation failed: OSError: cannot map {SECRET}"))
        return request_id


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "retrieval": False}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "retrieval": False, "stream": True}),
    ("/v1/completions", {"prompt": "hi", "stream": True}),
    ("/v1/mentions", mention()),
])
def test_a_failed_generation_names_a_request_id_not_the_exception(tokenizer, model, index, caplog, route, body):
    client, _ = serve(tokenizer, model, index, engine=FailingEngine(model, tokenizer, max_batch_size=2))
    with client, caplog.at_level(logging.ERROR, logger="murmur.serve"):
        answer = client.post(route, json=body)
    if body.get("stream"):
        assert answer.status_code == 200
        events = [line.removeprefix("data: ") for line in answer.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
    else:
        assert answer.status_code == 500, answer.text
        error = answer.json()["error"]
    assert SECRET not in answer.text and "OSError" not in answer.text
    assert error["code"] == "generation_failed" and error["type"] == "server_error"
    request_id = error["message"].rsplit(" ", 1)[-1]
    assert len(request_id) > 8
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert logged and SECRET in logged[0]  # the operator finds the reason under the id the caller was given


def test_a_crash_in_a_route_names_a_request_id_not_the_exception(tokenizer, model, index, monkeypatch, caplog):
    client, engine = serve(tokenizer, model, index)

    def broken(self, *args, **kwargs):
        raise KeyError(SECRET)

    monkeypatch.setattr(MentionDesk, "compose", broken)
    with TestClient(client.app, base_url="http://localhost", headers={"Authorization": f"Bearer {KEY}"},
                    raise_server_exceptions=False) as http, caplog.at_level(logging.ERROR, logger="murmur.serve"):
        answer = http.post("/v1/mentions", json=mention())
    assert answer.status_code == 500 and SECRET not in answer.text and "KeyError" not in answer.text
    request_id = answer.json()["error"]["message"].rsplit(" ", 1)[-1]
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)


def test_the_index_interface_declares_the_lookups():
    assert {"_tombstoned", "_answer_of", "_record_answer", "_forget_answers"} <= PostIndex.__abstractmethods__
