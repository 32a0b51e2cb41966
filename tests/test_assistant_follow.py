"""`murmur assistant --follow`: mentions in a stream file answered into a replies file, on both backends;
never answered twice, whether the follower is restarted, crashes between a reply and its offset, or finds a
torn last reply."""

from __future__ import annotations

import json

import pytest
from assistant_fixtures import ScriptedEngine
from index_fixtures import backend, make_index, postgres_url  # noqa: F401 (fixtures)
from serve_fixtures import make_model, tokenizer  # noqa: F401 (fixture)

from murmur.assistant.follow import MentionFollower, ReplyLedger
from murmur.assistant.mentions import MentionDesk
from murmur.assistant.service import Assistant
from murmur.errors import MurmurError
from murmur.settings.assistant import AssistantSettings
from murmur.settings.index import IndexSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def line(document) -> bytes:
    return json.dumps(document).encode() + b"\n"


def post(ident, text, author, conversation=None, reply_to=None):
    item = {"id": ident, "text": text, "author_id": author, "conversation_id": conversation or ident}
    if reply_to:
        item["referenced_tweets"] = [{"type": "replied_to", "id": reply_to}]
    return {"data": item}


STREAM = [
    post("p1", "The Pier 7 meetup moved to Thursday", "ann"),
    post("p4", "Is the meetup still on Wednesday?", "dan", "p1", "p1"),
    post("m1", "@murmurbot when is the pier 7 meetup?", "eve", "p1", "p4"),
    post("m2", "@murmurbot I am the bot talking to myself", "bot", "p1", "p4"),  # its own post
    post("n1", "no mention here, just the pier", "fay"),
    post("m3", "@MurmurBot is the pier open today?", "gus", "p1", "p1"),
    {"data": {"delete": {"tweet": {"id": "m3"}}}},  # deleted in the same batch: before it could be answered
    post("m4", "@murmurbot what about this?", "hal", "c9", "x9"),  # a conversation the index does not know
]


@pytest.fixture(scope="module")
def engine(tokenizer):
    engine = ScriptedEngine(make_model(tokenizer.vocab_size, max_seq_len=1024), tokenizer, max_batch_size=2)
    engine.reply = "Thursday, see [p1] and [p4]"
    return engine


def follower(index, engine, stream, replies, batch_lines=100):
    desk = MentionDesk(Assistant(index, IndexSettings(recency_weight=0),
                                 AssistantSettings(handle="murmurbot", user_id="bot")))
    return MentionFollower(desk, engine, stream, ReplyLedger(replies), poll_interval_s=0.05, batch_lines=batch_lines,
                           max_record_bytes=65536)


def read_replies(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_mentions_in_a_stream_are_answered_once(make_index, engine, tmp_path):
    index = make_index()
    stream, replies = tmp_path / "stream.jsonl", tmp_path / "replies.jsonl"
    stream.write_bytes(b"".join(line(d) for d in STREAM))
    asked = len(engine.prompts)
    counts = follower(index, engine, stream, replies).run(until_idle=True)
    [reply] = read_replies(replies)
    assert reply["reply"] == {"in_reply_to_tweet_id": "m1"} and reply["text"] == "Thursday, see [p1] and [p4]"
    assert reply["annotations"] == []  # p1 and p4 are the thread, not retrieved posts: nothing to cite
    assert counts["replied"] == 1 and counts["skipped_own_post"] == 1 and counts["skipped_deleted"] == 1
    assert counts["refused_unknown_conversation"] == 1
    assert len(engine.prompts) == asked + 1
    assert "@dan: Is the meetup still on Wednesday?" in engine.prompts[-1]
    assert index.get(["p1", "m1"]).keys() == {"p1", "m1"} and not index.get(["m3"])  # the stream was indexed
    # A restart resumes after the last line: nothing is read again, nothing answered again.
    assert follower(index, engine, stream, replies).run(until_idle=True)["lines"] == 0
    with open(stream, "ab") as f:
        f.write(line(post("m5", "@murmurbot and the pier 7 snacks?", "ivy", "p1", "p1")))
        f.write(line(post("p9", "snacks at the pier 7 meetup are on me", "jon")))
    follower(index, engine, stream, replies).run(until_idle=True)
    assert [r["reply"]["in_reply_to_tweet_id"] for r in read_replies(replies)] == ["m1", "m5"]


def test_a_crash_between_a_reply_and_its_offset_never_answers_twice(make_index, engine, tmp_path):
    index = make_index()
    stream, replies = tmp_path / "stream.jsonl", tmp_path / "replies.jsonl"
    stream.write_bytes(b"".join(line(d) for d in STREAM[:3]))
    crashing = follower(index, engine, stream, replies)
    original = index.apply

    def apply(changes, cursor=None):
        if cursor is not None:
            raise MurmurError("killed before the offset was saved")
        return original(changes, cursor)

    index.apply = apply
    with pytest.raises(MurmurError):
        crashing.run(until_idle=True)
    index.apply = original
    assert [r["reply"]["in_reply_to_tweet_id"] for r in read_replies(replies)] == ["m1"]
    asked = len(engine.prompts)
    counts = follower(index, engine, stream, replies).run(until_idle=True)
    assert counts["already_answered"] == 1 and not counts["replied"]
    assert len(engine.prompts) == asked and len(read_replies(replies)) == 1


def test_a_torn_last_reply_is_dropped_and_a_foreign_file_refused(tmp_path):
    replies = tmp_path / "replies.jsonl"
    whole = line({"text": "hi", "reply": {"in_reply_to_tweet_id": "m1"}, "annotations": []})
    replies.write_bytes(whole + b'{"text": "half a rep')
    assert ReplyLedger(replies).answered == {"m1"}
    assert replies.read_bytes() == whole
    replies.write_bytes(b'{"something": "else"}\n')
    with pytest.raises(MurmurError, match="not a reply this command wrote"):
        ReplyLedger(replies)
