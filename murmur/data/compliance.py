"""The deletion feed a platform must honour: parse deletion lists, purge existing outputs, audit a run.

A deletion list is text, one event a line: `post:ID`, `account:ID`, or a bare post id; `restore post:ID` or
`restore account:ID` undoes an earlier deletion (a suspended account reinstated). Events are applied in order,
so the latest event for an id wins. Blank lines and `#` comments are ignored.

Every list a run applies is appended to data/deletions.txt, so a later `murmur data audit` re-checks all of
them. Deleted texts are never stored: data/tombstones.txt holds 64-bit hashes of their normalised text, which
lets the audit find a deleted text that came back under another id.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from murmur.data.dedup import exact_hash, normalised
from murmur.data.threads import MERGE_SEPARATOR
from murmur.errors import MurmurError
from murmur.files import write_table_atomic, write_text_atomic

DELETIONS_FILE = "deletions.txt"
TOMBSTONES_FILE = "tombstones.txt"
DELETED_POSTS_FILE = "deleted_posts.txt"  # ids removed because their account or text was deleted


@dataclass
class Deletions:
    """The post ids and account ids that must vanish."""

    posts: set[str] = field(default_factory=set)
    accounts: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.posts or self.accounts)


def parse_deletion_lines(lines, origin: str) -> Deletions:
    """Apply deletion events in order (latest wins) and return what remains deleted."""
    state: dict[tuple[str, str], bool] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        deleted = True
        words = line.split()
        if len(words) == 2 and words[0].lower() in ("delete", "restore"):
            deleted = words[0].lower() == "delete"
            line = words[1]
        elif len(words) != 1:
            raise MurmurError(f"{origin}:{number}: {raw.strip()!r} is not 'post:ID', 'account:ID', a bare id, "
                              "or 'restore post:ID'")
        kind, sep, ident = line.partition(":")
        if not sep:
            kind, ident = "post", line
        kind = kind.lower()
        if kind not in ("post", "account") or not ident:
            raise MurmurError(f"{origin}:{number}: unknown deletion kind {kind!r}; use post:ID or account:ID")
        state[(kind, ident)] = deleted
    result = Deletions()
    for (kind, ident), deleted in state.items():
        if deleted:
            (result.posts if kind == "post" else result.accounts).add(ident)
    return result


def read_deletion_text(path: str | Path) -> str:
    """The text of a deletion list, with a clear error when it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MurmurError(f"deletion list {path} not found; pass a text file with one post:ID or account:ID a line")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise MurmurError(f"deletion list {path} is not UTF-8 text") from None


def load_deletions(path: str | Path | None) -> Deletions:
    """Parse a deletion list file (None gives an empty list)."""
    if path is None:
        return Deletions()
    return parse_deletion_lines(read_deletion_text(path).splitlines(), str(path))


def record_deletions(data_dir: Path, text: str) -> None:
    """Append an applied deletion list to the run's record (rewritten atomically)."""
    target = data_dir / DELETIONS_FILE
    previous = target.read_text(encoding="utf-8") if target.is_file() else ""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    write_text_atomic(target, previous + f"# applied {stamp}\n" + text.rstrip("\n") + "\n")


def recorded_deletions(data_dir: Path) -> Deletions:
    """Every deletion list the run has applied, combined in order."""
    path = data_dir / DELETIONS_FILE
    return parse_deletion_lines(path.read_text(encoding="utf-8").splitlines(), str(path)) if path.is_file() \
        else Deletions()


def deleted_post_ids(data_dir: Path) -> set[str]:
    """Ids the run removed for a deleted account or a copied deleted text (later stages must drop them too)."""
    path = data_dir / DELETED_POSTS_FILE
    return set(path.read_text(encoding="utf-8").split()) if path.is_file() else set()


def add_deleted_post_ids(data_dir: Path, ids) -> None:
    merged = deleted_post_ids(data_dir) | set(ids)
    write_text_atomic(data_dir / DELETED_POSTS_FILE, "".join(f"{i}\n" for i in sorted(merged)))


def tombstone_hashes(data_dir: Path) -> set[int]:
    path = data_dir / TOMBSTONES_FILE
    if not path.is_file():
        return set()
    return {int(line, 16) for line in path.read_text().split() if line}


def add_tombstones(data_dir: Path, hashes) -> None:
    merged = tombstone_hashes(data_dir) | set(hashes)
    write_text_atomic(data_dir / TOMBSTONES_FILE, "".join(f"{h:016x}\n" for h in sorted(merged)))


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
        for row in pq.read_table(quarantine).to_pylist():
            if row["record_id"] in deletions.posts:
                problems.append(f"quarantine.parquet: deleted post {row['record_id']} ({row['source']}:{row['line']})")
    tokens = _tokens_dir(data_dir)
    if tokens is not None:
        from murmur import shards

        # Deleted texts are never kept, so the token audit checks ids; purge passes texts while it has them.
        problems += [f"tokens: {p}" for p in shards.audit_deletions(tokens, gone, [])]
    return problems


