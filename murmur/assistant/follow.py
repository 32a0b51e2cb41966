"""`murmur assistant --follow`: answer the mentions in a growing stream file, writing reply posts to a JSONL
file, for platforms that integrate by files rather than HTTP.

The stream is followed as `murmur index --follow` follows it (`murmur.index.follow.Follower`): its posts
and deletions go into the index, so threads can be rebuilt and deleted posts never ground a reply. Each
batch is handled in three steps: (1) its changes are applied to the index, (2) its mentions are answered,
each reply appended to the replies file and flushed to disk before the next, (3) the stream offset is
committed (under its own cursor name, `assistant:PATH`, apart from an indexer following the same file).

Which mentions were answered is the index's record (`PostIndex.answer_of`), the one `POST /v1/mentions`
keeps too, so a mention answered over HTTP is not answered again from the stream, nor the reverse. Each reply
is appended to the file (fsynced), then recorded in the index; a process killed between the two leaves one
reply in the file that the index does not know, the file's last line, so at start the ledger reads that line
alone (a torn one dropped) and the follower records it. A process killed between (2) and (3) reads the batch
again on restart: the changes are idempotent and its mentions are recorded, so no mention is ever answered
twice, and memory does not grow with the replies written.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from murmur.assistant.mentions import (Answered, MentionDesk, MentionError, Skip, mentions_handle,
                                      parse_mention)
from murmur.errors import MurmurError
from murmur.index.base import Changes, Cursor
from murmur.index.events import EventReader
from murmur.index.follow import Follower, head_digest
from murmur.infer.sampling import SamplingParams

MAX_LEDGER_LINE = 1 << 20


class ReplyLedger:
    """The replies file: one JSON reply per line, appended durably. `answered` holds the mention of its last reply
    only (at most one id), the one a crash may have kept from the index's record; the rest are in the index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.answered: set[str] = set()
        self.last: dict | None = None
        if self.path.is_file():
            self._read_tail()

    def _read_tail(self) -> None:
        """Read the last complete line (at most MAX_LEDGER_LINE bytes from the end); drop a torn one after it."""
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - MAX_LEDGER_LINE - 1)
            f.seek(start)
            tail = f.read()
            end = tail.rfind(b"\n") + 1
            if end == 0 and size:
                raise MurmurError(f"{self.path} ends with {len(tail):,} bytes that are not a reply this command "
                                  "wrote; pass another --out file")
            if end < len(tail):  # a reply torn by a crash mid-write: it was never complete, so never sent
                f.truncate(start + end)
                os.fsync(f.fileno())
        lines = tail[:end].splitlines()
        if not lines:
            return
        try:
            record = json.loads(lines[-1])
            self.answered = {str(record["reply"]["in_reply_to_tweet_id"])}
            self.last = record
        except (ValueError, KeyError, TypeError):
            raise MurmurError(f"{self.path}: the last line is not a reply this command wrote; pass another "
                              "--out file") from None

    def append(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.answered = {record["reply"]["in_reply_to_tweet_id"]}
        self.last = record


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
        if ledger.last is not None and not desk.assistant.index.answer_of(next(iter(ledger.answered))):
            # Killed between writing its last reply and recording it: record it now, before any line is read.
            last = ledger.last
            desk.assistant.index.record_answer(str(last["reply"]["in_reply_to_tweet_id"]), None,
                                               {"text": last.get("text", ""), "retrieved": []})

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
        if isinstance(plan, Answered):
            return "already_answered"
        if isinstance(plan, Skip):
            return f"skipped_{plan.reason}"
        completion = self.engine.generate([plan.messages], self.params)[0]
        reply = self.desk.compose(plan, completion.text)
        if reply is None:
            return "skipped_empty_reply"
        self.ledger.append(reply)  # first the file, then the record: a kill between is mended at start
        self.desk.remember(plan, reply)
        if self.on_reply:
            self.on_reply(reply)
        return "replied"
