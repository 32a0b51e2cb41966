"""The deletion feed a platform must honour: parse deletion lists, purge existing outputs, audit a run.

A deletion list is UTF-8 text, one event a line, in either of two forms (they may be mixed; see docs/data.md):

    post:ID | account:ID | ID          line form: ID is the rest of the line, exactly ('#' and inner spaces
    restore post:ID                    included); a bare ID is one word and means a post
    {"post": "ID"}                     JSON form: any id at all; "action": "restore" undoes, "note" is free text

A line whose first non-blank character is `#` is a comment; `{` starts a JSON event; in a `.jsonl` file every
event is JSON. What a reader could take two ways is refused with advice, never guessed: an id with a leading or
trailing space, or a `#` after a space (an inline comment, or part of the id?). Events apply in order, so the
latest event for an id wins.

Every list a run applies is appended to data/deletions.txt, each event in a form that reads back exactly, so a
later `murmur data audit` re-checks all of them. Deleted texts are never stored: data/tombstones.txt holds
64-bit hashes of their normalised text, which lets the audit find a deleted text that came back under another id.

quarantine.parquet is screened like the posts: a quarantined record of a deleted post, or whose raw snippet
names a deleted post or account or holds a deleted text, leaves it (counted as deleted); a record whose id is
known keeps no raw snippet at all, since its source, line and id locate it and its author cannot be checked.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from murmur.data.dedup import exact_hash, normalised
from murmur.data.records import SPLITS
from murmur.data.threads import MERGE_SEPARATOR, ThreadPost, path_conversation
from murmur.errors import MurmurError
from murmur.files import write_json_atomic, write_table_atomic, write_text_atomic

DELETIONS_FILE = "deletions.txt"
TOMBSTONES_FILE = "tombstones.txt"
DELETED_POSTS_FILE = "deleted_posts.txt"  # ids removed because their account or text was deleted

KINDS = ("post", "account")
JSON_KEYS = ("post", "account", "action", "note")
# Longer than any id a reader accepts (a record is at most data.max_record_bytes, 64 KiB by default): a longer
# line is not a deletion event, and refusing it bounds the work a hostile list can ask for per line.
MAX_EVENT_CHARS = 65_536
LINE_BLANKS = " \t\r\f\v"  # trimmed from both ends of a line; every other character belongs to the id
ACTION_RE = re.compile(r"(delete|restore)[ \t]+(.+)", re.IGNORECASE | re.DOTALL)
SPACE_THEN_HASH = re.compile(r"\s#")
JSON_ADVICE = 'write it as JSON instead, e.g. {"post": "the id"} (docs/data.md, "Deletions")'


@dataclass(frozen=True, slots=True)
class DeletionEvent:
    """One line of a deletion list: delete (or restore) one post or one account."""

    kind: str  # "post" or "account"
    id: str
    restore: bool = False

    def line(self) -> str:
        """The event as a line: the line form when it reads back exactly, else the JSON form (ASCII only)."""
        plain = f"{'restore ' if self.restore else ''}{self.kind}:{self.id}"
        if self.id.isprintable():
            try:
                if _line_event(plain, "") == self:
                    return plain
            except MurmurError:
                pass
        return json.dumps({self.kind: self.id} | ({"action": "restore"} if self.restore else {}))


@dataclass
class Deletions:
    """The post ids and account ids that must vanish."""

    posts: set[str] = field(default_factory=set)
    accounts: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.posts or self.accounts)

    @classmethod
    def from_events(cls, events) -> Deletions:
        """What remains deleted after the events, applied in order (the latest event for an id wins)."""
        state: dict[tuple[str, str], bool] = {}
        for event in events:
            state[(event.kind, event.id)] = not event.restore
        result = cls()
        for (kind, ident), deleted in state.items():
            if deleted:
                (result.posts if kind == "post" else result.accounts).add(ident)
        return result


def parse_deletion_events(text: str, origin: str, json_only: bool = False) -> list[DeletionEvent]:
    """The events of a deletion list, in order; MurmurError (naming `origin:line`) for anything ambiguous."""
    events = []
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.strip(LINE_BLANKS)
        if not line or line.startswith("#"):
            continue
        where = f"{origin}:{number}"
        if len(line) > MAX_EVENT_CHARS:
            raise MurmurError(f"{where}: a line of {len(line):,} characters is longer than any id "
                              f"({MAX_EVENT_CHARS:,} at most); is this file a deletion list?")
        if line.startswith("{"):
            events.append(_json_event(line, where))
        elif json_only:
            raise MurmurError(f"{where}: {_shown(line)} is not a JSON object; every event of a .jsonl deletion "
                              'list is one, e.g. {"post": "ID"} or {"account": "ID"}')
        else:
            events.append(_line_event(line, where))
    return events


def parse_deletions(text: str, origin: str, json_only: bool = False) -> Deletions:
    """What a deletion list leaves deleted."""
    return Deletions.from_events(parse_deletion_events(text, origin, json_only))


def parse_deletion_lines(lines, origin: str) -> Deletions:
    """`parse_deletions` for a caller that holds the list as lines."""
    return parse_deletions("\n".join(lines), origin)


def _shown(text: str) -> str:
    """A piece of a hostile line, short enough for an error message."""
    shown = repr(text[:100])
    return shown if len(shown) <= 100 and len(text) <= 100 else shown[:100] + "..."


def _line_event(line: str, where: str) -> DeletionEvent:
    restore = False
    action = ACTION_RE.fullmatch(line)
    if action:
        restore = action.group(1).lower() == "restore"
        line = action.group(2)
    kind, colon, ident = line.partition(":")
    if colon and kind.lower() in KINDS:
        kind = kind.lower()
    elif colon:
        raise MurmurError(f"{where}: unknown deletion kind {_shown(kind)}; use post:ID or account:ID "
                          "(an id may itself hold ':', as in post:a:b)")
    elif any(c.isspace() for c in line):
        raise MurmurError(f"{where}: {_shown(line)} is not one event; a bare id is one word: write post:ID or "
                          "account:ID for an id with spaces")
    else:
        kind, ident = "post", line
    if not ident:
        raise MurmurError(f"{where}: {kind}: needs an id after the colon")
    if ident[0].isspace() or ident[-1].isspace():
        raise MurmurError(f"{where}: the id in {_shown(line)} starts or ends with a space, which the line form "
                          f"cannot tell from padding; remove it, or {JSON_ADVICE}")
    if SPACE_THEN_HASH.search(ident):
        raise MurmurError(f"{where}: {_shown(line)} has '#' after a space: a comment must start its own line "
                          f"(the rest of an event line is its id); move the comment, or, if the id holds it, "
                          f"{JSON_ADVICE}")
    return DeletionEvent(kind, ident, restore)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different: {"post": "a", "post": "b"} is refused, not read as "b"."""
    twice = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    if twice:
        raise ValueError(f"key {_shown(twice[0])} given twice")
    return dict(pairs)