def _roots_after_cut(posts, gone: set[str]) -> dict[str, str]:
    """New thread roots for posts whose root was deleted: the earliest ancestor still present.

    Parents are followed as the build does (in_reply_to, else conversation_id); the split is not changed, so a
    cut thread stays in the split it was in."""
    ids = posts.column("id").to_pylist()
    present = set(ids)
    parent_of = {}
    for pid, reply, conv in zip(ids, posts.column("in_reply_to_id").to_pylist(),
                                posts.column("conversation_id").to_pylist()):
        parent = reply or (conv if conv != pid else None)
        if parent in present and parent not in gone:
            parent_of[pid] = parent
    result = {}
    for pid, root in zip(ids, posts.column("root_id").to_pylist()):
        if root in gone:
            node, seen = pid, {pid}
            while node in parent_of and parent_of[node] not in seen:
                node = parent_of[node]
                seen.add(node)
            result[pid] = node
    return result


def purge(path: str | Path, deletions_file: str | Path, min_turns: int | None = None) -> dict:
    """Remove newly deleted posts and accounts from an existing run's outputs without redoing the run.

    Conversations are cut where a deleted post stood; pieces shorter than the run's min_turns go. Stats are
    updated so that `in = kept + dropped + quarantined` still holds (purged posts count as dropped: deleted).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from murmur.data.records import CONVERSATION_SCHEMA, POST_SCHEMA, QUARANTINE_SCHEMA
    from murmur.data.threads import conversation_id

    data_dir = data_dir_of(path)
    text = read_deletion_text(deletions_file)
    deletions = parse_deletion_lines(text.splitlines(), str(deletions_file))
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

    conversations = pq.read_table(data_dir / "conversations.parquet").to_pylist()
    rebuilt, cut = [], 0
    for conv in conversations:
        if not gone.intersection(conv["post_ids"]):
            rebuilt.append(conv)
            continue
        cut += 1
        # Cut at every deleted post (as a build would have): a merged turn may be split in two.
        segments, current = [], []
        for turn in conv["turns"]:
            kept_ids: list[str] = []
            for pid in turn["post_ids"] + [None]:
                if pid is not None and pid not in gone:
                    kept_ids.append(pid)
                    continue
                if kept_ids:
                    current.append({"speaker": turn["speaker"], "post_ids": kept_ids,
                                    "text": MERGE_SEPARATOR.join(text_of[k] for k in kept_ids)})
                    kept_ids = []
                if pid is not None:
                    segments.append(current)
                    current = []
        segments.append(current)
        for turns in segments:
            if len(turns) >= min_turns:
                post_ids = [pid for t in turns for pid in t["post_ids"]]
                root = conv["root_id"] if conv["root_id"] not in gone else new_root.get(post_ids[0], post_ids[0])
                rebuilt.append({"id": conversation_id(post_ids), "root_id": root, "split": conv["split"],
                                "turns": turns, "post_ids": post_ids})
    quarantine_path = data_dir / "quarantine.parquet"
    quarantine = pq.read_table(quarantine_path).to_pylist() if quarantine_path.is_file() else []
    quarantine_kept = [row for row in quarantine if row["record_id"] not in deletions.posts]
    unquarantined = len(quarantine) - len(quarantine_kept)

    # Outputs first, stats last: a crash in between leaves stats.json describing the older outputs.
    write_table_atomic(kept_posts, data_dir / "posts.parquet")
    write_table_atomic(pa.Table.from_pylist(rebuilt, schema=CONVERSATION_SCHEMA), data_dir / "conversations.parquet")
    write_table_atomic(pa.Table.from_pylist(quarantine_kept, schema=QUARANTINE_SCHEMA), quarantine_path)
    add_tombstones(data_dir, new_tombstones)
    add_deleted_post_ids(data_dir, removed_ids)
    record_deletions(data_dir, text)
    canary_removed = sum(1 for i in removed if str(ids[i]).startswith("canary-"))
    stats["kept"] -= len(removed) - canary_removed
    stats["quarantined"] -= unquarantined
    stats["dropped"]["deleted"] = stats["dropped"].get("deleted", 0) + len(removed) - canary_removed + unquarantined
    stats["deleted"] = stats.get("deleted", 0) + len(removed) - canary_removed + unquarantined
    split_counts = Counter(kept_posts.column("split").to_pylist())
    stats["splits"] = {name: split_counts.get(name, 0) for name in ("train", "validation", "test")}
    stats["conversations"] = len(rebuilt)
    summary = {"posts_removed": len(removed), "copies_removed": len(copies), "conversations_cut": cut,
               "quarantine_removed": unquarantined, "conversations": len(rebuilt)}
    tokens = _tokens_dir(data_dir)
    if tokens is not None:
        from murmur import shards

        summary["tokens"] = shards.purge_documents(tokens, gone)
        summary["token_problems"] = shards.audit_deletions(tokens, gone, deleted_texts)
    stats.setdefault("purges", []).append({"at": datetime.now(UTC).isoformat(timespec="seconds"),
                                           **{k: v for k, v in summary.items() if k != "token_problems"}})
    write_text_atomic(data_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return summary
