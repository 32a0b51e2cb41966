"""Readers for every input format. Each yields `Post` or `Quarantined` records, one per input record, so that
the pipeline can account for everything it read.

A source is `FORMAT:PATH`; PATH may be a glob, and files may be gzip- or zstd-compressed (detected by their
magic bytes, not their names). Missing files are reported before any work starts.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

import zstandard

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
# What reading a damaged compressed file raises (zstandard's error is not an OSError).
STREAM_ERRORS = (EOFError, OSError, ValueError, zstandard.ZstdError)


def chitchat_path() -> Path:
    """The corpus file shipped inside the chitchat-dataset package."""
    try:
        import chitchat_dataset
    except ImportError:
        raise MurmurError("source 'chitchat:' needs the chitchat-dataset package: pip install chitchat-dataset") from None
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


@dataclass
class SourceFile:
    """One input file and the format it is read as."""

    format: str
    path: Path

    @property
    def label(self) -> str:
        return f"{self.format}:{self.path}"

    def size(self) -> int:
        return self.path.stat().st_size


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
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if glob.has_magic(pattern) \
            else [os.path.expanduser(pattern)]
        matches = [m for m in matches if not os.path.isdir(m)] or matches
        if not matches:
            raise MurmurError(f"source {spec!r}: no file matches {pattern!r}")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                raise MurmurError(f"source {spec!r}: {path} is a folder; give a file or a glob such as {path}/*.jsonl")
            if not path.is_file():
                raise MurmurError(f"source {spec!r}: file {path} not found")
            files.append(SourceFile(fmt, path))
    return files


class CountingFile(io.RawIOBase):
    """A read-only file that remembers how many (compressed) bytes were read, for the progress bar."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), which the decompressor calls
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.bytes_read += n or 0
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


class ZstdFrames(io.RawIOBase):
    """Decompresses every zstd frame of a stream, and raises EOFError when the last frame is cut short
    (zstandard's own stream reader returns a truncated file's readable part, or nothing, without a word)."""

    def __init__(self, source: io.BufferedIOBase):
        self._source = source
        self._decompressor = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._source.read(1 << 16)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its frame")
                return 0
            while chunk:
                self._in_frame = True
                self._pending += self._decompressor.decompress(chunk)
                if not self._decompressor.eof:
                    break
                # A frame ended: whatever follows is the next frame.
                chunk = self._decompressor.unused_data
                self._decompressor = zstandard.ZstdDecompressor().decompressobj()
                self._in_frame = False
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._source.close()
        super().close()


