"""Readers for every input format. Each yields `Post` or `Quarantined` records, one per input record, so that
the pipeline can account for everything it read.

A source is `FORMAT:PATH`; PATH may be a glob, and files may be gzip- or zstd-compressed (detected by their
magic bytes, not their names). Missing files are reported before any work starts.

Every file is hostile until read: a line is read to at most `max_record_bytes` (the rest of a longer one is
skipped in bounded pieces), JSON nested deeper than `max_json_depth` is refused before the parser recurses into
it, and fields of the wrong type or with unencodable text never reach the batch step. Whatever cannot be used
becomes one quarantined record, and reading goes on with the next one.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa

from murmur.data.records import Post, Quarantined
from murmur.errors import MurmurError
from murmur.settings.data import FORMATS, DataSettings

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Generic formats: Post field -> columns tried in order when no explicit mapping names one.
DEFAULT_COLUMNS = {
    # An explicit mapping (settings.data.columns) is tried first, then these.
    "id": ["id", "id_str", "post_id"],
    "text": ["text", "full_text", "body", "content"],
    "author_id": ["author_id", "user_id", "author", "user"],
    "created_at": ["created_at", "timestamp", "date"],
    "lang": ["lang", "language"],
    "conversation_id": ["conversation_id", "thread_id"],
    "in_reply_to_id": ["in_reply_to_id", "in_reply_to_status_id_str", "in_reply_to_status_id", "parent_id"],
}

Record = Post | Quarantined
# What reading a damaged compressed file raises (gzip: EOFError, OSError; Arrow's zstd: OSError, ValueError).
STREAM_ERRORS = (EOFError, OSError, ValueError)
SKIP_PIECE = 1 << 16  # the rest of an over-long line is read past in pieces of this size
# Entity offsets beyond this point at no text a record may hold.
MAX_OFFSET = 2**31 - 1


def chitchat_path() -> Path:
    """The corpus file shipped inside the chitchat-dataset package."""
    try:
        import chitchat_dataset
    except ImportError:
        raise MurmurError("source 'chitchat:' (the demo corpus) needs the chitchat-dataset package: "
                          "pip install 'murmur[demo]'") from None
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


@dataclass
class SourceFile:
    """One input file and the format it is read as. An X archive's tweets file also names the archive's
    note-tweet.js (the full text of long posts), read with it."""

    format: str
    path: Path
    notes: Path | None = None
    # A byte range of a plain line-per-record file, so that workers can share one large file: the lines that
    # start in [start, end) are read, numbered from first_line (the number of the first line starting at or
    # after start).
    start: int = 0
    end: int | None = None
    first_line: int = 1
    # Set for remote storage (s3://, gs://, file://, memory://, any fsspec URL); `path` is then its path part.
    url: str | None = None

    @property
    def label(self) -> str:
        return f"{self.format}:{self.url}" if self.url else f"{self.format}:{_printable_path(self.path)}"

    @property
    def name(self) -> str:
        """The file's name as text every output can hold (a name need not be UTF-8 on disk)."""
        return _printable_path(Path(self.path.name))

    def size(self) -> int:
        if self.url:
            return int(_filesystem(self.url)[0].size(self.path.as_posix()))
        return self.path.stat().st_size

    def open_raw(self):
        """The file's bytes as a seekable binary file object."""
        if self.url:
            fs, path = _filesystem(self.url)
            return fs.open(path, "rb")
        return open(self.path, "rb")  # noqa: SIM115 - the caller closes it

    def stamp(self) -> list:
        """What identifies this input's content for a rerun: label, size and modification time of the file
        and of its companion note file (for a remote file: what its store reports, time or ETag)."""
        if self.url:
            info = _filesystem(self.url)[0].info(self.path.as_posix())
            version = next((str(info[k]) for k in ("mtime", "LastModified", "ETag", "etag", "updated", "created")
                            if info.get(k) is not None), "")
            return [self.label, [int(info.get("size") or 0), version]]
        files = [self.path] + ([self.notes] if self.notes else [])
        return [self.label] + [[f.stat().st_size, f.stat().st_mtime_ns] for f in files]


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(pattern: str) -> bool:
    return bool(_URL.match(pattern))


def _filesystem(url: str):
    """(fsspec filesystem, path) of a URL; the protocol's package (s3fs, gcsfs) is needed for it."""
    try:
        import fsspec
    except ImportError:
        raise MurmurError(f"{url}: reading URLs needs fsspec: pip install fsspec (and s3fs or gcsfs)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise MurmurError(f"{url}: cannot open this storage ({err}); install its fsspec package "
                          "(s3fs for s3://, gcsfs for gs://)") from None


