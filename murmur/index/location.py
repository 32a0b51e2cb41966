"""Where an index is: `RUN/index/index.json` names the backend and its file or server, and `open_index` opens it.

index.json is read as hostile input: its size is bounded, the SQLite file must be a plain name inside the
index folder, and a PostgreSQL schema a plain lower-case name (it is spliced into SQL).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from murmur.files import write_json_atomic
from murmur.index.base import IndexUnavailable, PostIndex
from murmur.settings.index import IndexSettings, url_has_password

POINTER = "index.json"
MAX_POINTER_BYTES = 65536
SQLITE_FILE_RE = re.compile(r"posts-[A-Za-z0-9-]{1,64}\.sqlite")


def is_url(location) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def index_dir_of(path: str | Path) -> Path:
    """The index folder of a run folder, of its data folder, or the index folder itself."""
    path = Path(path)
    if (path / POINTER).is_file() or path.name == "index":
        return path
    if (path / "stats.json").is_file() and path.name == "data":
        return path.parent / "index"
    return path / "index"


def read_pointer(index_dir: Path) -> dict:
    pointer = index_dir / POINTER
    if not pointer.is_file():
        raise IndexUnavailable(f"no index in {index_dir} (no {POINTER}); build it with `murmur index RUN_DIR`")
    with open(pointer, "rb") as f:
        raw = f.read(MAX_POINTER_BYTES + 1)
    try:
        record = json.loads(raw) if len(raw) <= MAX_POINTER_BYTES else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("backend") not in ("sqlite", "postgresql"):
        raise IndexUnavailable(f"{pointer} is not an index record; rebuild with `murmur index RUN_DIR`")
    if record["backend"] == "sqlite" and not (isinstance(record.get("file"), str)
                                              and SQLITE_FILE_RE.fullmatch(record["file"])):
        raise IndexUnavailable(f"{pointer} names no index file of this folder; rebuild with `murmur index RUN_DIR`")
    if record["backend"] == "postgresql" and not (is_url(record.get("url")) and isinstance(record.get("schema"), str)):
        raise IndexUnavailable(f"{pointer} names no PostgreSQL index; rebuild with `murmur index RUN_DIR --index URL`")
    return record


def write_pointer(index_dir: Path, record: dict) -> None:
    write_json_atomic(index_dir / POINTER, record, durable=True)  # it names the database readers open


def open_index(location: str | Path, settings: IndexSettings | None = None, *, create: bool = False) -> PostIndex:
    """The index at a PostgreSQL url (schema `settings.pg_schema`), or the one a run, data or index folder's
    index.json names; query limits from the settings."""
    settings = settings or IndexSettings()
    limits = {"max_query_chars": settings.max_query_chars, "max_query_terms": settings.max_query_terms}
    if is_url(location):
        from murmur.index.postgres import PostgresIndex

        if url_has_password(location):
            raise IndexUnavailable("the index url holds a password, which would end up in logs and index.json; "
                                   "give it in PGPASSWORD or ~/.pgpass instead")
        return PostgresIndex(location, schema=settings.pg_schema, create=create, **limits)
    index_dir = index_dir_of(location)
    if create and not (index_dir / POINTER).is_file():
        from murmur.index.sqlite import SqliteIndex

        name = "posts-live.sqlite"
        index = SqliteIndex(index_dir / name, create=True, **limits)
        write_pointer(index_dir, {"backend": "sqlite", "file": name})
        return index
    record = read_pointer(index_dir)
    if record["backend"] == "sqlite":
        from murmur.index.sqlite import SqliteIndex

        return SqliteIndex(index_dir / record["file"], **limits)
    from murmur.index.postgres import PostgresIndex

    return PostgresIndex(record["url"], schema=record["schema"], **limits)
