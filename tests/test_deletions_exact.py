"""Deletion ids are exact strings, and an account deletion reaches every artifact, the quarantine included."""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import tweet

from murmur.data import pipeline
from murmur.data.compliance import audit, deleted_post_ids, load_deletions, purge
from murmur.errors import MurmurError
from murmur.settings.data import DataSettings

VICTIM_TEXT = "These words about the harbour at dawn are mine alone"


def build(folder: Path, lines: list[str], deletions: str | None = None, name: str = "deletions.txt") -> dict:
    source = folder / "posts.jsonl"
    source.write_text("\n".join(lines) + "\n")
    listing = None
    if deletions is not None:
        listing = folder / name
        listing.write_text(deletions)
    settings = DataSettings(sources=[f"x-api:{source}"], workers=1, deletions=str(listing) if listing else None)
    return pipeline.run(settings, folder / "out", progress=False)


def post_ids(out: Path) -> set[str]:
    return set(pq.read_table(out / "posts.parquet").column("id").to_pylist())


def accounted(stats: dict) -> bool:
    return stats["in"] == stats["kept"] + sum(stats["dropped"].values()) + stats["quarantined"]


# -- (1) ids are exact strings -------------------------------------------------------------------------------

def test_a_hash_inside_an_id_is_part_of_the_id(tmp_path):
    lines = [json.dumps(tweet("abc", "Someone else's post that nobody asked to delete today", author="ann")),
             json.dumps(tweet("abc#1", "The post whose owner asked for it to be deleted", author="ben"))]
    stats = build(tmp_path, lines, "post:abc#1\n")
    out = tmp_path / "out"
    assert post_ids(out) == {"abc"}  # not the other way round
    assert stats["deleted"] == 1 and accounted(stats)
    assert audit(out) == []
    # The audit checks what was asked: `abc#1`, and finds it in a run that never applied the list.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    build(fresh, lines)
    problems = audit(fresh / "out", load_deletions(tmp_path / "deletions.txt"))
    assert problems and all("deleted post abc#1 found" in p for p in problems)
    assert "posts.parquet: deleted post abc#1 found in column id" in problems


def test_ids_with_spaces_and_other_characters_are_expressible(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# a comment starts a line\n"
                       "post:my post\n"
                       "account:Ünïcode:name\n"  # the kind ends at the first colon; the id may hold more
                       "post:tab\there\n"
                       "post:a#b#c\n"
                       "post:gone soon\n"
                       "restore post:gone soon\n")
    deletions = load_deletions(listing)
    assert deletions.posts == {"my post", "tab\there", "a#b#c"}
    assert deletions.accounts == {"Ünïcode:name"}
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text(json.dumps({"post": "  padded id  "}) + "\n"
                     + json.dumps({"account": "team #3", "note": "a free comment"}) + "\n"
                     + json.dumps({"post": "line\nbreak"}) + "\n"
                     + json.dumps({"post": "x"}) + "\n" + json.dumps({"post": "x", "action": "restore"}) + "\n")
    deletions = load_deletions(jsonl)
    assert deletions.posts == {"  padded id  ", "line\nbreak"}
    assert deletions.accounts == {"team #3"}