def _json_event(line: str, where: str) -> DeletionEvent:
    try:
        event = json.loads(line, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise MurmurError(f"{where}: JSON nested too deeply; an event is one flat object such as "
                          '{"post": "ID"}') from None
    except ValueError as err:  # JSONDecodeError, a repeated key, an integer of too many digits
        raise MurmurError(f"{where}: {_shown(line)} is not valid JSON ({getattr(err, 'msg', err)}); "
                          'an event is one object such as {"post": "ID"} on one line') from None
    if not isinstance(event, dict):
        raise MurmurError(f"{where}: {_shown(line)} is not a JSON object; write {{\"post\": \"ID\"}} or "
                          '{"account": "ID"}')
    unknown = sorted(set(event) - set(JSON_KEYS))
    if unknown:
        raise MurmurError(f"{where}: unknown key {_shown(unknown[0])}; an event has 'post' or 'account', and may have "
                          "'action' (delete | restore) and 'note'")
    kinds = [kind for kind in KINDS if kind in event]
    if len(kinds) != 1:
        raise MurmurError(f"{where}: an event names exactly one of 'post' or 'account'; write two events for two")
    kind = kinds[0]
    ident = event[kind]
    if not isinstance(ident, str) or not ident:
        raise MurmurError(f"{where}: the {kind} id must be a non-empty string, e.g. {{\"{kind}\": \"123\"}} "
                          "(numbers are refused: large ones lose digits in many JSON writers)")
    try:
        ident.encode("utf-8")
    except UnicodeEncodeError:
        raise MurmurError(f"{where}: the {kind} id is not valid Unicode (it holds a lone surrogate such as "
                          "\\ud800); no record can have that id") from None
    action = event.get("action", "delete")
    if action not in ("delete", "restore"):
        raise MurmurError(f"{where}: action {_shown(str(action))} is neither 'delete' nor 'restore'")
    return DeletionEvent(kind, ident, action == "restore")


def read_deletion_text(path: str | Path) -> str:
    """The text of a deletion list, with a clear error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MurmurError(f"deletion list {path} not found; pass a text file with one post:ID or account:ID a line")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MurmurError(f"deletion list {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def load_deletion_events(path: str | Path) -> list[DeletionEvent]:
    """The events of a deletion list file (every event is JSON when its name ends in .jsonl)."""
    return parse_deletion_events(read_deletion_text(path), str(path), json_only=Path(path).suffix == ".jsonl")


def load_deletions(path: str | Path | None) -> Deletions:
    """Parse a deletion list file (None gives an empty list)."""
    return Deletions() if path is None else Deletions.from_events(load_deletion_events(path))


def record_deletions(data_dir: Path, events: list[DeletionEvent]) -> None:
    """Append applied events to the run's record, each in a form that reads back exactly; atomically."""
    target = data_dir / DELETIONS_FILE
    previous = target.read_text(encoding="utf-8") if target.is_file() else ""
    if previous and not previous.endswith("\n"):
        previous += "\n"
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    write_text_atomic(target, previous + f"# applied {stamp}\n" + "".join(f"{e.line()}\n" for e in events),
                      durable=True)


def recorded_deletion_events(data_dir: Path) -> list[DeletionEvent]:
    """Every event the run has applied, in order."""
    path = data_dir / DELETIONS_FILE
    return load_deletion_events(path) if path.is_file() else []


def recorded_deletions(data_dir: Path) -> Deletions:
    """Every deletion list the run has applied, combined in order."""
    return Deletions.from_events(recorded_deletion_events(data_dir))


def deleted_post_ids(data_dir: Path) -> set[str]:
    """Ids the run removed for a deleted account or a copied deleted text (later stages must drop them too).

    One JSON string a line, so that any id survives; a line that is not one (a record written before) is an id
    as it stands."""
    path = data_dir / DELETED_POSTS_FILE
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            ids.add(_json_string(line) if line.startswith('"') else line)
    return ids


def _json_string(line: str) -> str:
    try:
        value = json.loads(line)
    except ValueError:
        return line
    return value if isinstance(value, str) else line


def add_deleted_post_ids(data_dir: Path, ids) -> None:
    merged = deleted_post_ids(data_dir) | set(ids)
    write_text_atomic(data_dir / DELETED_POSTS_FILE, "".join(f"{json.dumps(i)}\n" for i in sorted(merged)),
                      durable=True)


def tombstone_hashes(data_dir: Path) -> set[int]:
    path = data_dir / TOMBSTONES_FILE
    if not path.is_file():
        return set()
    return {int(line, 16) for line in path.read_text().split() if line}


def add_tombstones(data_dir: Path, hashes) -> None:
    merged = tombstone_hashes(data_dir) | set(hashes)
    write_text_atomic(data_dir / TOMBSTONES_FILE, "".join(f"{h:016x}\n" for h in sorted(merged)), durable=True)


def data_dir_of(path: str | Path) -> Path:
    """The data folder of a run folder, or the folder itself when it holds the data stage's outputs."""
    path = Path(path)
    for candidate in (path, path / "data"):
        if (candidate / "stats.json").is_file():
            return candidate
    raise MurmurError(f"{path} holds no completed data stage output (no stats.json); run `murmur data` first")


def _tokens_dir(data_dir: Path) -> Path | None:
    tokens = data_dir.parent / "tokens"
    return tokens if (tokens / "manifest.json").is_file() else None


def _text_is_tombstoned(text: str, tombstones: set[int], min_chars: int) -> bool:
    return len(normalised(text)) >= min_chars and exact_hash(text) in tombstones


# How a raw snippet can name an id or hold a text: as a word, a JSON string, a comma-separated field, or whole.
WORD_RE = re.compile(r"\w+")
JSON_STRING_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _names_in(raw: str) -> set[str]:
    """Every string in a quarantined snippet that could be an id or a post's text (decoded where JSON)."""
    names = {raw, raw.strip(), *WORD_RE.findall(raw), *(part.strip() for part in raw.split(","))}
    for literal in JSON_STRING_RE.findall(raw):
        names.add(literal)
        if "\\" in literal:  # an escape: the string means something else than it reads
            try:
                names.add(json.loads(f'"{literal}"'))
            except ValueError:
                pass
    names.discard("")
    return names


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # a JSON escape may decode to a lone surrogate, which no id or hash takes
    except UnicodeEncodeError:
        return False
    return True


def _snippet_finding(raw: str, gone: set[str], accounts: set[str], tombstones: set[int], min_chars: int) -> str | None:
    """Why a quarantined snippet belongs to a deletion (it names a deleted account or post, or holds a deleted
    text), or None. Matching whole words and fields may take an unrelated record along: that errs on the side
    of the person who asked."""
    if not (gone or accounts or tombstones):
        return None
    names = _names_in(raw)
    for deleted, what in ((accounts, "account"), (gone, "post")):
        named = sorted(name for name in names if name in deleted)
        if named:
            return f"names deleted {what} {named[0]}"
    # Normalising never lengthens a text, so shorter names cannot be tombstoned texts.
    if tombstones and any(_text_is_tombstoned(name, tombstones, min_chars) for name in names
                          if len(name) >= min_chars and _encodable(name)):
        return "holds the text of a deleted post"
    return None


def screen_quarantine(rows: list[dict], gone: set[str], accounts: set[str], tombstones: set[int],
                      min_chars: int) -> tuple[list[dict], int, int]:
    """The quarantine rows that may stay, how many left it (deleted), and how many lost their raw snippet.

    A row leaves when its record is a deleted post or its snippet belongs to a deletion; a row whose record id
    is known keeps no snippet (its source, line and id locate it; its author is unknown here, so a later
    account deletion could not find it)."""
    kept, removed, redacted = [], 0, 0
    for row in rows:
        raw = row.get("raw") or ""
        if row.get("record_id") in gone or (raw and _snippet_finding(raw, gone, accounts, tombstones, min_chars)):
            removed += 1
            continue
        if raw and row.get("record_id") is not None:
            row = row | {"raw": ""}
            redacted += 1
        kept.append(row)
    return kept, removed, redacted


def quarantine_problems(rows: list[dict], gone: set[str], accounts: set[str], tombstones: set[int],
                        min_chars: int) -> list[str]:
    """The audit of quarantine.parquet: every row `screen_quarantine` would remove, and, when accounts were
    deleted, every identified row that still keeps a snippet (written before the quarantine kept none)."""
    problems = []
    for row in rows:
        record, raw = row.get("record_id"), row.get("raw") or ""
        where = f"record {record if record is not None else '(no id)'} at {row['source']}:{row['line']}"
        if record in gone:
            problems.append(f"quarantine.parquet: deleted post {record} ({where})")
        elif raw and (finding := _snippet_finding(raw, gone, accounts, tombstones, min_chars)):
            problems.append(f"quarantine.parquet: {where} {finding}")
        elif raw and accounts and record is not None:
            problems.append(f"quarantine.parquet: {where} keeps raw text whose author cannot be checked against "
                            "the deleted accounts; `murmur data purge` removes it")
    return problems


def audit(path: str | Path, deletions: Deletions | None = None) -> list[str]:
    """Problems found: deleted ids, deleted accounts or texts of deleted posts still present. Empty = clean.

    With no deletion list given, re-checks every list the run recorded. Also audits the token shards
    (`murmur.shards.audit_deletions`) when the run has them.
    """
    import pyarrow.parquet as pq

    data_dir = data_dir_of(path)
    deletions = deletions if deletions is not None else recorded_deletions(data_dir)
    tombstones = tombstone_hashes(data_dir)
    min_chars = json.loads((data_dir / "stats.json").read_text()).get("dedup_min_chars", 20)
    problems: list[str] = []
    posts = pq.read_table(data_dir / "posts.parquet").to_pylist()
    deleted_by_account = {row["id"] for row in posts if row["author_id"] in deletions.accounts}
    gone = deletions.posts | deleted_by_account | deleted_post_ids(data_dir)
    for row in posts:
        for column in ("id", "in_reply_to_id", "quoted_id", "conversation_id", "root_id"):
            if row.get(column) in gone:
                problems.append(f"posts.parquet: deleted post {row[column]} found in column {column}")
        if row["author_id"] in deletions.accounts:
            problems.append(f"posts.parquet: post {row['id']} of deleted account {row['author_id']}")
        if _text_is_tombstoned(row["text"], tombstones, min_chars):
            problems.append(f"posts.parquet: post {row['id']} has the text of a deleted post")
    text_of = {row["id"]: row["text"] for row in posts}
    for row in pq.read_table(data_dir / "conversations.parquet").to_pylist():
        leaked = gone.intersection(row["post_ids"]) | ({row["root_id"]} & gone)
        for turn in row["turns"]:
            leaked |= gone.intersection(turn["post_ids"])
            # Provenance: a turn is exactly its posts' texts, and every one of them passed the post checks.
            missing = [pid for pid in turn["post_ids"] if pid not in text_of]
            if missing:
                problems.append(f"conversations.parquet: conversation {row['id']} uses posts {missing} "
                                "that are not in posts.parquet")
            elif turn["text"] != MERGE_SEPARATOR.join(text_of[pid] for pid in turn["post_ids"]):
                problems.append(f"conversations.parquet: conversation {row['id']} has a turn whose text is not "
                                "its posts' texts")
            if _text_is_tombstoned(turn["text"], tombstones, min_chars):
                problems.append(f"conversations.parquet: conversation {row['id']} has the text of a deleted post")
        if leaked:
            problems.append(f"conversations.parquet: conversation {row['id']} holds deleted posts {sorted(leaked)}")
    quarantine = data_dir / "quarantine.parquet"
    if quarantine.is_file():
        problems += quarantine_problems(pq.read_table(quarantine).to_pylist(), gone, deletions.accounts, tombstones,
                                        min_chars)
    tokens = _tokens_dir(data_dir)
    if tokens is not None:
        from murmur import shards

        # Deleted texts are never kept, so the token audit checks ids; purge passes texts while it has them.
        problems += [f"tokens: {p}" for p in shards.audit_deletions(tokens, gone, [])]
    return problems


def _roots_after_cut(posts, gone: set[str]) -> dict[str, str]:
    """New thread roots of the kept posts whose thread is cut by a deleted post, by the build's rule: a post
    whose parent is deleted starts a thread of its own (murmur.data.pipeline._roots).

    Parents are followed as the build does (in_reply_to, else conversation_id) up to the recorded root. The
    split is not changed, so a cut thread stays in the split it was in."""
    ids = posts.column("id").to_pylist()
    recorded = dict(zip(ids, posts.column("root_id").to_pylist()))
    parent_of = {pid: reply or (conv if conv != pid else None) for pid, reply, conv in
                 zip(ids, posts.column("in_reply_to_id").to_pylist(), posts.column("conversation_id").to_pylist())}
    found: dict[str, str] = {}  # post -> its root after the cut (shared by every post on the way up)
    for pid in ids:
        chain, node = [], pid
        while True:
            if node in found:
                root = found[node]
                break
            chain.append(node)
            parent = parent_of[node]
            if node == recorded[node] or parent in gone:
                root = node  # the thread's top as recorded, or a post whose parent is now deleted
                break
            if parent not in recorded or parent in chain:  # cut by an earlier build, or a reply cycle
                root = node if recorded[node] in gone else recorded[node]
                break
            node = parent
        for member in chain:
            found[member] = root
    return {pid: root for pid, root in found.items() if root != recorded[pid]}


def _cut_conversation(conv: dict, gone: set[str], author_of: dict[str, str], text_of: dict[str, str],
                      root_of: dict[str, str], min_turns: int) -> list[dict]:
    """The pieces of a conversation left when its deleted posts are taken out, as the build would make them:
    each run of posts between deleted ones, turns merged and speakers named again, kept with min_turns turns."""
    pieces, run = [], []
    for pid in conv["post_ids"] + [None]:
        if pid is not None and pid not in gone:
            run.append(ThreadPost(pid, None, author_of[pid], text_of[pid], len(run)))
            continue
        if run:
            piece = path_conversation(run, root_of.get(run[0].id, conv["root_id"]), conv["split"])
            if len(piece.turns) >= min_turns:
                pieces.append({**piece.row(), "_cut_after": pid is not None})
            run = []
    return pieces


def _as_built(pieces: list[dict], kept: list[dict]) -> list[dict]:
    """The pieces of cut conversations as thread building would emit them: each once (two paths through a
    tree can leave the same piece), and none that stops where a deleted post stood while another conversation
    carries its path on (the build emits only paths that end at a leaf)."""
    paths = [tuple(c["post_ids"]) for c in kept + pieces]
    prefixes = {path[:n] for path in paths for n in range(1, len(path))}
    seen = {c["id"] for c in kept}
    out = []
    for piece in pieces:
        cut_after = piece.pop("_cut_after")
        if piece["id"] in seen or (cut_after and tuple(piece["post_ids"]) in prefixes):
            continue
        seen.add(piece["id"])
        out.append(piece)
    return out


def purge(path: str | Path, deletions_file: str | Path, min_turns: int | None = None) -> dict:
    """Remove newly deleted posts and accounts from an existing run's outputs without redoing the run.

    Conversations are cut where a deleted post stood; pieces shorter than the run's min_turns go. Stats are
    updated so that `in = kept + dropped + quarantined` still holds (purged posts count as dropped: deleted).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from murmur.data.records import CONVERSATION_SCHEMA, POST_SCHEMA, QUARANTINE_SCHEMA

    data_dir = data_dir_of(path)
    new_events = load_deletion_events(deletions_file)
    # The lists applied before are honoured again: one recorded under older rules, or a quarantine written
    # before it was screened, is brought in line too (what is already gone is not counted twice).
    deletions = Deletions.from_events(recorded_deletion_events(data_dir) + new_events)
    stats = json.loads((data_dir / "stats.json").read_text())
    min_chars = stats.get("dedup_min_chars", 20)
    min_turns = min_turns or stats.get("min_turns", 2)

    posts = pq.read_table(data_dir / "posts.parquet")
    ids = posts.column("id").to_pylist()
    authors = posts.column("author_id").to_pylist()
    texts = posts.column("text").to_pylist()
    removed = {i for i, (pid, author) in enumerate(zip(ids, authors))
               if pid in deletions.posts or author in deletions.accounts}
    new_tombstones = {exact_hash(texts[i]) for i in removed if len(normalised(texts[i])) >= min_chars}
    copies = {i for i, t in enumerate(texts) if i not in removed and len(normalised(t)) >= min_chars
              and exact_hash(t) in new_tombstones}
    removed |= copies
    removed_ids = {ids[i] for i in removed}
    deleted_texts = [texts[i] for i in sorted(removed)]
    gone = deletions.posts | removed_ids
    keep = pa.array([i not in removed for i in range(len(ids))])
    kept_posts = posts.filter(keep)
    new_root = _roots_after_cut(kept_posts, gone)
    columns = {}
    for name in kept_posts.column_names:
        column = kept_posts.column(name)
        if name in ("in_reply_to_id", "quoted_id", "conversation_id"):
            column = pa.array([None if v in gone else v for v in column.to_pylist()], type=pa.string())
        elif name == "root_id":
            column = pa.array([new_root.get(pid, root) for pid, root in
                               zip(kept_posts.column("id").to_pylist(), column.to_pylist())], type=pa.string())
        columns[name] = column
    kept_posts = pa.table(columns, schema=posts.schema if posts.schema.equals(POST_SCHEMA) else None)
    text_of = dict(zip(ids, texts))

    author_of = dict(zip(ids, authors))
    root_of = dict(zip(kept_posts.column("id").to_pylist(), kept_posts.column("root_id").to_pylist()))

    conversations = pq.read_table(data_dir / "conversations.parquet").to_pylist()
    rebuilt, pieces, cut = [], [], 0
    for conv in conversations:
        if not gone.intersection(conv["post_ids"]):
            rebuilt.append(conv)
            continue
        cut += 1
        # Cut at every deleted post, as a build would have: a merged turn may be split in two.
        pieces += _cut_conversation(conv, gone, author_of, text_of, root_of, min_turns)
    rebuilt += _as_built(pieces, rebuilt)
    quarantine_path = data_dir / "quarantine.parquet"
    quarantine = pq.read_table(quarantine_path).to_pylist() if quarantine_path.is_file() else []
    quarantine_kept, unquarantined, redacted = screen_quarantine(
        quarantine, gone | deleted_post_ids(data_dir), deletions.accounts,
        tombstone_hashes(data_dir) | new_tombstones, min_chars)

    # Outputs first, stats last: a crash in between leaves stats.json describing the older outputs.
    write_table_atomic(kept_posts, data_dir / "posts.parquet")
    write_table_atomic(pa.Table.from_pylist(rebuilt, schema=CONVERSATION_SCHEMA), data_dir / "conversations.parquet")
    write_table_atomic(pa.Table.from_pylist(quarantine_kept, schema=QUARANTINE_SCHEMA), quarantine_path)
    add_tombstones(data_dir, new_tombstones)
    add_deleted_post_ids(data_dir, removed_ids)
    record_deletions(data_dir, new_events)
    canary_removed = sum(1 for i in removed if str(ids[i]).startswith("canary-"))
    stats["kept"] -= len(removed) - canary_removed
    stats["quarantined"] -= unquarantined
    stats["quarantine_reasons"] = dict(sorted(Counter(row["reason"].split(":")[0] for row in quarantine_kept).items()))
    stats["quarantine_redacted"] = stats.get("quarantine_redacted", 0) + redacted
    stats["dropped"]["deleted"] = stats["dropped"].get("deleted", 0) + len(removed) - canary_removed + unquarantined
    stats["deleted"] = stats.get("deleted", 0) + len(removed) - canary_removed + unquarantined
    split_counts = Counter(kept_posts.column("split").to_pylist())
    stats["splits"] = {name: split_counts.get(name, 0) for name in SPLITS}
    stats["conversations"] = len(rebuilt)
    summary = {"posts_removed": len(removed), "copies_removed": len(copies), "conversations_cut": cut,
               "quarantine_removed": unquarantined, "quarantine_redacted": redacted, "conversations": len(rebuilt)}
    tokens = _tokens_dir(data_dir)
    if tokens is not None:
        from murmur import shards

        summary["tokens"] = shards.purge_documents(tokens, gone)
        summary["token_problems"] = shards.audit_deletions(tokens, gone, deleted_texts)
    stats.setdefault("purges", []).append({"at": datetime.now(UTC).isoformat(timespec="seconds"),
                                           **{k: v for k, v in summary.items() if k != "token_problems"}})
    write_json_atomic(data_dir / "stats.json", stats, durable=True)
    return summary