def _resolve_url(spec: str, fmt: str, pattern: str) -> list[SourceFile]:
    """Files of a remote source: a URL or a URL glob, resolved by its store."""
    if fmt in ("x-archive", "chitchat"):
        raise MurmurError(f"source {spec!r}: {fmt} sources are read from local folders (an archive's deletions "
                          "and notes sit beside it); copy it to local storage")
    fs, root = _filesystem(pattern)
    explicit = not glob.has_magic(root)
    matches = sorted(fs.glob(root)) if not explicit else ([root] if fs.exists(root) else [])
    files = []
    for match in matches:
        path = PurePosixPath(match)
        if is_direct_messages(Path(path.name)):
            if explicit:
                raise MurmurError(f"source {spec!r}: direct messages are private and never read, whatever "
                                  "the recipe says; remove this source")
            continue
        if fs.isdir(match):
            if explicit:
                raise MurmurError(f"source {spec!r}: {match} is a folder; give a file or a glob such as "
                                  f"{pattern.rstrip('/')}/*.jsonl")
            continue
        files.append(SourceFile(fmt, Path(path), url=fs.unstrip_protocol(match)))
    if not files:
        raise MurmurError(f"source {spec!r}: no file matches {pattern!r}")
    return files


# -- X account archives -------------------------------------------------------------------------------------

# Direct messages are private whatever a recipe says: no source ever reads a file named like one.
_DIRECT_MESSAGES = re.compile(r"direct[-_]message", re.IGNORECASE)
_TWEETS_PART = re.compile(r"tweets(?:-part(\d+))?\.js")
NOTE_TWEETS = "note-tweet.js"
DELETED_TWEETS = "deleted-tweets.js"


def is_direct_messages(path: Path) -> bool:
    """Whether a file is one of an X archive's direct-message files (direct-messages.js, -group, headers...)."""
    return bool(_DIRECT_MESSAGES.match(path.name))


def _archive_data_folder(folder: Path) -> Path:
    """An archive's data folder: DIR/data when it exists (the unpacked download), else DIR itself."""
    return folder / "data" if (folder / "data").is_dir() else folder


def archive_tweet_files(folder: Path) -> list[Path]:
    """tweets.js then tweets-part1.js, tweets-part2.js, ... of an archive folder (X splits large archives)."""
    data = _archive_data_folder(folder)
    found = []
    for path in data.iterdir():
        match = _TWEETS_PART.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1) or 0), path))
    return [path for _, path in sorted(found)]


def _archive_source(path: Path) -> SourceFile:
    notes = path.parent / NOTE_TWEETS
    return SourceFile("x-archive", path, notes if notes.is_file() else None)


def archive_deletion_events(sources: list[SourceFile], max_depth: int) -> list:
    """`post:ID` deletion events for the tweets each archive's deleted-tweets.js lists: posts its owner deleted
    stay deleted, whatever else holds them. A deletion file that cannot be read stops the run (its posts
    could not be honoured)."""
    from murmur.data.compliance import DeletionEvent

    events, seen = [], set()
    for source in sources:
        if source.format != "x-archive":
            continue
        path = source.path.parent / DELETED_TWEETS
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        items = _archive_document(path.read_bytes(), max_depth)
        if items is None:
            raise MurmurError(f"{_printable_path(path)} is not a readable archive file (expected "
                              "window.YTD.deleted_tweets.part0 = [...]); its posts must stay deleted, so the run "
                              "stops: repair or re-download the archive")
        for item in items:
            tweet = item.get("tweet", item) if isinstance(item, dict) else None
            tweet_id = _str_id(tweet.get("id_str") or tweet.get("id")) if isinstance(tweet, dict) else None
            if tweet_id and not _has_surrogates(tweet_id):
                events.append(DeletionEvent("post", tweet_id))
    return events


