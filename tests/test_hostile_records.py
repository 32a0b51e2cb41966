"""Hostile input records: each one is quarantined and counted, the records around it are kept, the run
completes, and memory stays bounded by `data.max_record_bytes` (issue #13, "Hostile records")."""

import csv
import gzip
import io
import json
import tracemalloc
import zlib

import pytest
import zstandard

from murmur.data import pipeline
from murmur.data.batch import BatchProcessor
from murmur.data.records import Post, Quarantined
from murmur.data.sources import FileReader, SourceFile
from murmur.settings.data import DataSettings

QUIET = {"workers": 1, "near_dedup": False, "languages": [], "dedup_min_chars": 1000}


def good(i: int) -> dict:
    return {"id": str(i), "text": f"A perfectly ordinary post number {i} about the weather", "author_id": "a"}


def read(path, fmt: str, **settings) -> list:
    return list(FileReader(SourceFile(fmt, path), DataSettings(**settings)).records())


def run(tmp_path, specs: list[str], **settings) -> dict:
    return pipeline.run(DataSettings(sources=specs, **QUIET | settings), tmp_path / "out", progress=False)


def reasons(records) -> list[str]:
    return [r.reason.split(":")[0] for r in records if isinstance(r, Quarantined)]


def kept_ids(records) -> list[str]:
    return [r.id for r in records if isinstance(r, Post)]


# -- nesting ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [990, 30_000])  # 30,000 deep is 60 kB: under max_record_bytes
@pytest.mark.parametrize("fmt", ["jsonl", "x-api"])
def test_deeply_nested_json_line_is_quarantined_and_its_neighbours_kept(tmp_path, fmt, depth):
    path = tmp_path / "posts.jsonl"
    nested = "[" * depth + "]" * depth
    in_an_object = '{"id": "9", "text": ' + "[" * depth + "1" + "]" * depth + "}"
    path.write_text("\n".join([json.dumps(good(1)), nested, in_an_object, json.dumps(good(2))]) + "\n")
    records = read(path, fmt)
    assert kept_ids(records) == ["1", "2"]
    assert reasons(records) == ["too_deep", "too_deep"]


def test_nesting_limit_is_a_setting_and_normal_posts_pass_it(tmp_path):
    # This X API payload is 8 levels deep: a limit of 5 refuses it, the default admits it.
    entities = {"urls": [{"images": [{"url": "u"}]}]}
    line = json.dumps({"data": [{"id": "1", "text": "hello there", "entities": entities}]})
    (tmp_path / "page.jsonl").write_text(line + "\n")
    assert kept_ids(read(tmp_path / "page.jsonl", "x-api")) == ["1"]
    assert reasons(read(tmp_path / "page.jsonl", "x-api", max_json_depth=5)) == ["too_deep"]
    # Brackets inside strings are text, not nesting.
    (tmp_path / "brackets.jsonl").write_text(json.dumps(good(3) | {"text": "[[[[[[[[ {{{{{{ \\\" ]]"}) + "\n")
    assert kept_ids(read(tmp_path / "brackets.jsonl", "jsonl", max_json_depth=2)) == ["3"]


@pytest.mark.parametrize(("fmt", "before", "after"), [
    ("x-archive", "window.YTD.tweets.part0 = [\n  ", "\n]\n"),
    ("x-api", '{\n  "data": [\n', '\n  ]\n}\n'),  # a pretty-printed envelope is read as one document
    ("chitchat", '{"c1": {"messages": ', "}}"),
])
def test_deeply_nested_document_is_quarantined_not_fatal(tmp_path, fmt, before, after):
    path = tmp_path / "document.json"
    path.write_text(before + "[" * 50_000 + "]" * 50_000 + after)
    stats = run(tmp_path, [f"{fmt}:{path}"])
    assert (stats["in"], stats["quarantined"], stats["quarantine_reasons"]) == (1, 1, {"too_deep": 1})


def test_a_run_with_a_nested_line_completes_and_counts_it(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join([json.dumps(good(1)), "{" * 30_000, json.dumps(good(2))]) + "\n")
    stats = run(tmp_path, [f"jsonl:{path}"])
    assert (stats["in"], stats["kept"], stats["quarantined"]) == (3, 2, 1)
    assert stats["quarantine_reasons"] == {"too_deep": 1}


# -- one giant line ----------------------------------------------------------------------------------------------

MB = 1 << 20


