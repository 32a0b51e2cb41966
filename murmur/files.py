"""File helpers every stage shares: atomic writes (a reader never sees half a file) and tolerant JSONL reads."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path


def _write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(temporary path) beside `path` (same file system, so the rename is atomic), then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # unique per thread
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` through a temporary file and a rename; `mode` sets the file's permissions."""
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)
    return _write_atomic(path, write)


def write_table_atomic(table, path: str | Path) -> Path:
    """Write an Arrow table as Parquet through a temporary file and a rename."""
    import pyarrow.parquet as pq

    return _write_atomic(path, lambda tmp: pq.write_table(table, tmp))


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