def _archive_document(data: bytes, max_depth: int) -> list | None:
    """The array of an archive file (`window.YTD.NAME.part0 = [...]`), or None if it is not one."""
    start = data.find(b"[")
    if start < 0 or nests_deeper_than(data[start:], max_depth):
        return None
    try:
        items = json.loads(data[start:].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return items if isinstance(items, list) else None


def resolve_sources(specs: list[str]) -> list[SourceFile]:
    """Expand `FORMAT:PATH` specs (globs included) into files, failing before any work if one is missing."""
    if not specs:
        raise MurmurError("no sources given: pass --source FORMAT:PATH (e.g. --source chitchat: for the demo corpus)")
    files: list[SourceFile] = []
    for spec in specs:
        fmt, sep, pattern = spec.partition(":")
        if not sep or fmt not in FORMATS:
            raise MurmurError(f"source {spec!r} is not FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")
        if fmt == "chitchat" and not pattern:
            files.append(SourceFile(fmt, chitchat_path()))
            continue
        if not pattern:
            raise MurmurError(f"source {spec!r} has no path; write {fmt}:PATH")
        if is_url(pattern):
            files.extend(_resolve_url(spec, fmt, pattern))
            continue
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if glob.has_magic(pattern) \
            else [os.path.expanduser(pattern)]
        if fmt != "x-archive":  # an archive may be named by its folder
            matches = [m for m in matches if not os.path.isdir(m)] or matches
        if not matches:
            raise MurmurError(f"source {spec!r}: no file matches {pattern!r}")
        explicit = not glob.has_magic(pattern)
        for match in matches:
            path = Path(match)
            if is_direct_messages(path):
                if explicit:
                    raise MurmurError(f"source {spec!r}: direct messages are private and never read, whatever "
                                      "the recipe says; remove this source")
                continue  # a glob passes over them without a word
            if fmt == "x-archive" and path.is_dir():
                parts = archive_tweet_files(path)
                if not parts:
                    raise MurmurError(f"source {spec!r}: archive folder {path} holds no tweets.js (nor its data/ "
                                      "folder); give the unpacked archive's folder")
                files.extend(_archive_source(part) for part in parts)
                continue
            if fmt == "x-archive" and path.name in (NOTE_TWEETS, DELETED_TWEETS):
                if explicit:
                    raise MurmurError(f"source {spec!r}: {path.name} is read with the archive's tweets.js, not "
                                      "as posts; give the archive's folder or its tweets.js")
                continue
            if path.is_dir():
                raise MurmurError(f"source {spec!r}: {path} is a folder; give a file or a glob such as {path}/*.jsonl")
            if not path.is_file():
                raise MurmurError(f"source {spec!r}: file {path} not found")
            files.append(_archive_source(path) if fmt == "x-archive" else SourceFile(fmt, path))
    return files


class CountingFile(io.RawIOBase):
    """A read-only file that remembers how many (compressed) bytes were read, for the progress bar."""

    def __init__(self, path: Path | SourceFile):
        # Closed by close(), which the decompressor calls.
        self._file = path.open_raw() if isinstance(path, SourceFile) else open(path, "rb")  # noqa: SIM115
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.bytes_read += n or 0
        return n

    def seekable(self) -> bool:
        return self._file.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        super().close()


def open_binary(path: Path | SourceFile) -> tuple[io.BufferedIOBase, CountingFile]:
    """The decompressed byte stream of a file (plain, gzip or zstd; local, or remote for a SourceFile with a
    URL), and the counting raw file under it.

    Both decompressors produce output only as it is read, so a small file that expands to gigabytes costs no
    more memory than any other. Arrow's zstd reader (unlike zstandard's stream reader) reads every frame and
    raises on a stream cut short inside one.
    """
    raw = CountingFile(path)
    head = raw._file.read(4)
    raw._file.seek(0)
    buffered = io.BufferedReader(raw, 1 << 20)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb"), raw
    if head.startswith(ZSTD_MAGIC):
        return io.BufferedReader(pa.CompressedInputStream(buffered, "zstd"), 1 << 20), raw
    return buffered, raw


def skip_line(stream: io.BufferedIOBase) -> tuple[int, bool]:
    """Read past the rest of a line in bounded pieces: (how many double quotes it held, whether the stream
    ended). CSV needs the quotes: a line break inside a quoted field does not end the record."""
    quotes = 0
    while True:
        piece = stream.readline(SKIP_PIECE)
        quotes += piece.count(b'"')
        if not piece:
            return quotes, True
        if piece.endswith(b"\n"):
            return quotes, False


# JSON nesting, counted without parsing: escapes go first (so \" is no quote), then everything but quotes
# and brackets, then strings (brackets inside them are text); what is left are the brackets that nest.
_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_JSON_STRING = re.compile(rb'"[^"]*"')
_NOT_JSON_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_JSON_STEP = np.zeros(256, dtype=np.int8)
_JSON_STEP[list(b"[{")] = 1
_JSON_STEP[list(b"]}")] = -1
_DEPTH_CHUNK = 1 << 22


def nests_deeper_than(data: bytes, limit: int) -> bool:
    """Whether UTF-8 JSON text nests more than `limit` levels deep (json.loads recurses once per level, so a
    line of 30,000 brackets would end the run with RecursionError). Linear, in C and numpy; text with at most
    `limit` opening brackets in all, nearly every record, is answered by two counts."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    structure = _JSON_STRING.sub(b"", _JSON_ESCAPE.sub(b"", data).translate(None, _NOT_JSON_STRUCTURE))
    steps = _JSON_STEP[np.frombuffer(structure, dtype=np.uint8)]
    depth = 0
    for start in range(0, steps.size, _DEPTH_CHUNK):
        running = np.cumsum(steps[start:start + _DEPTH_CHUNK], dtype=np.int64) + depth
        if running.max() > limit:
            return True
        depth = int(running[-1])
    return False


class CsvRecordTooLarge(Exception):
    """A CSV record grew past the limit; the reader has already read past the rest of it."""

    def __init__(self, head: bytes):
        super().__init__("CSV record over max_record_bytes")
        self.head = head


class CsvLines:
    """The lines of a CSV byte stream, as csv.reader pulls them, with each record held to `limit` bytes.

    csv.reader takes one line at a time and returns a row at a line end outside quotes. This counts the bytes
    and double quotes handed out since the last row (`row_ended()` is called at each one); a record that grows
    past the limit is read past to its end (a line end after an even number of quotes) in bounded pieces, and
    CsvRecordTooLarge is raised; the reader then starts afresh at the next record. Line ends are \\n, \\r\\n or
    \\r, as a text file opened with newline="" would give them.
    """

    def __init__(self, stream: io.BufferedIOBase, limit: int):
        self._stream = stream
        self._limit = limit
        self._pieces: list[bytes] = []  # the rest of a line split at lone \r
        self.line_number = 0
        self._record_bytes = 0
        self._record_quotes = 0

    def __iter__(self) -> CsvLines:
        return self

    def row_ended(self) -> None:
        self._record_bytes = self._record_quotes = 0

    def __next__(self) -> str:
        if self._pieces:
            line = self._pieces.pop(0)
        else:
            budget = self._limit - self._record_bytes
            line = self._stream.readline(budget + 1)
            if not line:
                raise StopIteration
            if len(line) > budget:
                self._skip_record(line)
            if b"\r" in line[:-1]:
                self._pieces = line.splitlines(keepends=True)
                line = self._pieces.pop(0)
        self.line_number += 1
        self._record_bytes += len(line)
        self._record_quotes += line.count(b'"')
        return line.decode("utf-8", "surrogateescape")

    def _skip_record(self, head: bytes) -> None:
        quotes = self._record_quotes + head.count(b'"')
        ended = False
        if not head.endswith(b"\n"):
            more, ended = skip_line(self._stream)
            quotes += more
        self.line_number += 1
        while quotes % 2 and not ended:  # inside a quoted field: the record goes on past this line
            more, ended = skip_line(self._stream)
            quotes += more
            self.line_number += 1
        self.row_ended()
        raise CsvRecordTooLarge(head)


class FileReader:
    """Reads one source file into records; `bytes_read` follows its progress through the (compressed) file."""

    def __init__(self, source: SourceFile, settings: DataSettings):
        self.source = source
        self.settings = settings
        self._raw: CountingFile | None = None
        self._document: tuple[int, int] | None = None  # (records yielded, records) of a one-document file

    @property
    def bytes_read(self) -> int:
        """How far through the file the reader is, in bytes (estimated from records for one-document files)."""
        if self._document is not None:
            done, total = self._document
            return self.source.size() * done // max(1, total)
        return self._raw.bytes_read if self._raw else 0

    def records(self) -> Iterator[Record]:
        reader = {"x-api": self._x_api, "x-archive": self._x_archive, "jsonl": self._jsonl, "csv": self._csv,
                  "parquet": self._parquet, "text": self._text, "chitchat": self._chitchat}[self.source.format]
        yield from reader()

    # -- helpers -------------------------------------------------------------------------------------------

    def _bad(self, line: int | None, reason: str, raw: bytes | str = b"", record_id: str | None = None) -> Quarantined:
        snippet_chars = self.settings.quarantine_snippet_chars
        if isinstance(raw, str):  # it may hold lone surrogates, which no Parquet file can
            raw = raw[:snippet_chars].encode("utf-8", "replace")
        raw = raw[: snippet_chars * 4].decode("utf-8", "replace")[:snippet_chars]
        if record_id is not None and _has_surrogates(record_id):
            record_id = None
        return Quarantined(self.source.label, line, reason, raw, record_id)

    def _lines(self) -> Iterator[tuple[int, bytes | Quarantined]]:
        """Numbered raw lines, none longer than max_record_bytes + 1 bytes (a longer line is cut there, so that
        it reads as too large, and the rest of it is skipped); a truncated or corrupt compressed stream ends
        with a quarantined record."""
        stream, self._raw = open_binary(self.source)
        limit = self.settings.max_record_bytes
        number, cut = self.source.first_line - 1, False
        start, end = self.source.start, self.source.end
        try:
            if start > 0:  # a range starts at the first line that starts at or after its first byte
                stream.seek(start - 1)
                skip_line(stream)
            while True:
                try:
                    if cut:
                        skip_line(stream)
                    if end is not None and stream.tell() >= end:
                        return
                    line = stream.readline(limit + 1)
                except STREAM_ERRORS as err:  # a truncated or corrupt gzip/zstd stream
                    yield number + 1, self._bad(number + 1, "truncated_or_corrupt_file", str(err))
                    return
                if not line:
                    return
                cut = len(line) > limit and not line.endswith(b"\n")
                number += 1
                yield number, line
        finally:
            stream.close()
            self._raw.close()

    def _read_all(self) -> bytes | Quarantined:
        """The whole decompressed file, for the formats that are one JSON document."""
        stream, self._raw = open_binary(self.source)
        try:
            return stream.read()
        except STREAM_ERRORS as err:
            return self._bad(1, "truncated_or_corrupt_file", str(err))
        finally:
            stream.close()
            self._raw.close()

    def _decode_line(self, number: int, line: bytes) -> str | Quarantined | None:
        if len(line) > self.settings.max_record_bytes:
            return self._bad(number, "too_large", line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad(number, "invalid_utf8", line)
        return text if text.strip() else None

    def _parse_json(self, number: int, raw: bytes, text: str | None = None):
        """The JSON value of `raw` (UTF-8; `text` when already decoded), or why it has none."""
        if text is None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return self._bad(number, "invalid_utf8", raw)
        if nests_deeper_than(raw, self.settings.max_json_depth):
            return self._bad(number, f"too_deep: nested more than data.max_json_depth="
                                     f"{self.settings.max_json_depth} levels", raw)
        try:
            return json.loads(text)
        except ValueError as err:  # malformed, or a number of more than 4300 digits
            return self._bad(number, f"malformed_json: {getattr(err, 'msg', err)}", text)

    def _json_lines(self, lines) -> Iterator[tuple[int, object]]:
        for number, line in lines:
            if isinstance(line, Quarantined):
                yield number, line
                continue
            text = self._decode_line(number, line)
            if text is None or isinstance(text, Quarantined):
                if text is not None:
                    yield number, text
                continue
            yield number, self._parse_json(number, line, text)

    def _finished(self, number: int, post: Post) -> Record:
        """The post, or why it cannot be used: text no UTF-8 encoder takes (a JSON "\\ud800" escape), or too
        much of it."""
        fields = (post.id, post.author_id, post.text, post.lang or "", post.conversation_id or "",
                  post.in_reply_to_id or "", post.quoted_id or "", post.retweet_of_id or "")
        # One join and one look at it for nearly every post: all-ASCII text holds no surrogate.
        if not "".join(fields).isascii() and any(map(_has_surrogates, fields)):
            return self._bad(number, "invalid_utf8: a lone surrogate escape", post.text, post.id)
        if len(post.text) > self.settings.max_record_bytes:
            return self._bad(number, "too_large", post.text, post.id)
        return post

    # -- X API v2 ------------------------------------------------------------------------------------------

    def _x_api(self) -> Iterator[Record]:
        if self._is_one_document():
            whole = self._read_all()
            if isinstance(whole, Quarantined):
                yield whole
                return
            document = self._parse_json(1, whole)
            if not isinstance(document, Quarantined):
                yield from self._x_api_document(1, document)
                return
            if not document.reason.startswith("malformed_json"):
                yield document  # too deep or not UTF-8: no line of it would read either
                return
            # Not one document after all: read it line by line.
        for number, obj in self._json_lines(self._lines()):
            if isinstance(obj, Quarantined):
                yield obj
            else:
                yield from self._x_api_document(number, obj)

    def _is_one_document(self) -> bool:
        """Whether the file is a pretty-printed envelope: its first line is the start of JSON, not all of it."""
        lines = self._lines()
        try:
            for number, line in lines:
                if isinstance(line, Quarantined):
                    return False
                text = self._decode_line(number, line)
                if text is None:
                    continue
                if isinstance(text, Quarantined):
                    return False
                value = self._parse_json(number, line, text)
                return isinstance(value, Quarantined) and value.reason.startswith("malformed_json")
            return False
        finally:
            lines.close()

    def _x_api_document(self, number: int, document) -> Iterator[Record]:
        if isinstance(document, list):
            for item in document:
                yield from self._x_api_document(number, item)
            return
        if not isinstance(document, dict):
            yield self._bad(number, "not_a_json_object", json.dumps(document)[:1000])
            return
        if "data" in document or "includes" in document:
            data = document.get("data") or []
            includes = document.get("includes")
            tweets = (data if isinstance(data, list) else [data]) + \
                _list(includes.get("tweets") if isinstance(includes, dict) else None)
            for tweet in tweets:
                yield self._x_api_tweet(number, tweet)
            return
        yield self._x_api_tweet(number, document)

    def _x_api_tweet(self, number: int, tweet) -> Record:
        if not isinstance(tweet, dict):
            return self._bad(number, "not_a_json_object", json.dumps(tweet)[:1000])
        tweet_id = _str_id(tweet.get("id"))
        note = tweet.get("note_tweet") or {}
        text = note.get("text") if isinstance(note, dict) and note.get("text") else tweet.get("text")
        entities = (note.get("entities") if isinstance(note, dict) and note.get("text") else None) \
            or tweet.get("entities") or {}
        if not tweet_id:
            return self._bad(number, "no_id", json.dumps(tweet)[:1000])
        if not isinstance(text, str) or not text.strip():
            return self._bad(number, "no_text", json.dumps(tweet)[:1000], tweet_id)
        post = Post(id=tweet_id, author_id=_str_id(tweet.get("author_id")) or "unknown", text=text,
                    source=self.source.label, line=number, created_at=_parse_time(tweet.get("created_at")),
                    lang=_str_or_none(tweet.get("lang")), conversation_id=_str_id(tweet.get("conversation_id")))
        for ref in _list(tweet.get("referenced_tweets")):
            if not isinstance(ref, dict):
                continue
            kind, ref_id = ref.get("type"), _str_id(ref.get("id"))
            if kind == "replied_to":
                post.in_reply_to_id = ref_id
            elif kind == "quoted":
                post.quoted_id = ref_id
            elif kind == "retweeted":
                post.retweet_of_id = ref_id
        if isinstance(entities, dict):
            post.mentions = [(*span, _hint(m.get("username"))) for m in _list(entities.get("mentions"))
                             if (span := _api_span(m))]
            post.urls = [(*span, _hint(u.get("expanded_url")) or _hint(u.get("url")))
                         for u in _list(entities.get("urls")) if (span := _api_span(u))]
        return self._finished(number, post)

    # -- X account archive ----------------------------------------------------------------------------------

    def _x_archive(self) -> Iterator[Record]:
        whole = self._read_all()
        if isinstance(whole, Quarantined):
            yield whole
            return
        start = whole.find(b"[")  # after 'window.YTD.tweets.part0 = '
        whole = whole[start:] if start >= 0 else whole
        items = self._parse_json(1, whole) if start >= 0 else None
        if isinstance(items, Quarantined):
            yield items
            return
        if not isinstance(items, list):
            yield self._bad(1, "not_an_archive: expected window.YTD.tweets.part0 = [...]", whole)
            return
        author = self.settings.archive_author_id or _archive_owner(self.source.path, self.settings.max_json_depth)
        notes = self._archive_notes()
        for index, item in enumerate(items, start=1):
            self._document = (index, len(items))
            tweet = item.get("tweet", item) if isinstance(item, dict) else None
            if not isinstance(tweet, dict):
                yield self._bad(index, "not_a_json_object", json.dumps(item)[:1000])
                continue
            tweet_id = _str_id(tweet.get("id_str") or tweet.get("id"))
            body = tweet.get("full_text") or tweet.get("text")
            if not tweet_id:
                yield self._bad(index, "no_id", json.dumps(tweet)[:1000])
                continue
            if not isinstance(body, str) or not body.strip():
                yield self._bad(index, "no_text", json.dumps(tweet)[:1000], tweet_id)
                continue
            created_at = _parse_time(tweet.get("created_at"))
            full = _note_text(notes, tweet_id, created_at, body)
            if full is not None:
                body, entities_ok = full, False  # the short text's entity offsets do not fit the note's text
            else:
                entities_ok = True
            post = Post(id=tweet_id, author_id=author, text=body, source=self.source.label, line=index,
                        created_at=created_at, lang=_str_or_none(tweet.get("lang")),
                        in_reply_to_id=_str_id(tweet.get("in_reply_to_status_id_str")
                                               or tweet.get("in_reply_to_status_id")))
            if body.startswith("RT @"):
                post.retweet_of_id = ""  # the archive does not name the original
            entities = tweet.get("entities") if entities_ok else None
            if isinstance(entities, dict):
                post.mentions = [(*span, _hint(m.get("screen_name"))) for m in _list(entities.get("user_mentions"))
                                 if (span := _archive_span(m))]
                post.urls = [(*span, _hint(u.get("expanded_url")) or _hint(u.get("url")))
                             for u in _list(entities.get("urls")) if (span := _archive_span(u))]
            yield self._finished(index, post)

    def _archive_notes(self) -> dict:
        """The archive's long posts from note-tweet.js, by note id and by creation time ({} without one).
        An unreadable note file leaves the short texts in place."""
        if self.source.notes is None:
            return {}
        try:
            data = self.source.notes.read_bytes()
        except OSError:
            return {}
        items = _archive_document(data, self.settings.max_json_depth) or []
        notes: dict = {}
        for item in items:
            note = item.get("noteTweet") if isinstance(item, dict) else None
            core = note.get("core") if isinstance(note, dict) else None
            text = core.get("text") if isinstance(core, dict) else None
            if not isinstance(text, str) or not text.strip() or _has_surrogates(text):
                continue
            note_id = _str_id(note.get("noteTweetId"))
            if note_id:
                notes[("id", note_id)] = text
            created = _parse_time(note.get("createdAt"))
            if created is not None:
                notes.setdefault(("time", created), []).append(text)
        return notes

    # -- generic tables -------------------------------------------------------------------------------------

    def _mapped(self, number: int, row: dict, raw: str) -> Record:
        values = {}
        for name, candidates in DEFAULT_COLUMNS.items():
            explicit = self.settings.columns.get(name)
            for column in ([explicit, *candidates] if explicit else candidates):
                if column in row and row[column] not in (None, ""):
                    values[name] = row[column]
                    break
        text = values.get("text")
        record_id = _str_id(values.get("id")) or f"{self.source.name}:{number}"
        if not isinstance(text, str) or not text.strip():
            return self._bad(number, "no_text", raw, record_id)
        post = Post(id=record_id, author_id=_str_id(values.get("author_id")) or "unknown", text=text,
                    source=self.source.label, line=number, created_at=_parse_time(values.get("created_at")),
                    lang=_str_or_none(values.get("lang")),
                    conversation_id=_str_id(values.get("conversation_id")),
                    in_reply_to_id=_str_id(values.get("in_reply_to_id")))
        return self._finished(number, post)

    def _jsonl(self) -> Iterator[Record]:
        for number, obj in self._json_lines(self._lines()):
            if isinstance(obj, Quarantined):
                yield obj
            elif not isinstance(obj, dict):
                yield self._bad(number, "not_a_json_object", json.dumps(obj)[:1000])
            else:
                yield self._mapped(number, obj, json.dumps(obj)[:1000])

    def _csv(self) -> Iterator[Record]:
        """Rows under the header row; a record over max_record_bytes (one field or many, on one line or many)
        is quarantined and read past in bounded memory, and the rows after it are read as usual."""
        stream, self._raw = open_binary(self.source)
        lines = CsvLines(stream, self.settings.max_record_bytes)
        csv.field_size_limit(max(self.settings.max_record_bytes * 4, 131072))  # CsvLines stops records first
        reader = csv.reader(lines)
        header: list[str] | None = None
        try:
            while True:
                try:
                    values = next(reader)
                except StopIteration:
                    return
                except CsvRecordTooLarge as big:
                    problem = self._bad(lines.line_number, "too_large", big.head)
                except csv.Error as err:
                    lines.row_ended()
                    problem = self._bad(lines.line_number, f"malformed_csv: {err}")
                except STREAM_ERRORS as err:
                    yield self._bad(lines.line_number + 1, "truncated_or_corrupt_file", str(err))
                    return
                else:
                    lines.row_ended()
                    problem = None
                if header is None:
                    if problem is not None:  # without a header no row can be read: the file is one bad record
                        yield self._bad(problem.line, f"unreadable_csv_header: {problem.reason}", problem.raw)
                        return
                    if values:
                        header = values
                    continue
                if problem is not None:
                    yield problem
                    continue
                if not values:
                    continue  # a blank line is not a record
                number = lines.line_number
                raw = ",".join(values)
                if any(_has_surrogates(v) for v in values):
                    yield self._bad(number, "invalid_utf8", raw.encode("utf-8", "replace"))
                    continue
                yield self._mapped(number, dict(zip(header, values)), raw)
        finally:
            stream.close()
            self._raw.close()

    def _parquet(self) -> Iterator[Record]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.source.open_raw())
            batches = parquet.iter_batches(batch_size=self.settings.batch_size)
        except (pa.ArrowException, OSError, ValueError) as err:  # a damaged or non-Parquet file (or undecodable names)
            yield self._bad(None, f"unreadable_parquet: {err}")
            return
        number = 0
        while True:
            try:
                rows = next(batches).to_pylist()
            except StopIteration:
                return
            except (pa.ArrowException, OSError, ValueError) as err:  # a damaged page: its rows are lost
                yield self._bad(number + 1, f"unreadable_parquet: {err}")
                return
            for row in rows:
                number += 1
                yield self._mapped(number, row, json.dumps(row, default=str)[:1000])

    def _text(self) -> Iterator[Record]:
        for number, line in self._lines():
            if isinstance(line, Quarantined):
                yield line
                continue
            text = self._decode_line(number, line)
            if text is None:
                continue  # blank lines separate nothing: they are not records
            if isinstance(text, Quarantined):
                yield text
                continue
            yield Post(id=f"{self.source.name}:{number}", author_id="unknown", text=text.rstrip("\r\n"),
                       source=self.source.label, line=number)

    # -- chitchat-dataset demo corpus ----------------------------------------------------------------------

    def _chitchat(self) -> Iterator[Record]:
        whole = self._read_all()
        if isinstance(whole, Quarantined):
            yield whole
            return
        corpus = self._parse_json(1, whole)
        del whole
        if isinstance(corpus, Quarantined):
            yield corpus
            return
        if not isinstance(corpus, dict):
            yield self._bad(1, "not_a_chitchat_corpus: expected an object of conversations", json.dumps(corpus)[:1000])
            return
        number = 0
        for position, (conversation_id, conversation) in enumerate(corpus.items(), start=1):
            self._document = (position, len(corpus))
            previous = None
            if not isinstance(conversation, dict):
                number += 1
                yield self._bad(number, "not_a_json_object", json.dumps(conversation)[:1000])
                continue
            for turn_index, turn in enumerate(_list(conversation.get("messages"))):
                number += 1
                post_id = f"{conversation_id}-{turn_index}"
                utterances = [u for u in _list(turn) if isinstance(u, dict) and isinstance(u.get("text"), str)]
                text = "\n".join(u["text"] for u in utterances).strip()
                if not utterances or not text:
                    yield self._bad(number, "no_text", json.dumps(turn)[:1000], post_id)
                    continue
                yield self._finished(number, Post(
                    id=post_id, author_id=_str_id(utterances[0].get("sender")) or "unknown", text=text,
                    source=self.source.label, line=number, created_at=_parse_time(utterances[0].get("timestamp")),
                    conversation_id=conversation_id, in_reply_to_id=previous))
                previous = post_id


def _printable_path(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "replace")


def _list(value) -> list:
    """A JSON array, or nothing: a string or a number where a list belongs holds no items."""
    return value if type(value) is list else []


def _offset(value) -> int | None:
    """An entity offset: a JSON integer, or a string of ASCII digits ('٣', '+1', ' 3' and 5,000 digits are not)."""
    if type(value) is str and 0 < len(value) <= 10 and value.isascii() and value.isdigit():
        value = int(value)
    return value if type(value) is int and 0 <= value <= MAX_OFFSET else None  # not bool: its type is bool


def _api_span(entity) -> tuple[int, int] | None:
    if type(entity) is not dict:
        return None
    start, end = _offset(entity.get("start")), _offset(entity.get("end"))
    return (start, end) if start is not None and end is not None else None


def _archive_span(entity) -> tuple[int, int] | None:
    indices = entity.get("indices") if isinstance(entity, dict) else None
    if not isinstance(indices, list) or len(indices) != 2:
        return None
    start, end = _offset(indices[0]), _offset(indices[1])
    return (start, end) if start is not None and end is not None else None


def _hint(value) -> str:
    """An entity's handle or URL: text that can be written, else nothing."""
    return value if isinstance(value, str) and not _has_surrogates(value) else ""


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) and value else None


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _str_id(value) -> str | None:
    """Ids as strings: strings, and integers converted exactly; floats (which lost digits), booleans, lists and
    objects are no ids."""
    kind = type(value)  # exact types: a bool is an int to isinstance
    if kind is str:
        return value.strip() or None
    return str(value) if kind is int else None


