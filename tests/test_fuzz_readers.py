"""Property-based fuzzing of every reader (issue #13): random bytes, truncated and mutated valid files, deep
nesting, mixed encodings and JSON of every shape, plain or compressed. Whatever the input, reading never
raises, every record is a usable post or a quarantined one, the batch step accepts them all, and
in = kept + dropped + quarantined."""

import copy
import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from murmur.data import pipeline
from murmur.data.batch import BatchProcessor
from murmur.data.records import QUARANTINE_SCHEMA, Post, Quarantined
from murmur.data.sources import FileReader, SourceFile
from murmur.settings.data import DataSettings

FORMATS = ["x-api", "x-archive", "jsonl", "csv", "parquet", "text", "chitchat"]
# The defaults, and limits so small that short inputs cross them (over-long lines, CSV records, nesting).
DEFAULT = DataSettings(workers=1)
TINY = DataSettings(workers=1, max_record_bytes=160, max_json_depth=3, quarantine_snippet_chars=10)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])

TWEETS = [
    {"id": "1", "text": "hello there @bob see https://t.co/x now", "author_id": "a", "lang": "en",
     "created_at": "2024-01-01T00:00:00.000Z", "conversation_id": "1",
     "entities": {"mentions": [{"start": 12, "end": 16, "username": "bob"}],
                  "urls": [{"start": 21, "end": 35, "expanded_url": "https://example.com/a"}]}},
    {"id": "2", "text": "@a a reply with a café and ünïcödé", "author_id": "b", "conversation_id": "1",
     "referenced_tweets": [{"type": "replied_to", "id": "1"}], "note_tweet": {"text": "a longer note"}},
    {"id": "3", "text": "mail jane@example.com or call +44 20 7946 0958", "author_id": "c"},
]


def valid_file(fmt: str) -> bytes:
    """A small well-formed file of each format."""
    if fmt in ("x-api", "jsonl"):
        return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in TWEETS).encode()
    if fmt == "x-archive":
        items = [{"tweet": {"id_str": t["id"], "full_text": t["text"], "created_at": "Wed Oct 10 20:19:24 +0000 2018",
                            "entities": {"user_mentions": [{"screen_name": "bob", "indices": ["12", "16"]}]}}}
                 for t in TWEETS]
        return ("window.YTD.tweets.part0 = " + json.dumps(items, indent=2, ensure_ascii=False)).encode()
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["id", "text", "author_id", "created_at"])
        writer.writerows([[t["id"], t["text"] + '\nwith "quotes"', t["author_id"], "2024-01-01"] for t in TWEETS])
        return buffer.getvalue().encode()
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(pa.table({"id": [t["id"] for t in TWEETS], "text": [t["text"] for t in TWEETS],
                                 "author_id": [t["author_id"] for t in TWEETS]}), sink)
        return sink.getvalue()
    if fmt == "text":
        return "".join(t["text"] + "\n" for t in TWEETS).encode()
    return json.dumps({"c1": {"messages": [[{"text": t["text"], "sender": t["author_id"],
                                             "timestamp": "2024-01-01T00:00:00"}] for t in TWEETS]}}).encode()


VALID = {fmt: valid_file(fmt) for fmt in FORMATS}

# JSON of every shape, with the keys the readers look for, so that wrong types reach the code that reads them.
KEYS = st.sampled_from(["id", "id_str", "text", "full_text", "author_id", "lang", "created_at", "entities",
                        "mentions", "urls", "user_mentions", "indices", "start", "end", "username", "screen_name",
                        "expanded_url", "url", "referenced_tweets", "type", "note_tweet", "data", "includes",
                        "tweets", "tweet", "conversation_id", "in_reply_to_status_id_str", "messages", "sender",
                        "timestamp", "accountId"]) | st.text(max_size=4)
TEXT = st.text(st.characters(exclude_categories=()), max_size=40) | st.sampled_from(
    ["http://[::1", "www.[x", "@bob", "12", "\u0663", "\u00b2", "+1", " 3", "9" * 40, "9" * 5000,
     "2024-01-01T00:00:00Z", "replied_to", "\ud800", "<|im_end|>", "https://t.co/x"])
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
                    max_leaves=25)
