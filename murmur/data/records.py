"""The records the data stage reads and writes: `Post`, `Conversation`, quarantined records, and their
explicit Parquet schemas (documented in docs/data.md).

Ids are strings everywhere: X ids exceed 2**53 and would lose digits as floats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pyarrow as pa

SPLITS = ("train", "validation", "test")

POST_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("author_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("lang", pa.string()),
    pa.field("conversation_id", pa.string()),
    pa.field("in_reply_to_id", pa.string()),
    pa.field("split", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    # Added by the data stage: the thread root the split was decided by, and the quoted post if any.
    pa.field("root_id", pa.string(), nullable=False),
    pa.field("quoted_id", pa.string()),
])

TURN_TYPE = pa.struct([
    pa.field("speaker", pa.string()),
    pa.field("text", pa.string()),
    pa.field("post_ids", pa.list_(pa.string())),
])

CONVERSATION_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("root_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("turns", pa.list_(TURN_TYPE)),
    pa.field("post_ids", pa.list_(pa.string())),
])

QUARANTINE_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("line", pa.int64()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("raw", pa.string()),
    pa.field("record_id", pa.string()),
])

# What a parse step hands to cleaning: the post plus transient fields that are not written out.
WORK_SCHEMA = pa.schema(list(POST_SCHEMA) + [pa.field("line", pa.int64())])


@dataclass(slots=True)
class Post:
    """One post as read from a source, before and after cleaning.

    `mentions` and `urls` carry the payload's entity offsets ((start, end, replacement-hint) tuples) when the
    source has them; they are used by cleaning and never written.
    """

    id: str
    author_id: str
    text: str
    source: str
    line: int | None = None
    created_at: datetime | None = None
    lang: str | None = None
    conversation_id: str | None = None
    in_reply_to_id: str | None = None
    quoted_id: str | None = None
    retweet_of_id: str | None = None
    mentions: list[tuple[int, int, str]] = field(default_factory=list)
    urls: list[tuple[int, int, str]] = field(default_factory=list)


@dataclass(slots=True)
class Quarantined:
    """A record that could not be used, kept with where it came from and why."""

    source: str
    line: int | None
    reason: str
    raw: str = ""
    record_id: str | None = None

    def row(self, snippet_chars: int) -> dict:
        return {"source": self.source, "line": self.line, "reason": self.reason,
                "raw": self.raw[:snippet_chars], "record_id": self.record_id}


@dataclass(slots=True)
class Turn:
    """Consecutive posts of one speaker, merged."""

    speaker: str
    text: str
    post_ids: list[str]


@dataclass(slots=True)
class Conversation:
    """A root-to-leaf path through a reply tree between alternating speakers."""

    id: str
    root_id: str
    split: str
    turns: list[Turn]

    @property
    def post_ids(self) -> list[str]:
        return [pid for turn in self.turns for pid in turn.post_ids]

    def row(self) -> dict:
        return {"id": self.id, "root_id": self.root_id, "split": self.split,
                "turns": [{"speaker": t.speaker, "text": t.text, "post_ids": t.post_ids} for t in self.turns],
                "post_ids": self.post_ids}
