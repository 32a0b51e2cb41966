"""`murmur assistant --follow`: answer the mentions in a growing stream file, writing reply posts to a JSONL
file, for platforms that integrate by files rather than HTTP.

The stream is followed as `murmur index --follow` follows it (`murmur.index.follow.Follower`): its posts
and deletions go into the index, so threads can be rebuilt and deleted posts never ground a reply. Each
batch is handled in three steps: (1) its changes are applied to the index, (2) its mentions are answered,
each reply appended to the replies file and flushed to disk before the next, (3) the stream offset is
committed (under its own cursor name, `assistant:PATH`, apart from an indexer following the same file).
A process killed between (2) and (3) reads the batch again on restart: the changes are idempotent, and the
replies file is the ledger of answered mentions (read back at start, a torn last line dropped), so no
mention is ever answered twice.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from murmur.assistant.mentions import MentionDesk, MentionError, Skip, mentions_handle, parse_mention
from murmur.errors import MurmurError
from murmur.index.base import Changes, Cursor
from murmur.index.events import EventReader
from murmur.index.follow import Follower, head_digest
from murmur.infer.sampling import SamplingParams

MAX_LEDGER_LINE = 1 << 20


class ReplyLedger:
    """The replies file: one JSON reply per line, appended durably; which mentions it has answered."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answered: set[str] = set()
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a reply torn by a crash mid-write: it was never complete, so never sent
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        for number, line in enumerate(data[:end].splitlines(), 1):
            try:
                record = json.loads(line)
                self.answered.add(str(record["reply"]["in_reply_to_tweet_id"]))
            except (ValueError, KeyError, TypeError):
                raise MurmurError(f"{self.path} line {number} is not a reply this command wrote; pass another "
                                  "--out file") from None

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.answered.add(record["reply"]["in_reply_to_tweet_id"])


class MentionReader:
    """An EventReader that also sets aside the posts of each line that mention the handle (and were indexed)."""

    def __init__(self, events: EventReader, handle: str):
        self.events, self.handle = events, handle
        self.needle = f"@{handle}".lower().encode()
        self.pending: list[dict] = []

    @property
    def dropped(self) -> Counter:
        return self.events.dropped

    def read(self, line: bytes, source: str, offset: int, changes: Changes) -> None:
        before = len(changes)
        self.events.read(line, source, offset, changes)
        if self.needle not in line.lower() or not any(event == "add" for event, _ in changes.events[before:]):
            return
        document = json.loads(line)  # parsed already by the EventReader, so it is bounded JSON
        data = document.get("data", document) if isinstance(document, dict) else None
        for item in data if isinstance(data, list) else [data]:
            if isinstance(item, dict) and mentions_handle(item, self.handle):
                self.pending.append(item)

    def take(self) -> list[dict]:
        taken, self.pending = self.pending, []
        return taken


class MentionFollower(Follower):
    """Follows a stream into the index and answers its mentions into a `ReplyLedger` (module docstring)."""

    def __init__(self, desk: MentionDesk, engine, path: str | Path, ledger: ReplyLedger, *,
                 on_reply: Callable[[dict], None] | None = None, **follow):
        settings = desk.assistant
        reader = MentionReader(EventReader(settings.index_settings, settings.data_settings), desk.settings.handle)
        super().__init__(settings.index, path, reader, **follow)
        self.source = "assistant:" + self.source  # its own cursor: an indexer may follow the same file
        self.desk, self.engine, self.ledger, self.on_reply = desk, engine, ledger, on_reply
        self.params = SamplingParams(temperature=desk.settings.temperature, top_p=desk.settings.top_p,
                                     max_tokens=desk.settings.reply_max_tokens)

    def _commit(self, changes: Changes, lines: int, fd: int, offset: int) -> None:
        counts = self.index.apply(changes)
        for document in self.reader.take():
            counts[self.answer(document)] += 1
        self.index.apply(Changes(), Cursor(self.source, offset, head_digest(fd, offset)))
        counts["lines"] += lines
        self.counts.update(counts)
        if self.on_batch:
            self.on_batch(counts)

    def fits(self, messages: list[dict]) -> bool:
        ids, _ = self.engine.encode_prompt(messages)
        return len(ids) + self.params.max_tokens < self.engine.max_seq_len

    def answer(self, document: dict) -> str:
        """Answer one mention; what happened, as a count's name."""
        try:
            if parse_mention(document, self.desk.settings.handle).id in self.ledger.answered:
                return "already_answered"
            plan = self.desk.plan(document, fits=self.fits)
        except MentionError as err:
            return f"refused_{err.code}"
        if isinstance(plan, Skip):
            return f"skipped_{plan.reason}"
        completion = self.engine.generate([plan.messages], self.params)[0]
        reply = self.desk.compose(plan, completion.text)
        if reply is None:
            return "skipped_empty_reply"
        self.ledger.append(reply)
        if self.on_reply:
            self.on_reply(reply)
        return "replied"