def write_with_giant_line(path, compression: str, before: bytes, giant_mb: int, after: bytes) -> None:
    """A file whose middle line is GIANT_MB megabytes of 'a', compressed as it is generated (never held whole)."""
    if compression == "gzip":
        encoder = zlib.compressobj(1, zlib.DEFLATED, 31)
        compress, flush = encoder.compress, encoder.flush
    elif compression == "zstd":
        encoder = zstandard.ZstdCompressor(level=1).compressobj()
        compress, flush = encoder.compress, encoder.flush
    else:
        compress, flush = (lambda data: data), (lambda: b"")
    block = b"a" * MB
    with open(path, "wb") as out:
        out.write(compress(before))
        for _ in range(giant_mb):
            out.write(compress(block))
        out.write(compress(b"\n" + after))
        out.write(flush())


def peak_bytes_while(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("compression", "giant_mb"), [("gzip", 200), ("zstd", 200), ("plain", 24)])
def test_giant_line_is_read_in_bounded_memory_and_the_next_lines_kept(tmp_path, compression, giant_mb):
    path = tmp_path / "posts.jsonl"
    write_with_giant_line(path, compression, (json.dumps(good(1)) + "\n").encode(), giant_mb,
                          "".join(json.dumps(good(i)) + "\n" for i in (2, 3)).encode())
    records, peak = peak_bytes_while(lambda: read(path, "jsonl"))
    assert kept_ids(records) == ["1", "2", "3"]
    assert reasons(records) == ["too_large"]
    assert records[1].line == 2 and records[1].raw.startswith("aaaa")
    assert peak < 8 * MB, f"peak {peak / MB:.0f} MB while reading a {giant_mb} MB line"


@pytest.mark.parametrize("fmt", ["text", "x-api", "csv"])
def test_giant_line_is_bounded_in_every_line_format(tmp_path, fmt):
    path = tmp_path / "posts.gz"
    if fmt == "csv":
        before, after = b"id,text\n1,first post here\n", b"\n2,second post here\n3,third post here\n"
        before += b'9,"'  # the giant value is a quoted field that runs on to the next line
        after = b'still the same field"' + after
    elif fmt == "text":
        before, after = b"first post here\n", b"second post here\nthird post here\n"
    else:
        before = (json.dumps(good(1)) + "\n").encode()
        after = "".join(json.dumps(good(i)) + "\n" for i in (2, 3)).encode()
    write_with_giant_line(path, "gzip", before, 24, after)
    records, peak = peak_bytes_while(lambda: read(path, fmt))
    assert len(kept_ids(records)) == 3 and reasons(records) == ["too_large"]
    assert peak < 8 * MB, f"peak {peak / MB:.0f} MB while reading a 24 MB line"


# -- CSV ----------------------------------------------------------------------------------------------------------

def test_csv_field_over_the_limit_quarantines_its_row_only(tmp_path):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "text", "author_id"])
    writer.writerow(["1", "the first post of the file", "u1"])
    writer.writerow(["2", "x" * 300_000, "u2"])  # over data.max_record_bytes and over the csv module's limit
    writer.writerow(["3", "a quoted field\nover two lines, with \"quotes\"", "u3"])
    writer.writerow(["4", "y" * 70_000 + "\n" + "z" * 70_000, "u4"])  # over the limit, across lines
    writer.writerow(["5", "the last post of the file", "u5"])
    (tmp_path / "posts.csv").write_text(buffer.getvalue())
    records = read(tmp_path / "posts.csv", "csv")
    assert kept_ids(records) == ["1", "3", "5"]
    assert reasons(records) == ["too_large", "too_large"]
    assert [r.line for r in records] == [2, 3, 5, 7, 8]  # the line each record ends on
    stats = run(tmp_path, [f"csv:{tmp_path / 'posts.csv'}"])
    assert (stats["in"], stats["kept"], stats["quarantined"]) == (5, 3, 2)


def test_csv_keeps_dict_reader_behaviour(tmp_path):
    (tmp_path / "posts.csv").write_bytes(b"id,text,author_id\r\n1,first post,u1\r\n\r\n2,second post\r\n"
                                         b"3,third post,u3,extra\r\n4,bad \xff byte,u4\r\n")
    records = read(tmp_path / "posts.csv", "csv")
    assert kept_ids(records) == ["1", "2", "3"] and reasons(records) == ["invalid_utf8"]
    assert [r.author_id for r in records if isinstance(r, Post)] == ["u1", "unknown", "u3"]
    assert [r.text for r in records if isinstance(r, Post)] == ["first post", "second post", "third post"]


# -- X archive entities --------------------------------------------------------------------------------------------

def archive(tmp_path, entities: list) -> list:
    tweets = [{"tweet": {"id_str": str(i), "full_text": "@bob hello there friend",
                         "entities": {"user_mentions": [{"screen_name": "bob", "indices": indices}]}}}
              for i, indices in enumerate(entities, start=1)]
    (tmp_path / "tweets.js").write_text("window.YTD.tweets.part0 = " + json.dumps(tweets))
    return read(tmp_path / "tweets.js", "x-archive")


