"""An X archive is a folder: tweets.js and its parts, long posts from note-tweet.js, deletions from
deleted-tweets.js, and direct messages that are never read, whatever the recipe says."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from murmur.data import pipeline
from murmur.data.sources import resolve_sources
from murmur.errors import MurmurError
from murmur.settings.data import DataSettings

SECRET = "dm-secret-7f3a kept between two friends only"
LONG = ("This is a long post written as a note: it goes on well past the two hundred and eighty characters a "
        "tweet holds, so the archive's tweets.js keeps only its beginning, an ellipsis and a link, while "
        "note-tweet.js keeps every word of it, including this closing sentence about the weather in Lisbon.")


def _js(name: str, items: list) -> str:
    return f"window.YTD.{name}.part0 = " + json.dumps(items, indent=1)


def _tweet(tweet_id: str, text: str, when: str = "Wed Oct 10 20:19:24 +0000 2018", reply_to: str | None = None) -> dict:
    tweet = {"id_str": tweet_id, "full_text": text, "created_at": when, "lang": "en",
             "entities": {"user_mentions": [], "urls": []}}
    if reply_to:
        tweet["in_reply_to_status_id_str"] = reply_to
    return {"tweet": tweet}


def make_archive(root: Path) -> Path:
    data = root / "archive" / "data"
    data.mkdir(parents=True)
    (data / "account.js").write_text(_js("account", [{"account": {"accountId": "777"}}]))
    truncated = LONG[:120] + "… https://t.co/abcDEF123"
    (data / "tweets.js").write_text(_js("tweets", [
        _tweet("9001", "The first part of the archive holds this post about gardening"),
        _tweet("9002", truncated, when="Thu Oct 11 08:00:00 +0000 2018"),
        _tweet("9003", "A post its owner deleted later, so it must not be kept"),
    ]))
    (data / "tweets-part1.js").write_text(_js("tweets_part1", [
        _tweet("9101", "The second part of the archive holds this post about cycling"),
        _tweet("9102", "And a reply within the second part, about the same ride", reply_to="9101"),
    ]))
    (data / "note-tweet.js").write_text(_js("note_tweet", [
        {"noteTweet": {"noteTweetId": "5550001", "createdAt": "2018-10-11T08:00:00.000Z",
                       "core": {"text": LONG, "urls": [], "mentions": [], "hashtags": []}}},
        {"noteTweet": {"noteTweetId": "5550002", "createdAt": "2018-10-11T08:00:00.000Z",
                       "core": {"text": "Another note of the same second that begins differently", "urls": []}}},
    ]))
    (data / "deleted-tweets.js").write_text(_js("deleted_tweets", [
        {"tweet": {"id_str": "9003", "full_text": "A post its owner deleted later, so it must not be kept",
                   "deleted_at": "2019-01-01T00:00:00.000Z"}},
    ]))
    dm = [{"dmConversation": {"conversationId": "1-2", "messages": [
        {"messageCreate": {"id": "8001", "senderId": "777", "recipientId": "778", "text": SECRET,
                           "createdAt": "2018-10-10T20:19:24.000Z"}}]}}]
    (data / "direct-messages.js").write_text(_js("direct_messages", dm))
    (data / "direct-messages-group.js").write_text(_js("direct_messages_group", dm))
    return root / "archive"


def _settings(sources: list[str], **extra) -> DataSettings:
    return DataSettings(sources=sources, workers=1, validation_fraction=0.0, test_fraction=0.0, **extra)


def _everything_written(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file())


def test_archive_folder_reads_parts_notes_and_deletions(tmp_path, capsys):
    archive = make_archive(tmp_path)
    out = tmp_path / "out"
    stats = pipeline.run(_settings([f"x-archive:{archive}"]), out, progress=False)
    posts = {row["id"]: row for row in pq.read_table(out / "posts.parquet").to_pylist()}
    assert set(posts) == {"9001", "9002", "9101", "9102"}  # both parts; 9003 deleted by its owner
    assert posts["9002"]["text"] == LONG  # the note's full text, not the truncated one
    assert {p["author_id"] for p in posts.values()} == {"777"}
    assert stats["dropped"].get("deleted") == 1
    assert "post:9003" in (out / "deletions.txt").read_text()  # recorded, so later runs and audits honour it
    assert posts["9102"]["root_id"] == "9101"  # the reply is threaded under its parent
    captured = capsys.readouterr()
    assert SECRET.encode() not in _everything_written(out)
    assert SECRET not in captured.out + captured.err


def test_direct_messages_are_never_read(tmp_path, capsys):
    archive = make_archive(tmp_path)
    data = archive / "data"
    # A glob over the whole folder passes over the direct messages (and the companions are not posts).
    files = resolve_sources([f"x-archive:{data}/*.js"])
    assert sorted(f.path.name for f in files) == ["account.js", "tweets-part1.js", "tweets.js"]
    # Whatever format a recipe names them with, on their own or by a glob, they are not read.
    for spec in (f"x-archive:{data}/direct-messages.js", f"jsonl:{data}/direct-messages-group.js",
                 f"text:{data}/direct-messages.js"):
        with pytest.raises(MurmurError, match="direct messages are private") as err:
            resolve_sources([spec])
        assert SECRET not in str(err.value)
    assert [f.path.name for f in resolve_sources([f"text:{data}/direct*.js", f"text:{data}/tweets.js"])] == ["tweets.js"]
    out = tmp_path / "out"
    stats = pipeline.run(_settings([f"text:{data}/*.js"]), out, progress=False)
    assert stats["in"] > 0
    captured = capsys.readouterr()
    assert SECRET.encode() not in _everything_written(out)
    assert SECRET not in captured.out + captured.err


def test_an_unreadable_deleted_tweets_file_stops_the_run(tmp_path):
    archive = make_archive(tmp_path)
    (archive / "data" / "deleted-tweets.js").write_text("window.YTD.deleted_tweets.part0 = [{broken")
    with pytest.raises(MurmurError, match="deleted-tweets.js is not a readable archive file"):
        pipeline.run(_settings([f"x-archive:{archive}"]), tmp_path / "out", progress=False)


def test_a_folder_without_tweets_is_refused(tmp_path):
    (tmp_path / "empty" / "data").mkdir(parents=True)
    with pytest.raises(MurmurError, match="holds no tweets.js"):
        resolve_sources([f"x-archive:{tmp_path / 'empty'}"])
