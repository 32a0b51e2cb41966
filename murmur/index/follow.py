"""Tail a growing JSONL stream file into the index: new posts searchable, deletions applied, within a second.

Each batch of complete lines is applied in one transaction together with the byte offset after its last line
(`PostIndex.apply(changes, cursor)`), so a follower killed at any moment, SIGKILL included, resumes exactly
after the last line it applied: nothing is lost and nothing applied twice. A line still being written (no
newline yet) waits. A line longer than `index.max_record_bytes` is skipped without being held in memory, and
quarantined. When the file is replaced or truncated (its first bytes differ from what the cursor remembers,
or it is shorter than the offset), it is read again from the start: ids are unique and deletions leave
tombstones, so replaying lines changes nothing already applied.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from murmur.errors import MurmurError
from murmur.index.base import Changes, Cursor, PostIndex
from murmur.index.events import EventReader

HEAD_BYTES = 4096
CHUNK_BYTES = 1 << 20


def head_digest(fd: int, offset: int) -> str:
    """A digest of the file's first min(offset, 4 KiB) bytes: it identifies the file the offset belongs to."""
    return hashlib.sha256(os.pread(fd, min(offset, HEAD_BYTES), 0)).hexdigest()


class Follower:
    """Follows one stream file into one index. `run()` until `stop` is set (or until the end of the file with
    `until_idle=True`); `on_batch(counts)` is called after each committed batch."""

    def __init__(self, index: PostIndex, path: str | Path, reader: EventReader, *, poll_interval_s: float = 0.1,
                 batch_lines: int = 5000, max_record_bytes: int = 65536,
                 on_batch: Callable[[Counter], None] | None = None):
        self.index, self.path, self.reader = index, Path(path), reader
        self.source = str(self.path.resolve())
        self.poll_interval_s, self.batch_lines, self.max_record_bytes = poll_interval_s, batch_lines, max_record_bytes
        self.on_batch = on_batch
        self.counts: Counter = Counter()

    def start_offset(self, fd: int) -> int:
        """Where to resume: the cursor's offset when it belongs to this file, else the start."""
        cursor = self.index.cursor(self.source)
        if cursor is None:
            return 0
        size = os.fstat(fd).st_size
        if cursor.offset > size or head_digest(fd, cursor.offset) != cursor.head:
            self.counts["restarts"] += 1
            return 0
        return cursor.offset

    def run(self, stop: threading.Event | None = None, until_idle: bool = False) -> Counter:
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                if until_idle:
                    raise MurmurError(f"stream {self.path} not found; pass the JSONL file to follow") from None
                stop.wait(self.poll_interval_s)  # not created yet, or between a rotation's rename and create
                continue
            except OSError as err:
                raise MurmurError(f"cannot read stream {self.path}: {err.strerror}") from None
            try:
                replaced = self._follow(fd, stop, until_idle)
            finally:
                os.close(fd)
            if not replaced:
                break
        return self.counts

    def _follow(self, fd: int, stop: threading.Event, until_idle: bool) -> bool:
        """Read one file until stopped; True when it was replaced or truncated (read the path again)."""
        offset = self.start_offset(fd)
        os.lseek(fd, offset, os.SEEK_SET)
        pending = bytearray()  # the start of a line whose newline has not come yet
        skipping = False  # inside a line longer than max_record_bytes: its bytes are dropped as they come
        line_start = offset
        while not stop.is_set():
            chunk = os.read(fd, CHUNK_BYTES)
            if not chunk:
                if until_idle:
                    return False
                if self._replaced(fd, offset):
                    return True
                stop.wait(self.poll_interval_s)
                continue
            changes, lines = Changes(), 0
            start = 0
            while True:
                newline = chunk.find(b"\n", start)
                piece = chunk[start:] if newline < 0 else chunk[start:newline]
                if not skipping:
                    pending += piece
                    if len(pending) > self.max_record_bytes:
                        skipping, pending = True, bytearray()
                if newline < 0:
                    break
                if skipping:
                    changes.quarantine(self.source, line_start, "too_large")
                else:
                    self.reader.read(bytes(pending), self.source, line_start, changes)
                lines += 1
                pending, skipping = bytearray(), False
                line_start = offset + newline + 1
                start = newline + 1
                if lines >= self.batch_lines:
                    self._commit(changes, lines, fd, line_start)
                    changes, lines = Changes(), 0
            offset += len(chunk)
            if lines:
                self._commit(changes, lines, fd, line_start)
        return False

    def _replaced(self, fd: int, position: int) -> bool:
        """Whether the path now names another file, or this one was truncated below what was read."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False  # mid-rotation: keep the old file until a new one appears
        mine = os.fstat(fd)
        return (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev) or mine.st_size < position

    def _commit(self, changes: Changes, lines: int, fd: int, offset: int) -> None:
        counts = self.index.apply(changes, Cursor(self.source, offset, head_digest(fd, offset)))
        counts["lines"] += lines
        self.counts.update(counts)
        if self.on_batch:
            self.on_batch(counts)


def follow(index: PostIndex, path: str | Path, reader: EventReader, *, poll_interval_s: float, batch_lines: int,
           max_record_bytes: int, stop: threading.Event | None = None, until_idle: bool = False,
           on_batch: Callable[[Counter], None] | None = None) -> Counter:
    """Follow `path` into `index` (see Follower); the counts of what was applied."""
    started = time.monotonic()
    follower = Follower(index, path, reader, poll_interval_s=poll_interval_s, batch_lines=batch_lines,
                        max_record_bytes=max_record_bytes, on_batch=on_batch)
    counts = follower.run(stop, until_idle)
    counts["seconds"] = round(time.monotonic() - started, 3)
    return counts