def _parse_time(value) -> datetime | None:
    """ISO 8601, the archive's 'Wed Oct 10 20:19:24 +0000 2018', or epoch seconds; None if unreadable."""
    if value is None or value == "" or isinstance(value, bool) or not isinstance(value, (str, int, float, datetime)):
        return None
    try:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, (int, float)):
            moment = datetime.fromtimestamp(value / 1000 if value > 1e11 else value, tz=UTC)
        else:
            text = value.strip()
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                moment = parsedate_to_datetime(text) if "," in text else datetime.strptime(text, "%a %b %d %H:%M:%S %z %Y")
    except (ValueError, TypeError, OverflowError, OSError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # a time at the very edge of the calendar
        return None


_TRUNCATION = re.compile(r"(?:\s*https://t\.co/\w+)+\s*$|\s*(?:…|\.\.\.)\s*$")


def _note_text(notes: dict, tweet_id: str, created_at: datetime | None, body: str) -> str | None:
    """The full text of a long post, when note-tweet.js has it: the note with the tweet's id, else the note
    created at the same instant whose text begins as the tweet's truncated text does (tweets.js keeps the
    first 280 characters, an ellipsis and a link)."""
    if ("id", tweet_id) in notes:
        return notes[("id", tweet_id)]
    if created_at is None:
        return None
    prefix = body
    while (shorter := _TRUNCATION.sub("", prefix)) != prefix:
        prefix = shorter
    prefix = " ".join(prefix.split())
    for text in notes.get(("time", created_at), []):
        if prefix and " ".join(text.split()).startswith(prefix):
            return text
    return None


def _archive_owner(path: Path, max_depth: int) -> str:
    """The account id of an archive: from account.js beside tweets.js, else the archive's folder name."""
    account = path.parent / "account.js"
    if account.is_file():
        try:
            data = account.read_bytes()
            data = data[data.find(b"["):]
            if not nests_deeper_than(data, max_depth):
                owner = _str_id(json.loads(data.decode("utf-8"))[0]["account"]["accountId"])
                if owner and not _has_surrogates(owner):
                    return owner
        except (ValueError, KeyError, IndexError, TypeError):
            pass
    return path.parent.name or "archive"


__all__ = ["FileReader", "Record", "SourceFile", "archive_deletion_events", "archive_tweet_files", "chitchat_path",
           "is_direct_messages", "nests_deeper_than", "open_binary", "resolve_sources"]