SPAN = st.lists(SCALARS, min_size=2, max_size=2) | st.lists(SCALARS, max_size=3)
TWEETISH = st.fixed_dictionaries({"id": SCALARS, "text": TEXT}, optional={
    "author_id": SCALARS, "lang": SCALARS, "created_at": SCALARS, "note_tweet": JSON,
    "referenced_tweets": st.lists(st.fixed_dictionaries({"type": SCALARS, "id": SCALARS}), max_size=2) | JSON,
    "entities": st.fixed_dictionaries({}, optional={
        "mentions": st.lists(st.fixed_dictionaries({"start": SCALARS, "end": SCALARS, "username": SCALARS}),
                             max_size=2),
        "urls": st.lists(st.fixed_dictionaries({"start": SCALARS, "end": SCALARS, "expanded_url": SCALARS}),
                         max_size=2),
        "user_mentions": st.lists(st.fixed_dictionaries({"indices": SPAN, "screen_name": SCALARS}), max_size=2)}),
})


def json_file(fmt: str, values: list) -> bytes:
    if fmt == "x-archive":
        return ("window.YTD.tweets.part0 = " + json.dumps([{"tweet": v} for v in values])).encode()
    if fmt == "chitchat":
        return json.dumps({str(i): {"messages": [[v]]} for i, v in enumerate(values)}).encode()
    if fmt == "x-api" and values and isinstance(values[0], dict):
        return json.dumps({"data": values}, indent=1).encode()  # a pretty-printed envelope
    return "".join(json.dumps(v) + "\n" for v in values).encode()


def nested(depth: int, opener: str) -> str:
    pairs = {"[": "]", "{": "}"}
    inside = "".join('{"a":' if o == "{" else "[" for o in opener * depth)[: 5 * depth]
    closing = "".join("}" if c == "{" else "]" for c in inside if c in pairs)[::-1]
    return inside + "1" + closing


@st.composite
def contents(draw, fmt: str) -> bytes:
    """Some bytes a reader of FMT may meet."""
    kind = draw(st.sampled_from(["random", "truncated", "mutated", "json", "json", "json", "nested", "nested",
                                 "encoded"]))
    valid = VALID[fmt]
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncated":
        return valid[: draw(st.integers(0, len(valid)))]
    if kind == "mutated":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "json":
        return json_file(fmt, draw(st.lists(TWEETISH | JSON, max_size=4)))
    if kind == "nested":
        depth = draw(st.sampled_from([2, 4, 65, 999, 1500, 30_000]) | st.integers(1, 30_000))
        line = nested(depth, draw(st.sampled_from(["[", "{", "[{"])))
        lines = valid.decode().splitlines(keepends=True) if fmt != "parquet" else []
        lines.insert(draw(st.integers(0, len(lines))), line + "\n")
        return "".join(lines).encode()
    # Encodings: the file, or one line of it, in something other than UTF-8.
    codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "utf-8-sig"]))
    text = valid.decode("utf-8", "replace")
    if draw(st.booleans()):
        return text.encode(codec, "replace")
    lines = text.splitlines(keepends=True) or [""]
    at = draw(st.integers(0, len(lines) - 1))
    return b"".join(line.encode(codec, "replace") if i == at else line.encode() for i, line in enumerate(lines))


def compressed(data: bytes, how: str, cut: float) -> bytes:
    packed = {"plain": lambda d: d, "gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[how](data)
    return packed[: int(len(packed) * cut)] if cut < 1 else packed


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def read_and_process(path, fmt: str, data_settings: DataSettings) -> list:
    """Read with the reader, check every record, then run the batch step on them and check its counts."""
    records = list(FileReader(SourceFile(fmt, path), data_settings).records())
    for record in records:
        assert isinstance(record, (Post, Quarantined))
        if isinstance(record, Post):
            for value in (record.id, record.author_id, record.text, record.lang, record.conversation_id,
                          record.in_reply_to_id, record.quoted_id, record.retweet_of_id):
                assert value is None or (isinstance(value, str) and value.encode("utf-8"))
            assert record.id and record.text.strip() and len(record.text) <= data_settings.max_record_bytes
            for start, end, hint in record.mentions + record.urls:
                assert type(start) is int and type(end) is int and isinstance(hint, str)
        else:
            assert len(record.raw) <= data_settings.quarantine_snippet_chars
    # The batch step cleans texts in place: it gets copies, and the caller sees the records as read.
    result = BatchProcessor.for_settings(data_settings.model_dump_json()).process(0, list(map(copy.copy, records)))
    assert result.n_in == len(records)
    assert result.table.num_rows + sum(result.dropped.values()) + len(result.quarantine) == len(records)
    pa.Table.from_pylist(result.quarantine, schema=QUARANTINE_SCHEMA)  # every snippet can be written
    return records


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.data(), how=st.sampled_from(["plain", "gzip", "zstd"]),
       cut=st.sampled_from([1.0, 1.0, 0.9, 0.5]), data_settings=st.sampled_from([DEFAULT, TINY]))