def test_a_json_line_is_an_event_in_any_list(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text('{"post": "abc#1"}\npost:plain\n  {"account": "zed", "action": "delete"}\n')
    deletions = load_deletions(listing)
    assert deletions.posts == {"abc#1", "plain"} and deletions.accounts == {"zed"}


@pytest.mark.parametrize("line, advice", [
    ("post:abc # spam report 42", "comment"),        # an inline comment would silently change the id
    ("account:x\t# note", "comment"),
    ("post: abc", "space"),                          # a leading space is part of no id a reader can see
    ("my post", "post:ID"),                          # a bare id is one word
    ("user:5", "unknown deletion kind"),
    ("post:", "needs an id"),
])
def test_ambiguous_lines_are_refused_with_advice(tmp_path, line, advice):
    listing = tmp_path / "list.txt"
    listing.write_text(f"post:fine\n{line}\n")
    with pytest.raises(MurmurError, match=advice) as caught:
        load_deletions(listing)
    assert f"{listing}:2" in str(caught.value)


@pytest.mark.parametrize("line, advice", [
    ('{"post": 123}', "string"),
    ('{"post": "a", "account": "b"}', "exactly one"),
    ('{"post": "a", "post": "b"}', "twice"),
    ('{"posts": "a"}', "unknown key"),
    ('{"post": "a", "action": "maybe"}', "neither 'delete' nor 'restore'"),
    ('{"post": "\\ud800"}', "Unicode"),
    ('{"post": "a"', "not valid JSON"),
    ('["post", "a"]', "JSON object"),
    ('{"post": ' + "[" * 100_000 + "]" * 100_000 + "}", "longer"),
    ('{"post": ' + "[" * 20_000 + "]" * 20_000 + "}", "nested"),
])
def test_bad_json_events_are_refused_with_advice(tmp_path, line, advice):
    listing = tmp_path / "list.jsonl"
    listing.write_text(f"{line}\n")
    with pytest.raises(MurmurError, match=advice) as caught:
        load_deletions(listing)
    assert f"{listing}:1" in str(caught.value)


def test_every_event_of_a_jsonl_list_is_json(tmp_path):
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"post": "a"}\npost:b\n')
    with pytest.raises(MurmurError, match="not a JSON object"):
        load_deletions(listing)


def test_the_recorded_list_keeps_ids_exact_across_rebuilds(tmp_path):
    lines = [json.dumps(tweet("abc", "Someone else's post that nobody asked to delete today", author="ann")),
             json.dumps(tweet("abc  #1", "A post whose id has spaces and a hash sign inside", author="ben"))]
    build(tmp_path, lines, json.dumps({"post": "abc  #1"}) + "\n", name="list.jsonl")
    out = tmp_path / "out"
    assert post_ids(out) == {"abc"}
    # A rebuild with new settings re-reads the recorded list: still exactly `abc  #1`.
    settings = DataSettings(sources=[f"x-api:{tmp_path / 'posts.jsonl'}"], workers=1, min_turns=3)
    stats = pipeline.run(settings, out, progress=False)
    assert not stats.get("up_to_date") and post_ids(out) == {"abc"} and audit(out) == []


def test_ids_removed_with_their_account_are_recorded_exactly(tmp_path):
    lines = [json.dumps(tweet("my post", "A post by an account that is about to be deleted", author="gone")),
             json.dumps(tweet("line\nbreak", "Another post by the same account, with an odd id", author="gone")),
             json.dumps(tweet("kept", "A post by somebody else that stays where it is", author="ann"))]
    build(tmp_path, lines, "account:gone\n")
    out = tmp_path / "out"
    assert deleted_post_ids(out) == {"my post", "line\nbreak"}
    assert post_ids(out) == {"kept"} and audit(out) == []


# -- (2) account deletions reach quarantine.parquet ----------------------------------------------------------

def victim_corpus() -> list[str]:
    return [
        json.dumps(tweet("v1", VICTIM_TEXT, author="victim")),
        json.dumps({"id": "v2", "author_id": "victim", "lang": "en"}),  # no text: quarantined with its id
        '{"id": "v3", "author_id": "victim", "text": "my private diary entry for monday"',  # malformed, no id
        # Someone else's broken line quoting the victim's deleted post word for word.
        '{"id": "m1", "author_id": "mallory", "text": ' + json.dumps(VICTIM_TEXT) + ', "lang": ',
        '{"id": "z1", "author_id": "zoe", "text": "an unrelated broken line"',  # stays, with its snippet
        json.dumps(tweet("k1", "A post by somebody else that stays where it is", author="ann")),
    ]


def quarantine_rows(out: Path) -> list[dict]:
    return pq.read_table(out / "quarantine.parquet").to_pylist()


def test_an_account_deletion_reaches_the_quarantine_at_build(tmp_path):
    stats = build(tmp_path, victim_corpus(), "account:victim\n")
    out = tmp_path / "out"
    rows = quarantine_rows(out)
    text = json.dumps(rows)
    assert "victim" not in text and "diary" not in text and "harbour" not in text
    assert "v2" not in text  # the record of the deleted account left, not only its snippet
    assert [(r["record_id"], r["line"]) for r in rows] == [(None, 5)]
    assert rows[0]["raw"].startswith('{"id": "z1", "author_id": "zoe"')  # unattributable: its snippet stays
    assert stats["quarantined"] == 1 and stats["deleted"] == 4 and accounted(stats)
    assert post_ids(out) == {"k1"} and audit(out) == []