def open_binary(path: Path) -> tuple[io.BufferedIOBase, CountingFile]:
    """The decompressed byte stream of a file (plain, gzip or zstd), and the counting raw file under it."""
    with open(path, "rb") as probe:
        head = probe.read(4)
    raw = CountingFile(path)
    buffered = io.BufferedReader(raw, 1 << 20)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb"), raw
    if head.startswith(ZSTD_MAGIC):
        return io.BufferedReader(ZstdFrames(buffered), 1 << 20), raw
    return buffered, raw


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
        if isinstance(raw, bytes):
            raw = raw[: self.settings.quarantine_snippet_chars * 4].decode("utf-8", "replace")
        return Quarantined(self.source.label, line, reason, raw[: self.settings.quarantine_snippet_chars], record_id)

    def _lines(self) -> Iterator[tuple[int, bytes | Quarantined]]:
        """Numbered raw lines; a truncated or corrupt compressed stream ends with a quarantined record."""
        stream, self._raw = open_binary(self.source.path)
        number = 0
        try:
            while True:
                try:
                    line = stream.readline()
                except STREAM_ERRORS as err:  # a truncated or corrupt gzip/zstd stream
                    yield number + 1, self._bad(number + 1, "truncated_or_corrupt_file", str(err))
                    return
                if not line:
                    return
                number += 1
                yield number, line
        finally:
            stream.close()

    def _read_all(self) -> bytes | Quarantined:
        chunks = []
        for _, line in self._lines():
            if isinstance(line, Quarantined):
                return line
            chunks.append(line)
        return b"".join(chunks)

    def _decode_line(self, number: int, line: bytes) -> str | Quarantined | None:
        if len(line) > self.settings.max_record_bytes:
            return self._bad(number, "too_large", line)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad(number, "invalid_utf8", line)
        return text if text.strip() else None

    def _json_lines(self, lines) -> Iterator[tuple[int, dict | list | Quarantined]]:
        for number, line in lines:
            if isinstance(line, Quarantined):
                yield number, line
                continue
            text = self._decode_line(number, line)
            if text is None or isinstance(text, Quarantined):
                if text is not None:
                    yield number, text
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as err:
                yield number, self._bad(number, f"malformed_json: {err.msg}", text)

    def _check_size(self, number: int, post: Post) -> Record:
        if len(post.text) > self.settings.max_record_bytes:
            return self._bad(number, "too_large", post.text, post.id)
        return post

    # -- X API v2 ------------------------------------------------------------------------------------------

    def _x_api(self) -> Iterator[Record]:
        lines = self._lines()
        buffered: list = []
        for number, line in lines:
            buffered.append((number, line))
            if isinstance(line, Quarantined) or line.strip():
                break
        first = buffered[-1][1] if buffered else b""
        looks_jsonl = isinstance(first, bytes) and _parses_as_object(first)
        if not looks_jsonl and buffered:
            # A pretty-printed envelope: parse the whole file; if that fails, fall back to lines.
            rest = list(lines)
            whole = b"".join(l for _, l in buffered + rest if isinstance(l, bytes))
            try:
                document = json.loads(whole.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                document = None
            if document is not None:
                yield from self._x_api_document(1, document)
                return
            lines_iter = iter(buffered + rest)
        else:
            lines_iter = itertools.chain(buffered, lines)
        for number, obj in self._json_lines(lines_iter):
            if isinstance(obj, Quarantined):
                yield obj
            else:
                yield from self._x_api_document(number, obj)

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
            tweets = (data if isinstance(data, list) else [data]) + list((document.get("includes") or {}).get("tweets") or [])
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
                    lang=tweet.get("lang") or None, conversation_id=_str_id(tweet.get("conversation_id")))
        for ref in tweet.get("referenced_tweets") or []:
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
            post.mentions = [(m["start"], m["end"], m.get("username", "")) for m in entities.get("mentions") or []
                             if _has_span(m)]
            post.urls = [(u["start"], u["end"], u.get("expanded_url") or u.get("url") or "")
                         for u in entities.get("urls") or [] if _has_span(u)]
        return self._check_size(number, post)

    # -- X account archive ----------------------------------------------------------------------------------

    def _x_archive(self) -> Iterator[Record]:
        whole = self._read_all()
        if isinstance(whole, Quarantined):
            yield whole
            return
        try:
            text = whole.decode("utf-8")
        except UnicodeDecodeError:
            yield self._bad(1, "invalid_utf8", whole)
            return
        start = text.find("[")
        try:
            items = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError as err:
            yield self._bad(1, f"malformed_json: {err.msg}", text)
            return
        if not isinstance(items, list):
            yield self._bad(1, "not_an_archive: expected window.YTD.tweets.part0 = [...]", text)
            return
        author = self.settings.archive_author_id or _archive_owner(self.source.path)
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
            post = Post(id=tweet_id, author_id=author, text=body, source=self.source.label, line=index,
                        created_at=_parse_time(tweet.get("created_at")), lang=tweet.get("lang") or None,
                        in_reply_to_id=_str_id(tweet.get("in_reply_to_status_id_str")
                                               or tweet.get("in_reply_to_status_id")))
            if body.startswith("RT @"):
                post.retweet_of_id = ""  # the archive does not name the original
            entities = tweet.get("entities") or {}
            post.mentions = [(int(m["indices"][0]), int(m["indices"][1]), m.get("screen_name", ""))
                             for m in entities.get("user_mentions") or [] if _has_indices(m)]
            post.urls = [(int(u["indices"][0]), int(u["indices"][1]), u.get("expanded_url") or u.get("url") or "")
                         for u in entities.get("urls") or [] if _has_indices(u)]
            yield self._check_size(index, post)

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
        record_id = _str_id(values.get("id")) or f"{self.source.path.name}:{number}"
        if not isinstance(text, str) or not text.strip():
            return self._bad(number, "no_text", raw, record_id)
        post = Post(id=record_id, author_id=_str_id(values.get("author_id")) or "unknown", text=text,
                    source=self.source.label, line=number, created_at=_parse_time(values.get("created_at")),
                    lang=values.get("lang") if isinstance(values.get("lang"), str) else None,
                    conversation_id=_str_id(values.get("conversation_id")),
                    in_reply_to_id=_str_id(values.get("in_reply_to_id")))
        return self._check_size(number, post)

    def _jsonl(self) -> Iterator[Record]:
        for number, obj in self._json_lines(self._lines()):
            if isinstance(obj, Quarantined):
                yield obj
            elif not isinstance(obj, dict):
                yield self._bad(number, "not_a_json_object", json.dumps(obj)[:1000])
            else:
                yield self._mapped(number, obj, json.dumps(obj)[:1000])

    def _csv(self) -> Iterator[Record]:
        stream, self._raw = open_binary(self.source.path)
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
        csv.field_size_limit(max(self.settings.max_record_bytes * 4, 131072))
        reader = csv.DictReader(text)
        try:
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except (*STREAM_ERRORS, csv.Error) as err:
                    yield self._bad(reader.line_num + 1, "truncated_or_corrupt_file", str(err))
                    return
                number = reader.line_num
                raw = ",".join(str(v) for v in row.values())
                if any(isinstance(v, str) and _has_surrogates(v) for v in row.values()):
                    yield self._bad(number, "invalid_utf8", raw.encode("utf-8", "replace"))
                    continue
                if len(raw) > self.settings.max_record_bytes:
                    yield self._bad(number, "too_large", raw)
                    continue
                yield self._mapped(number, row, raw)
        finally:
            text.close()

    def _parquet(self) -> Iterator[Record]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.source.path)
        except (pa.ArrowException, OSError) as err:  # a damaged or non-Parquet file
            yield self._bad(None, f"unreadable_parquet: {err}")
            return
        number = 0
        for batch in parquet.iter_batches(batch_size=self.settings.batch_size):
            for row in batch.to_pylist():
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
            yield Post(id=f"{self.source.path.name}:{number}", author_id="unknown", text=text.rstrip("\r\n"),
                       source=self.source.label, line=number)

    # -- chitchat-dataset demo corpus ----------------------------------------------------------------------

    def _chitchat(self) -> Iterator[Record]:
        whole = self._read_all()
        if isinstance(whole, Quarantined):
            yield whole
            return
        try:
            corpus = json.loads(whole)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            yield self._bad(1, f"malformed_json: {err}", whole)
            return
        del whole
        number = 0
        for position, (conversation_id, conversation) in enumerate(corpus.items(), start=1):
            self._document = (position, len(corpus))
            previous = None
            for turn_index, turn in enumerate(conversation.get("messages") or []):
                number += 1
                post_id = f"{conversation_id}-{turn_index}"
                utterances = [u for u in turn if isinstance(u, dict)]
                text = "\n".join(u.get("text") or "" for u in utterances).strip()
                if not utterances or not text:
                    yield self._bad(number, "no_text", json.dumps(turn)[:1000], post_id)
                    continue
                yield Post(id=post_id, author_id=str(utterances[0].get("sender") or "unknown"), text=text,
                           source=self.source.label, line=number,
                           created_at=_parse_time(utterances[0].get("timestamp")),
                           conversation_id=conversation_id, in_reply_to_id=previous)
                previous = post_id