def test_no_input_crashes_a_reader_and_every_record_is_counted(workdir, fmt, data, how, cut, data_settings):
    content = data.draw(contents(fmt))
    path = workdir / f"{fmt}.input"
    path.write_bytes(compressed(content, how, cut))
    if fmt == "x-archive" and data.draw(st.booleans()):  # the archive's owner comes from account.js beside it
        (workdir / "account.js").write_bytes(data.draw(contents("x-archive")))
    read_and_process(path, fmt, data_settings)
    (workdir / "account.js").unlink(missing_ok=True)


# CSV fields: short text with quotes and line breaks of every kind, and fields over the limit on one line
# or across lines (the csv module's own limit, 131,072 characters, included).
CSV_FIELD = st.text(st.sampled_from('ab ,"\r\n\t\u00e9'), max_size=30) | st.sampled_from(
    ["x" * 140_000, "y" * 200 + "\n" + "z" * 200, '"' * 170, "q\r" * 90])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.text("0123456789", min_size=1, max_size=3), CSV_FIELD), max_size=6),
       how=st.sampled_from(["plain", "gzip", "zstd"]))
def test_every_csv_row_is_one_record_and_fields_read_back_exactly(workdir, rows, how):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "text"])
    writer.writerows(rows)
    path = workdir / "rows.csv"
    path.write_bytes(compressed(buffer.getvalue().encode(), how, 1.0))
    records = read_and_process(path, "csv", TINY)
    assert len(records) == len(rows)  # none lost after a bad one, none made up
    for (_, text), record in zip(rows, records):
        if isinstance(record, Post):
            assert record.text == text
        else:
            assert record.reason == ("no_text" if not text.strip() else "too_large")


ODD_TABLES = [
    pa.table({"id": [1.5, None], "text": [b"bytes, not text", b"\xff"]}),
    pa.table({"id": [[1, 2], None], "text": ["a list for an id", "x"], "lang": [{"a": 1}, None]}),
    pa.table({"post_id": pa.array([2**63, 1], pa.uint64()), "body": ["the largest id", "  "],
              "timestamp": pa.array([0, 2**62], pa.timestamp("ns")), "author": [None, "b"]}),
    pa.table({"text": pa.array(["dictionary encoded", "dictionary encoded"]).dictionary_encode(),
              "created_at": ["not a time", "Wed Oct 10 20:19:24 +0000 2018"], "id": ["", "9"]}),
]


@pytest.mark.parametrize("table", range(len(ODD_TABLES)))
def test_parquet_columns_of_odd_types(workdir, table):
    path = workdir / f"odd-{table}.parquet"
    pq.write_table(ODD_TABLES[table], path)
    records = read_and_process(path, "parquet", DEFAULT)
    assert len(records) == ODD_TABLES[table].num_rows


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_whole_run_over_fuzzed_sources_completes_and_accounts_for_every_record(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("run")
    specs, expected = [], 0
    for index, fmt in enumerate(data.draw(st.lists(st.sampled_from(FORMATS), min_size=1, max_size=4))):
        path = root / f"{index}.input"
        path.write_bytes(compressed(data.draw(contents(fmt)), data.draw(st.sampled_from(["plain", "gzip", "zstd"])),
                                    1.0))
        specs.append(f"{fmt}:{path}")
        expected += len(list(FileReader(SourceFile(fmt, path), TINY).records()))
    stats = pipeline.run(TINY.model_copy(update={"sources": specs}), root / "out", progress=False)
    assert stats["in"] == expected == sum(stats["in_by_source"].values())
    assert stats["in"] == stats["kept"] + sum(stats["dropped"].values()) + stats["quarantined"]


def test_a_parquet_column_name_that_is_not_utf8_is_quarantined_not_raised(workdir):
    """Found by the fuzz test above: pyarrow raises UnicodeDecodeError (a ValueError, not an ArrowException)
    while opening a file whose footer names a column with invalid UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = workdir / "bad_name.parquet"
    pq.write_table(pa.table({"id": ["1"], "text": ["hello there"], "author_id": ["a"]}), path)
    data = path.read_bytes()
    assert b"\x18\x04text" in data
    path.write_bytes(data.replace(b"\x18\x04text", b"\x18\x04\x80ext", 1))
    records = list(FileReader(SourceFile("parquet", path), DataSettings()).records())
    assert len(records) == 1 and isinstance(records[0], Quarantined)
    assert "unreadable_parquet" in records[0].reason
