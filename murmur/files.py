"""Every write Murmur makes that a reader may see: atomic (a reader never sees half a file or half a folder) and,
where a crash must not lose it, durable; plus tolerant JSONL reads.

A file is written under a hidden temporary name beside its final one (same file system, so the rename is
atomic), then renamed; a folder is built beside its final one and swapped in. With `durable=True` the data is
fsynced before the rename and the parent folder after it, so once the call returns the new file survives a
power cut (checkpoint metadata, `latest`, token manifests, deletion records, stats.json); without it a crash
may lose the write but never leaves a torn file under the final name.

    write_json_atomic(path, data, durable=True)      # the one JSON format: indent 2, UTF-8, final newline
    with atomic_path(path) as tmp: stream_to(tmp)    # any writer that wants a path (Parquet, PNG, shards)
    with staged_dir(out_dir) as tmp: fill(tmp)       # a whole folder, replaced in one rename
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir(name: str) -> Path:
    """Murmur's cache folder `name` (GGUF conversions, compiled kernels): $XDG_CACHE_HOME (else ~/.cache)/murmur/NAME.
    Only where it is; the callers create what they write there."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "murmur" / name


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a folder's data and metadata to disk (a folder's: the names it holds)."""
    flags = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if Path(path).is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    # Hidden (no reader globs dot files) and unique per process and thread, so concurrent writers never collide.
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


@contextmanager
def atomic_path(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on a clean exit it replaces `path`, on an error it is
    removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_atomic(path: str | Path, write: Callable[[Path], None], *, durable: bool = False) -> Path:
    """Call write(temporary path), then move the result to `path` (see `atomic_path`)."""
    with atomic_path(path, durable=durable) as tmp:
        write(tmp)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes, *, durable: bool = False, mode: int | None = None) -> Path:
    """Replace `path` with `data`; `mode` sets the file's permissions."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        if mode is not None:
            os.chmod(tmp, mode)
    return write_atomic(path, write, durable=durable)


def write_text_atomic(path: str | Path, text: str, *, durable: bool = False, mode: int | None = None) -> Path:
    """Replace `path` with `text` in UTF-8; `mode` sets the file's permissions."""
    return write_bytes_atomic(path, text.encode("utf-8"), durable=durable, mode=mode)


def write_json_atomic(path: str | Path, data: Any, *, durable: bool = False) -> Path:
    """Replace `path` with `data` as JSON: indented by 2, non-ASCII characters as themselves, keys in the
    order the caller built them (readers parse, never compare bytes), a final newline. A value JSON cannot
    hold is an error here, not a string that no reader expects."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", durable=durable)


def write_table_atomic(table, path: str | Path, *, durable: bool = False) -> Path:
    """Replace `path` with an Arrow table as Parquet."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda tmp: pq.write_table(table, tmp), durable=durable)


def move_atomic(source: str | Path, target: str | Path, *, durable: bool = False) -> Path:
    """Move a finished file to `target` (replacing it) in one rename; both must be on one file system."""
    target = Path(target)
    if durable:
        fsync_path(source)
    os.replace(source, target)
    if durable:
        fsync_path(target.parent)
    return target


def replace_dir(tmp: str | Path, final: str | Path, *, durable: bool = False) -> Path:
    """Move the finished folder `tmp` to `final`, replacing an existing one: the old folder is renamed aside,
    the new one renamed in, then the old one removed. A reader never sees a mix of the two, only (for the
    instant between the renames) no folder; when the second rename fails the old folder is put back.

    durable: fsync `tmp` (the names it holds) before the rename and the parent after it. The files inside are
    the caller's to write durably when they must survive a crash (a manifest, checkpoint metadata)."""
    tmp, final = Path(tmp), Path(final)
    if durable:
        fsync_path(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if durable:
        fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def staged_dir(final: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A new empty folder beside `final` to fill; on a clean exit it replaces `final` (`replace_dir`), on an
    error it is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final, durable=durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_dir(path: str | Path) -> None:
    """Delete a folder (or a file) so that no reader ever sees it half removed: renamed aside, then deleted."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    doomed = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
    os.replace(path, doomed)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file (none when it is missing); a line that does not parse (a write cut short
    by a kill) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            records.append(item)
    return records