def _parses_as_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _has_span(entity) -> bool:
    return isinstance(entity, dict) and isinstance(entity.get("start"), int) and isinstance(entity.get("end"), int)


def _has_indices(entity) -> bool:
    indices = entity.get("indices") if isinstance(entity, dict) else None
    return isinstance(indices, list) and len(indices) == 2 and all(str(i).isdigit() for i in indices)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _str_id(value) -> str | None:
    """Ids as strings; ints are converted exactly, floats (which lost digits) are refused."""
    if value is None or isinstance(value, (float, bool)):
        return None
    text = str(value).strip()
    return text or None


def _parse_time(value) -> datetime | None:
    """ISO 8601, the archive's 'Wed Oct 10 20:19:24 +0000 2018', or epoch seconds; None if unreadable."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, (int, float)):
            moment = datetime.fromtimestamp(value / 1000 if value > 1e11 else value, tz=UTC)
        else:
            text = str(value).strip()
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                moment = parsedate_to_datetime(text) if "," in text else datetime.strptime(text, "%a %b %d %H:%M:%S %z %Y")
    except (ValueError, TypeError, OverflowError, OSError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _archive_owner(path: Path) -> str:
    """The account id of an archive: from account.js beside tweets.js, else the archive's folder name."""
    account = path.parent / "account.js"
    if account.is_file():
        try:
            text = account.read_text(encoding="utf-8")
            items = json.loads(text[text.find("["):])
            return str(items[0]["account"]["accountId"])
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
            pass
    return path.parent.name or "archive"


__all__ = ["FileReader", "Record", "SourceFile", "chitchat_path", "open_binary", "resolve_sources"]
