"""Following a stream into the index, on both backends: lines still being written wait, over-long lines are
skipped in bounded memory, a replaced file is read again, new posts and deletions are visible within 1 s of
being written (a real follower process), and a follower killed with SIGKILL resumes without losing or
repeating a line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from index_fixtures import backend, fresh_schema, make_index, postgres_url  # noqa: F401 (fixtures)

from murmur.index import open_index
from murmur.index.events import EventReader
from murmur.index.follow import Follower
from murmur.index.postgres import PostgresIndex
from murmur.settings.index import IndexSettings

ROOT = Path(__file__).resolve().parent.parent


def post(ident: str, text: str, author: str = "u1") -> bytes:
    return json.dumps({"data": {"id": ident, "text": text, "author_id": author}}).encode() + b"\n"


def follow_once(index, path: Path, max_record_bytes: int = 65536) -> Follower:
    follower = Follower(index, path, EventReader(IndexSettings(max_record_bytes=max_record_bytes)),
                        max_record_bytes=max_record_bytes, batch_lines=2)
    follower.run(until_idle=True)
    return follower


def test_partial_lines_wait_and_resume_uses_the_cursor(make_index, tmp_path):
    index = make_index()
    stream = tmp_path / "stream.jsonl"
    stream.write_bytes(post("1", "first post") + post("2", "second post")[:20])
    follow_once(index, stream)
    assert sorted(index.get(["1", "2"])) == ["1"]
    with open(stream, "ab") as f:
        f.write(post("2", "second post")[20:] + post("3", "third post"))
    follower = follow_once(index, stream)
    assert sorted(index.get(["1", "2", "3"])) == ["1", "2", "3"]
    assert follower.counts["added"] == 2  # the first line was not read again
    assert index.cursor(str(stream.resolve())).offset == stream.stat().st_size


def test_an_over_long_line_is_quarantined_in_bounded_memory(make_index, tmp_path):
    index = make_index()
    stream = tmp_path / "stream.jsonl"
    huge = b'{"id": "big", "text": "' + b"x" * 3_000_000 + b'", "author_id": "u"}\n'
    stream.write_bytes(post("1", "before") + huge + post("2", "after"))
    follower = follow_once(index, stream, max_record_bytes=1000)
    assert sorted(index.get(["1", "2", "big"])) == ["1", "2"]
    assert index.quarantine_counts() == {"too_large": 1}
    assert follower.counts["quarantined"] == 1


def test_a_replaced_file_is_read_again_without_duplicates(make_index, tmp_path):
    index = make_index()
    stream = tmp_path / "stream.jsonl"
    stream.write_bytes(post("1", "one") + post("2", "two") + b'{"post": "2"}\n')
    follow_once(index, stream)
    # Rotated: a new file under the same name whose start differs. It is read from its first byte; the
    # deleted post 2 stays deleted (tombstone) even though the new file repeats it.
    stream.write_bytes(post("2", "two again") + post("3", "three"))
    follower = follow_once(index, stream)
    assert follower.counts["restarts"] == 1
    assert sorted(index.get(["1", "2", "3"])) == ["1", "3"]
    assert follower.counts["refused_deleted"] == 1


def test_a_crash_inside_a_commit_repeats_nothing(make_index, tmp_path):
    """The offset is written in the same transaction as the batch: a failure before the commit undoes both,
    so the next run applies the batch once (a bad line's quarantine row is not written twice)."""
    index = make_index()
    stream = tmp_path / "stream.jsonl"
    stream.write_bytes(post("1", "one") + b"{bad\n" + post("2", "two") + b"{bad\n" + post("3", "three"))
    real, calls = index._set_cursor, []

    def crash_on_second_batch(cursor):
        calls.append(cursor)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while committing")
        real(cursor)

    index._set_cursor = crash_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        follow_once(index, stream)
    assert sorted(index.get(["1", "2", "3"])) == ["1"] and index.quarantine_counts() == {"malformed_json": 1}
    index._set_cursor = real
    follow_once(index, stream)
    assert sorted(index.get(["1", "2", "3"])) == ["1", "2", "3"]
    assert index.quarantine_counts() == {"malformed_json": 2}


def test_stop_event_ends_a_follower(make_index, tmp_path):
    index = make_index()
    stream = tmp_path / "stream.jsonl"
    stream.write_bytes(post("1", "one"))
    stop = threading.Event()
    follower = Follower(index, stream, EventReader(), poll_interval_s=0.02)
    thread = threading.Thread(target=follower.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 30
    while not index.get(["1"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and index.get(["1"])


# -- a real follower process ----------------------------------------------------------------------------------

def start_follower(backend, request, tmp_path, stream: Path, *extra: str) -> tuple[subprocess.Popen, callable]:
    """A `murmur index RUN --follow STREAM` process, and a function that opens a reader on its index."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "murmur", "index", str(run), "--follow", str(stream),
            "--set", "index.poll_interval_s=0.05", *extra]
    if backend == "postgresql":
        url, schema = request.getfixturevalue("postgres_url"), fresh_schema()
        args += ["--index", url, "--set", f"index.pg_schema={schema}"]
        PostgresIndex(url, schema=schema, create=True).close()

        def reader():
            return PostgresIndex(url, schema=schema)
    else:
        open_index(run, create=True).close()

        def reader():
            return open_index(run)
    process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    request.addfinalizer(lambda: process.poll() is None and (process.kill(), process.wait()))
    return process, reader


def wait_until(condition, timeout: float) -> float:
    """Seconds until condition() held, or inf after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.01)
    return float("inf")


def test_follow_latency_of_inserts_and_deletes(backend, request, tmp_path):
    stream = tmp_path / "stream.jsonl"
    stream.write_bytes(post("warm", "the follower is up"))
    process, reader = start_follower(backend, request, tmp_path, stream)
    with reader() as index:
        assert wait_until(lambda: index.get(["warm"]), 120) < 120, process.stderr.read1().decode()
        # The bar is one second from the write. A loaded machine can stall any one measurement, so the
        # best of three must meet it: a follower that polls too slowly or commits late fails all three.
        inserts, deletes = [], []
        for attempt in range(3):
            ident = f"live{attempt}"
            with open(stream, "ab") as f:
                f.write(post(ident, f"breaking news number {attempt}"))
            inserts.append(wait_until(lambda: any(h.post.id == ident for h in index.search("breaking news", 10)), 10))
            with open(stream, "ab") as f:
                f.write(json.dumps({"data": {"delete": {"tweet": {"id": ident}}}}).encode() + b"\n")
            deletes.append(wait_until(lambda: not any(h.post.id == ident for h in index.search("breaking news", 10)),
                                      10))
            if min(inserts) < 1 and min(deletes) < 1:
                break
    assert min(inserts) < 1.0, f"insert latencies {inserts}"
    assert min(deletes) < 1.0, f"delete latencies {deletes}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert b"followed:" in process.stdout.read()


def test_sigkill_resumes_without_loss_or_repeats(backend, request, tmp_path):
    stream = tmp_path / "stream.jsonl"
    lines, expected, bad = [], set(), 0
    for i in range(3000):
        if i % 50 == 7:
            lines.append(b'{"not json\n')  # quarantined: a repeat would add a second quarantine row
            bad += 1
        elif i % 50 == 9:
            lines.append(json.dumps({"post": f"p{i - 5}"}).encode() + b"\n")
            expected.discard(f"p{i - 5}")
        else:
            lines.append(post(f"p{i}", f"post number {i} about the harbour"))
            expected.add(f"p{i}")
    stream.write_bytes(b"".join(lines))
    process, reader = start_follower(backend, request, tmp_path, stream, "--set", "index.batch_size=20")
    with reader() as index:
        # Kill it mid-stream: some batches applied, not all.
        waited = wait_until(lambda: len(index) > 300, 120)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert waited < 120 and len(index) < len(expected), "the follower finished before it could be killed"
    # The same command (same index), read to the end of the stream.
    finished = subprocess.run([*process.args, "--once"], cwd=ROOT, capture_output=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert finished.returncode == 0, finished.stderr.decode()
    with reader() as index:
        assert set(index.get(expected | {f"p{i}" for i in range(3000)})) == expected
        assert len(index) == len(expected)
        assert index.quarantine_counts() == {"malformed_json": bad}
        assert index.tombstones("post") == {f"p{i - 5}" for i in range(3000) if i % 50 == 9}
        assert index.cursor(str(stream.resolve())).offset == stream.stat().st_size