def test_archive_indices_must_be_plain_ascii_digits(tmp_path):
    odd = [["\u0660", "4"], ["+0", "4"], [" 0", "4"], ["\u00b2", "4"], ["9" * 5000, "4"], ["0", "9" * 5000],
           [True, 4], [0.0, 4], [-1, 4], ["0", "4", "5"], "04", None, [10**40, 4]]
    records = archive(tmp_path, [["0", "4"], [0, 4], *odd])
    assert len(records) == 2 + len(odd) and all(isinstance(r, Post) for r in records)
    assert [r.mentions for r in records[:2]] == [[(0, 4, "bob")], [(0, 4, "bob")]]
    assert all(r.mentions == [] for r in records[2:])


def test_json_number_with_thousands_of_digits_is_quarantined(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text("\n".join([json.dumps(good(1)), '{"id": ' + "7" * 5000 + ', "text": "hi"}', json.dumps(good(2))]))
    for fmt in ("jsonl", "x-api"):
        records = read(path, fmt)
        assert kept_ids(records) == ["1", "2"] and reasons(records) == ["malformed_json"]
    envelope = tmp_path / "page.json"
    envelope.write_text('{\n "data": [{"id": "1", "text": "hi", "author_id": ' + "7" * 5000 + "}]\n}\n")
    assert reasons(read(envelope, "x-api")) == ["malformed_json"] * 3  # read as lines once the document fails
    (tmp_path / "tweets.js").write_text('window.YTD.tweets.part0 = [{"tweet": {"id": ' + "7" * 5000 + "}}]")
    assert reasons(read(tmp_path / "tweets.js", "x-archive")) == ["malformed_json"]


# -- fields of the wrong type --------------------------------------------------------------------------------------

def test_fields_of_the_wrong_type_never_reach_the_batch_step_as_such(tmp_path):
    tweets = [
        {"id": "1", "text": "see http://example.com/a now", "lang": ["en"], "author_id": {"x": 1},
         "entities": {"urls": [{"start": 4, "end": 24, "expanded_url": 5}], "mentions": [{"start": 0, "end": 1,
                                                                                          "username": []}]}},
        {"id": "2", "text": "lone surrogate \ud800 in the text"},
        {"id": "3\udfff", "text": "lone surrogate in the id"},
        {"id": "4", "text": "lone surrogate in the language", "lang": "e\udc80"},
        {"id": ["5"], "text": "an id that is a list"},
        {"id": "6", "text": "a perfectly ordinary post", "created_at": {"$date": 1}},
    ]
    path = tmp_path / "posts.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tweets))
    settings = DataSettings(**QUIET)
    records = read(path, "x-api")
    assert kept_ids(records) == ["1", "6"]
    assert reasons(records) == ["invalid_utf8", "invalid_utf8", "invalid_utf8", "no_id"]
    first = records[0]
    assert (first.lang, first.author_id, first.urls, first.mentions) == (None, "unknown", [(4, 24, "")], [(0, 1, "")])
    result = BatchProcessor(settings).process(0, records)
    assert result.table.num_rows + sum(result.dropped.values()) + len(result.quarantine) == len(records) == 6


def test_text_with_an_unparseable_url_is_cleaned_not_fatal(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text(json.dumps(good(1) | {"text": "look at http://[::1 and www.[x.org please"}) + "\n")
    stats = run(tmp_path, [f"jsonl:{path}"])
    assert (stats["in"], stats["kept"]) == (1, 1)


def test_gzip_members_and_truncation_still_work(tmp_path):
    lines = b"".join((json.dumps(good(i)) + "\n").encode() for i in range(50))
    path = tmp_path / "posts.jsonl.gz"
    path.write_bytes(gzip.compress(lines[:1000]) + gzip.compress(lines[1000:]))
    assert len(kept_ids(read(path, "jsonl"))) == 50
    path.write_bytes((gzip.compress(lines[:1000]) + gzip.compress(lines[1000:]))[:-30])
    records = read(path, "jsonl")
    assert reasons(records) == ["truncated_or_corrupt_file"] and 0 < len(kept_ids(records)) < 50


def test_a_file_name_that_is_not_utf8_is_named_safely(tmp_path):
    with open(bytes(tmp_path) + b"/caf\xe9.txt", "wb") as out:  # Linux names are bytes: this one is Latin-1
        out.write(b"a line of text that is long enough to keep\n")
    stats = run(tmp_path, [f"text:{tmp_path}/*.txt"])
    assert (stats["in"], stats["kept"]) == (1, 1)
    assert list(stats["in_by_source"]) == [f"text:{tmp_path}/caf\ufffd.txt"]
