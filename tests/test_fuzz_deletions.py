"""Property-based fuzzing of the deletion-list parser: whatever the bytes, it returns exact ids or refuses the
list with a MurmurError that names the file and line; it never crashes with anything else."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from murmur.data.compliance import (
    KINDS,
    MAX_EVENT_CHARS,
    DeletionEvent,
    Deletions,
    load_deletions,
    parse_deletion_events,
    parse_deletions,
)
from murmur.errors import MurmurError

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces of the grammar and of what breaks parsers, so that random lists reach every branch, not only errors.
PIECES = st.sampled_from(["post:", "account:", "Post:", "restore ", "delete ", "#", " #", " ", "\t", "\r", "\n",
                          "\ufeff", "\u2028", "\x85", "\x00", "{", "}", "[", "]", '"post"', '"account"', '"action"',
                          '"restore"', '"note"', ":", ",", '"', "\\", "\\ud800", "\\u0000", "1", "abc", "é", "💬",
                          "user:", "null", "123", "1e999"])
GRAMMARISH = st.lists(PIECES | st.text(max_size=4), max_size=40).map("".join)
IDS = st.text(min_size=1, max_size=30)  # any code points but lone surrogates (no UTF-8 file can hold those)
EVENTS = st.lists(st.builds(DeletionEvent, st.sampled_from(KINDS), IDS, st.booleans()), max_size=12)


def check(text: str, origin: str = "fuzz", json_only: bool = False) -> Deletions | None:
    """Parse; a refusal must be a MurmurError naming the line. A result holds only usable, exact ids."""
    try:
        result = parse_deletions(text, origin, json_only)
    except MurmurError as err:
        assert str(err).startswith(f"{origin}:") and len(str(err)) < 1000  # names the line, never echoes it all
        return None
    for ident in result.posts | result.accounts:
        assert isinstance(ident, str) and ident and len(ident) <= MAX_EVENT_CHARS
        ident.encode("utf-8")  # every id can be hashed and compared with a record's
    return result


@FUZZ
@given(st.text(max_size=300) | GRAMMARISH)
def test_any_text_gives_exact_ids_or_a_clear_refusal(text):
    check(text)
    check(text, json_only=True)


@FUZZ
@given(st.binary(max_size=300) | GRAMMARISH.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_file_gives_exact_ids_or_a_clear_refusal(tmp_path, data):
    for name in ("list.txt", "list.jsonl"):
        path = tmp_path / name
        path.write_bytes(data)
        try:
            load_deletions(path)
        except MurmurError as err:
            assert str(path) in str(err)


@FUZZ
@given(EVENTS)
def test_recorded_events_read_back_exactly(events):
    """What a run records (`DeletionEvent.line`) is read back as the very same events, whatever the ids."""
    record = "# applied 2024-01-01T00:00:00+00:00\n" + "".join(f"{event.line()}\n" for event in events)
    assert parse_deletion_events(record, "record") == events
    jsonl = "".join(json.dumps({e.kind: e.id, "action": "restore" if e.restore else "delete"}) + "\n"
                    for e in events)
    assert parse_deletion_events(jsonl, "list.jsonl", json_only=True) == events


@FUZZ
@given(EVENTS, st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252"]))
def test_any_encoding_reads_exactly_or_is_refused_as_not_utf8(tmp_path, events, encoding):
    path = tmp_path / "list.txt"
    text = "".join(f"{event.line()}\n" for event in events)
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        return  # the id cannot be written in that encoding at all
    path.write_bytes(data)
    try:
        as_utf8 = data.decode("utf-8")
    except UnicodeDecodeError:
        try:
            load_deletions(path)
        except MurmurError as err:
            assert "not UTF-8" in str(err)
        else:
            raise AssertionError("bytes that are not UTF-8 were read as a deletion list")
        return
    if as_utf8.removeprefix("\ufeff") == text:  # a UTF-8 file (with or without its BOM) reads exactly
        assert load_deletions(path) == Deletions.from_events(events)
    else:  # other bytes that happen to be UTF-8 mean something else: read or refused, never a crash
        try:
            load_deletions(path)
        except MurmurError as err:
            assert str(path) in str(err)


@FUZZ
@given(st.integers(1, 40_000), st.sampled_from(['{"note": ', '{"post": [', '{"note": [', "{"]))
def test_deep_nesting_is_refused_not_a_crash(depth, opener):
    line = opener * depth
    assert check(line) is None
    assert check('{"post": "a", "note": ' + "[" * depth + "]" * depth + "}") in (None, Deletions(posts={"a"}))
