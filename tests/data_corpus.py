"""A tiny corpus with every kind of record the data stage meets, written by tests (never downloaded)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import zstandard


def tweet(id, text, author="100", reply_to=None, conv=None, lang="en", created="2024-01-01T00:00:00.000Z", **extra):
    obj = {"id": str(id), "text": text, "author_id": author, "created_at": created, "lang": lang,
           "conversation_id": str(conv or id)}
    if reply_to:
        obj["referenced_tweets"] = [{"type": "replied_to", "id": str(reply_to)}]
        obj["in_reply_to_user_id"] = "999"
    obj.update(extra)
    return obj


def thread_tweets() -> list[dict]:
    """A reply tree: 1 <- 2 <- 3 (same author as 2, merged) <- 4, and 1 <- 5 (a second branch)."""
    return [
        tweet(1_000_000_000_000_000_001, "What is everyone cooking this weekend? I need ideas",
              author="alice", created="2024-01-01T10:00:00.000Z"),
        tweet(1_000_000_000_000_000_002, "@alice A big pot of chili, always a winner", author="bob",
              reply_to=1_000_000_000_000_000_001, conv=1_000_000_000_000_000_001, created="2024-01-01T10:01:00.000Z",
              entities={"mentions": [{"start": 0, "end": 6, "username": "alice", "id": "alice"}]}),
        tweet(1_000_000_000_000_000_003, "with cornbread on the side of course", author="bob",
              reply_to=1_000_000_000_000_000_002, conv=1_000_000_000_000_000_001, created="2024-01-01T10:02:00.000Z"),
        tweet(1_000_000_000_000_000_004, "That sounds perfect for the cold weather, thanks", author="alice",
              reply_to=1_000_000_000_000_000_003, conv=1_000_000_000_000_000_001, created="2024-01-01T10:03:00.000Z"),
        tweet(1_000_000_000_000_000_005, "Roast vegetables with garlic and rosemary!", author="carol",
              reply_to=1_000_000_000_000_000_001, conv=1_000_000_000_000_000_001, created="2024-01-01T10:04:00.000Z"),
    ]


def write_corpus(root: Path) -> dict[str, Path]:
    """Files of every format and every kind of bad record; returns their paths by name."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    # X API envelope with includes: a retweet whose original is in includes, a long note, PII, a quote.
    envelope = {
        "data": [
            tweet(2001, "RT @dave: Original thoughts on sourdough baking", author="erin",
                  referenced_tweets=[{"type": "retweeted", "id": "2002"}]),
            tweet(2003, "This text is trunc…", author="frank",
                  note_tweet={"text": "This text is truncated in the text field but complete in the note "
                                      "that replaces it &amp; says more"}),
            tweet(2004, "Mail me at jane.doe@example.com or call 415-555-0132, card 4111 1111 1111 1111 from "
                        "10.0.0.1", author="grace"),
            tweet(2005, "Check this out https://t.co/abc", author="heidi",
                  entities={"urls": [{"start": 15, "end": 31, "url": "https://t.co/abc",
                                      "expanded_url": "https://www.example.org/page"}]}),
        ],
        "includes": {"tweets": [tweet(2002, "Original thoughts on sourdough baking", author="dave")],
                     "users": [{"id": "dave", "username": "dave"}]},
    }
    paths["envelope"] = root / "page.json"
    paths["envelope"].write_text(json.dumps(envelope, indent=2))
    # JSONL of tweets, gzip: the thread, duplicates, spam, bad lines.
    lines = [json.dumps(t) for t in thread_tweets()]
    lines += [
        json.dumps(tweet(3001, "Exactly the same sentence, posted twice by two accounts", author="ivan",
                         created="2024-02-01T00:00:00.000Z")),
        json.dumps(tweet(3002, "exactly the same sentence posted twice by two accounts!!", author="judy",
                         created="2024-02-02T00:00:00.000Z")),
        json.dumps(tweet(3003, "A nearly identical sentence that was posted by a first account today", author="ken",
                         created="2024-02-01T00:00:00.000Z")),
        json.dumps(tweet(3004, "A nearly identical sentence that was posted by the first account today", author="leo",
                         created="2024-02-03T00:00:00.000Z", lang="und")),
        json.dumps(tweet(3005, "https://spam.example.com/buy", author="mallory")),
        json.dumps(tweet(3006, "#a #b #c #d #e #f #g #h buy now", author="mallory")),
        json.dumps(tweet(3007, "sooooooooooooooooooooo good", author="nina")),
        json.dumps(tweet(3008, "Ceci est un message en français pour tester le filtre de langue", author="olga",
                         lang="fr")),
        '{"id": "3009", "text": "broken json',  # malformed JSON line
        json.dumps(tweet(3010, "x" * 1_000_000, author="peggy")),  # a post of 1 MB
        json.dumps({"id": "3011", "author_id": "quinn", "lang": "en"}),  # no text
        json.dumps(tweet(3012, "An unknown field does not stop a good post", author="rupert", sparkle="yes")),
        json.dumps(tweet(3013, "ok", author="sybil")),
    ]
    for n in range(5):  # one author posting the same text many times
        lines.append(json.dumps(tweet(3100 + n, "Follow me for the best daily crypto tips and tricks", author="trent",
                                      created=f"2024-03-0{n + 1}T00:00:00.000Z")))
    raw = ("\n".join(lines) + "\n").encode("utf-8") + b'{"id": "3200", "text": "bad \xff\xfe bytes"}\n'
    paths["jsonl_gz"] = root / "tweets.jsonl.gz"
    paths["jsonl_gz"].write_bytes(gzip.compress(raw))
    # A truncated gzip file: its readable lines are read, the cut is quarantined.
    full = gzip.compress(("\n".join(json.dumps(tweet(4000 + i, f"Parcel {hashlib.sha1(bytes([i])).hexdigest()[:24]} in transit",
                                                            author="uma")) for i in range(50)) + "\n").encode())
    paths["truncated"] = root / "cut.jsonl.gz"
    paths["truncated"].write_bytes(full[: len(full) // 2])
    # zstd-compressed generic JSONL with a column mapping, and an empty file.
    topics = ["gardening tomatoes in spring", "repairing an old bicycle", "learning to play the violin"]
    generic = "\n".join(json.dumps({"post": f"g{i}", "body": f"A generic post about {topic}", "user": "victor",
                                    "when": "2024-04-01T00:00:00Z"}) for i, topic in enumerate(topics))
    paths["generic_zst"] = root / "generic.jsonl.zst"
    paths["generic_zst"].write_bytes(zstandard.ZstdCompressor().compress(generic.encode()))
    paths["empty"] = root / "empty.jsonl"
    paths["empty"].write_text("")
    # X archive.
    archive_dir = root / "archive" / "data"
    archive_dir.mkdir(parents=True)
    archive = [{"tweet": {"id_str": "5001", "full_text": "Archived post about hiking in the mountains",
                          "created_at": "Wed Oct 10 20:19:24 +0000 2018", "lang": "en",
                          "entities": {"user_mentions": [], "urls": []}}},
               {"tweet": {"id_str": "5002", "full_text": "@walter replying from the archive with care",
                          "in_reply_to_status_id_str": "5001", "created_at": "Wed Oct 10 20:20:24 +0000 2018",
                          "lang": "en", "entities": {"user_mentions": [{"screen_name": "walter",
                                                                       "indices": ["0", "7"]}]}}}]
    (archive_dir / "account.js").write_text('window.YTD.account.part0 = [{"account": {"accountId": "777"}}]')
    paths["archive"] = archive_dir / "tweets.js"
    paths["archive"].write_text("window.YTD.tweets.part0 = " + json.dumps(archive))
    # CSV and plain text.
    paths["csv"] = root / "posts.csv"
    paths["csv"].write_text("id,text,author_id,created_at\nc1,A csv post about cycling to work,xavier,2024-05-01\n"
                            "c2,,xavier,2024-05-02\n")
    paths["text"] = root / "lines.txt"
    paths["text"].write_text("A plain text post about reading books\n\nAnother plain line about tea\n")
    return paths


def source_specs(paths: dict[str, Path]) -> list[str]:
    return [f"x-api:{paths['envelope']}", f"x-api:{paths['jsonl_gz']}", f"jsonl:{paths['truncated']}",
            f"jsonl:{paths['generic_zst']}", f"jsonl:{paths['empty']}", f"x-archive:{paths['archive']}",
            f"csv:{paths['csv']}", f"text:{paths['text']}"]
