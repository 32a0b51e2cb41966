"""File helpers every stage shares: atomic writes (a reader never sees half a file) and tolerant JSONL reads."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


def _temporary(path: Path) -> Path:
    # Beside the target (same file system, so os.replace is atomic), unique per process and thread.
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` through a temporary file and a rename; `mode` sets the file's permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_table_atomic(table, path: str | Path) -> Path:
    """Write an Arrow table as Parquet through a temporary file and a rename."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