def test_an_identified_quarantined_record_keeps_no_raw_text(tmp_path):
    build(tmp_path, [json.dumps({"id": "q1", "author_id": "someone", "lang": "en", "bio": "my home address"}),
                     json.dumps(tweet("k1", "A post by somebody else that stays where it is", author="ann"))])
    rows = quarantine_rows(tmp_path / "out")
    # Its source, line and id locate it; its raw text (and whose it is) stays in the input, not here.
    assert [(r["record_id"], r["reason"], r["line"], r["raw"]) for r in rows] == [("q1", "no_text", 1, "")]


def test_the_audit_fails_on_a_quarantine_that_keeps_a_deleted_accounts_records(tmp_path):
    build(tmp_path, victim_corpus())
    out = tmp_path / "out"
    # The quarantine as it was written before this fix: raw snippets of identified records too.
    source = f"x-api:{tmp_path / 'posts.jsonl'}"
    pq.write_table(pa.Table.from_pylist([
        {"source": source, "line": 2, "reason": "no_text", "record_id": "v2",
         "raw": '{"id": "v2", "author_id": "victim", "lang": "en"}'},
        {"source": source, "line": 3, "reason": "malformed_json: Expecting ',' delimiter", "record_id": None,
         "raw": '{"id": "v3", "author_id": "victim", "text": "my private diary entry for monday"'},
        {"source": source, "line": 7, "reason": "too_large", "record_id": "v9",
         "raw": "the text of a post too large to keep"},
        {"source": source, "line": 5, "reason": "malformed_json: x", "record_id": None, "raw": "an unrelated line"},
    ], schema=pq.read_schema(out / "quarantine.parquet")), out / "quarantine.parquet")
    stats = json.loads((out / "stats.json").read_text())
    stats["quarantined"] = 4
    stats["in"] = stats["kept"] + sum(stats["dropped"].values()) + 4
    (out / "stats.json").write_text(json.dumps(stats))
    listing = tmp_path / "late.txt"
    listing.write_text("account:victim\n")

    problems = [p for p in audit(out, load_deletions(listing)) if p.startswith("quarantine.parquet")]
    assert len(problems) == 3
    assert any("v2" in p and "victim" in p for p in problems)      # names the deleted account
    assert any(":3" in p and "victim" in p for p in problems)       # a malformed line of the account
    assert any("v9" in p and "raw text" in p for p in problems)     # an identified record with raw text

    summary = purge(out, listing)
    assert summary["quarantine_removed"] == 2 and summary["quarantine_redacted"] == 1
    assert audit(out) == [] and "victim" not in json.dumps(quarantine_rows(out))
    stats = json.loads((out / "stats.json").read_text())
    assert accounted(stats) and stats["quarantined"] == 2


def test_a_purge_removes_quarantined_copies_of_a_deleted_text(tmp_path):
    build(tmp_path, victim_corpus())
    out = tmp_path / "out"
    assert any("harbour" in (r["raw"] or "") for r in quarantine_rows(out))  # mallory's broken line
    listing = tmp_path / "late.txt"
    listing.write_text("post:v1\n")
    purge(out, listing)
    assert not any("harbour" in (r["raw"] or "") for r in quarantine_rows(out))
    assert audit(out) == []


def test_an_unattributable_snippet_is_scrubbed_of_personal_data(tmp_path):
    broken = '{"id": "z9", "text": "call me on +44 20 7946 0958 or mail zoe@example.org", '  # cut short
    build(tmp_path, [broken, json.dumps(tweet("k1", "A post by somebody else that stays where it is", author="ann"))])
    [row] = quarantine_rows(tmp_path / "out")
    assert row["record_id"] is None and row["raw"].startswith('{"id": "z9"')
    assert "7946" not in row["raw"] and "zoe@example.org" not in row["raw"]
    assert "<phone>" in row["raw"] and "<email>" in row["raw"]
