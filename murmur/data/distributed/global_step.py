"""The global step on a Ray cluster, with the local executor's rules and outputs, the rows never in the driver.

Every post is named by `order` (its place in the input) and carries its hashes. In turn:

  by id hash      duplicate ids (the first in input order stays), deletions (a broadcast of deleted hashes)
  by text hash    other accounts' copies of deleted texts (the tombstones, broadcast), author-repeat spam,
                  exact duplicates (the earliest by (time, order) stays)
  by band key     near-duplicate links, union-find per partition; one task merges the forests
  by post/parent  thread roots by pointer doubling, a lookup join per round, as many rounds as the local step
  by task group   each group of read tasks writes its posts in input order (a part file), sends thread rows
                  by root and authors of dropped posts by author; quarantined records are screened per group
  by root         conversations, a bucket of whole trees at a time (a part file)

Each step is a Ray task run by shuffle.run_step: its table inputs are slices of the files the step before it
wrote (a Gather each), and it returns a list: first the lists of tables it sends on (each written to one file,
a record batch per destination), then a small summary. The driver holds one object per task, per-group counts,
the tombstones and the ids deleted with an account or a deleted text (both bounded by the deletions); it
fetches no rows, and one task copies the part files into the outputs a row group at a time (parts).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from murmur.data.batch import SURVIVOR_SCHEMA, band_column, id_hash
from murmur.data.dedup import first_occurrence
from murmur.data.distributed.components import merge_forests, partition_forest
from murmur.data.distributed.parts import part_path, write_part
from murmur.data.distributed.reading import ORDER_BITS, task_names
from murmur.data.distributed.shuffle import concat, split_by

DUPLICATE_ID, DELETED, DELETED_COPY, AUTHOR_REPEAT, DUPLICATE, NEAR_DUPLICATE = range(1, 7)
REASON_NAMES = ["", "duplicate_id", "deleted", "deleted", "author_repeat", "duplicate", "near_duplicate"]
META_SCHEMA = pa.schema([("order", pa.int64()), ("id_hash", pa.uint64()), ("parent_hash", pa.uint64()),
                         ("author_hash", pa.uint64()), ("exact", pa.uint64()), ("dedupable", pa.bool_()),
                         ("time", pa.int64()), ("reason", pa.int8())])
POINTER_SCHEMA = pa.schema([("node", pa.int64()), ("pointer", pa.int64())])
PARENT_SCHEMA = pa.schema([("node", pa.int64()), ("parent_hash", pa.uint64())])
ID_SCHEMA = pa.schema([("id_hash", pa.uint64()), ("node", pa.int64())])
BAND_SCHEMA = pa.schema([("band", pa.int64()), ("key", pa.uint64()), ("order", pa.int64()), ("time", pa.int64())])
CANDIDATE_SCHEMA = pa.schema([("order", pa.int64()), ("time", pa.int64())])
REASON_SCHEMA = pa.schema([("order", pa.int64()), ("reason", pa.int8())])
ORDER_ID_SCHEMA = pa.schema([("order", pa.int64()), ("id", pa.string())])
ROOT_SCHEMA = pa.schema([("order", pa.int64()), ("root_id", pa.string())])
THREAD_SCHEMA = pa.schema([("id", pa.string()), ("parent_id", pa.string()), ("author_id", pa.string()),
                           ("text", pa.string()), ("root_id", pa.string()), ("time", pa.int64()),
                           ("order", pa.int64())])
AUTHOR_SCHEMA = pa.schema([("author", pa.string()), ("count", pa.int64())] +
                          [(f"seen{i}", pa.int64()) for i in range(4)])
MAX_DOUBLINGS = 64  # as the local step: 2**64 levels is deeper than any thread; also ends reply cycles


def task_of(orders: np.ndarray) -> np.ndarray:
    return np.asarray(orders, dtype=np.int64) >> ORDER_BITS


def group_of_tasks(tasks: np.ndarray, n_tasks: int, groups: int) -> np.ndarray:
    """Groups are contiguous runs of read tasks, so groups in order are the input in order."""
    return np.asarray(tasks, dtype=np.int64) * groups // max(1, n_tasks)


def group_tasks(n_tasks: int, groups: int) -> list[list[int]]:
    owner = group_of_tasks(np.arange(n_tasks), n_tasks, groups)
    return [np.flatnonzero(owner == g).tolist() for g in range(groups)]


def _split_by_group(table: pa.Table, n_tasks: int, groups: int) -> list[pa.Table]:
    owner = group_of_tasks(task_of(table.column("order").to_numpy()), n_tasks, groups)
    order = np.argsort(owner, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=groups))))
    ordered = table.take(pa.array(order))
    return [ordered.slice(bounds[g], bounds[g + 1] - bounds[g]) for g in range(groups)]


def _map_table(folder: Path, task: int, columns: list[str]) -> pa.Table:
    return pq.read_table(folder / task_names(task)[0], columns=columns)


def _sorted(table: pa.Table, column: str = "order") -> pa.Table:
    return table.take(pa.array(np.argsort(table.column(column).to_numpy(), kind="stable")))


# -- worker functions (each a Ray task through shuffle.run_step; tables in, lists of tables out) ------------

def scatter_meta(folder: str, tasks: list[int], parts: int) -> list:
    columns = ["order", "id_hash", "parent_hash", "author_hash", "exact", "dedupable", "time"]
    tables = [_map_table(Path(folder), t, columns) for t in tasks]
    table = concat(tables, META_SCHEMA.remove(META_SCHEMA.get_field_index("reason")))
    table = table.append_column("reason", pa.array(np.zeros(table.num_rows, np.int8)))
    return [split_by(table, "id_hash", parts)]


def reduce_ids(deleted_posts: np.ndarray, deleted_accounts: np.ndarray, table: pa.Table) -> list:
    """Duplicate ids and deletions; the partition and the tombstones of its deleted texts."""
    table = _sorted(concat([table], META_SCHEMA))
    reason = table.column("reason").to_numpy().copy()
    reason[(reason == 0) & ~first_occurrence(table.column("id_hash").to_numpy())] = DUPLICATE_ID
    deleted = np.isin(table.column("id_hash").to_numpy(), deleted_posts) | \
        np.isin(table.column("author_hash").to_numpy(), deleted_accounts)
    reason[(reason == 0) & deleted] = DELETED
    dedupable = table.column("dedupable").to_numpy(zero_copy_only=False)
    tombstones = np.unique(table.column("exact").to_numpy()[deleted & dedupable])
    return [_with_reason(table, reason), tombstones]


def scatter_exact(tombstones: np.ndarray, parts: int, table: pa.Table) -> list:
    reason = table.column("reason").to_numpy().copy()
    dedupable = table.column("dedupable").to_numpy(zero_copy_only=False)
    reason[(reason == 0) & dedupable & np.isin(table.column("exact").to_numpy(), tombstones)] = DELETED_COPY
    return [split_by(_with_reason(table, reason), "exact", parts)]


def reduce_exact(max_author_repeats: int, table: pa.Table) -> list:
    """Author-repeat spam, then exact duplicates keeping the earliest (by time, then input order)."""
    table = _sorted(concat([table], META_SCHEMA))
    reason = table.column("reason").to_numpy().copy()
    dedupable = table.column("dedupable").to_numpy(zero_copy_only=False)
    exact = table.column("exact").to_numpy()
    candidates = np.flatnonzero((reason == 0) & dedupable)
    with np.errstate(over="ignore"):
        pair = table.column("author_hash").to_numpy() * np.uint64(0x9E3779B97F4A7C15) ^ exact
    _, inverse, counts = np.unique(pair[candidates], return_inverse=True, return_counts=True)
    reason[candidates[counts[inverse.reshape(-1)] > max_author_repeats]] = AUTHOR_REPEAT
    order = np.lexsort((table.column("order").to_numpy(), table.column("time").to_numpy()))
    order = order[((reason == 0) & dedupable)[order]]
    reason[order[~first_occurrence(exact[order])]] = DUPLICATE
    return [_with_reason(table, reason)]


def near_candidates(n_tasks: int, groups: int, table: pa.Table) -> list:
    reason = table.column("reason").to_numpy()
    live = (reason == 0) & table.column("dedupable").to_numpy(zero_copy_only=False)
    chosen = table.filter(pa.array(live)).select(["order", "time"])
    return [_split_by_group(chosen, n_tasks, groups)]


def band_links(folder: str, tasks: list[int], bands: int, parts: int, candidates: pa.Table) -> list:
    """Every candidate's band keys, sent to the partition of (band, key)."""
    candidates = _sorted(concat([candidates], CANDIDATE_SCHEMA))
    names = [band_column(b) for b in range(bands)]
    pieces = []
    for task in tasks:
        table = _map_table(Path(folder), task, ["order", *names])
        chosen = np.isin(table.column("order").to_numpy(), candidates.column("order").to_numpy())
        if not chosen.any():
            continue
        table = table.filter(pa.array(chosen))
        orders = table.column("order").to_numpy()
        times = candidates.column("time").to_numpy()[np.searchsorted(candidates.column("order").to_numpy(), orders)]
        for b, name in enumerate(names):
            pieces.append(pa.table({"band": np.full(orders.size, b, np.int64), "key": table.column(name),
                                    "order": orders, "time": times}, schema=BAND_SCHEMA))
    links = concat(pieces, BAND_SCHEMA)
    with np.errstate(over="ignore"):
        keys = links.column("key").to_numpy() ^ (links.column("band").to_numpy().astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93))
    return [split_by(links, "key", parts, keys=keys)]


def bucket_forest(table: pa.Table) -> tuple:
    """Union-find over this partition's buckets: each post linked to its bucket's earliest post."""
    table = concat([table], BAND_SCHEMA)
    band, key = table.column("band").to_numpy(), table.column("key").to_numpy()
    order, time = table.column("order").to_numpy(), table.column("time").to_numpy()
    ranked = np.lexsort((order, time, key, band))
    band, key, order, time = band[ranked], key[ranked], order[ranked], time[ranked]
    starts = np.ones(order.size, dtype=bool)
    starts[1:] = (band[1:] != band[:-1]) | (key[1:] != key[:-1])
    head = np.maximum.accumulate(np.where(starts, np.arange(order.size), 0)) if order.size else order
    linked = ~starts
    return partition_forest(order[linked], order[head[linked]], time[linked], time[head[linked]])


def merge_near(*forests) -> np.ndarray:
    return merge_forests(list(forests))


def apply_near(near: np.ndarray, table: pa.Table) -> list:
    reason = table.column("reason").to_numpy().copy()
    reason[(reason == 0) & np.isin(table.column("order").to_numpy(), near)] = NEAR_DUPLICATE
    return [_with_reason(table, reason)]


def scatter_kept(parts: int, table: pa.Table) -> list:
    """Kept posts: (post, parent hash) to the parent's partition, (id hash, post) to its own."""
    kept = table.filter(pa.array(table.column("reason").to_numpy() == 0))
    requests = pa.table({"node": kept.column("order"), "parent_hash": kept.column("parent_hash")}, schema=PARENT_SCHEMA)
    values = pa.table({"id_hash": kept.column("id_hash"), "node": kept.column("order")}, schema=ID_SCHEMA)
    return [split_by(requests, "parent_hash", parts), split_by(values, "id_hash", parts)]


def resolve_parents(parts: int, requests: pa.Table, values: pa.Table) -> list:
    """Each kept post's pointer: its kept parent, else itself."""
    requests, values = concat([requests], PARENT_SCHEMA), concat([values], ID_SCHEMA)
    nodes, parents = requests.column("node").to_numpy(), requests.column("parent_hash").to_numpy()
    hashes, owners = values.column("id_hash").to_numpy(), values.column("node").to_numpy()
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    position = np.clip(np.searchsorted(sorted_hashes, parents), 0, max(0, hashes.size - 1))
    found = (parents != 0) & (hashes.size > 0) & (sorted_hashes[position] == parents if hashes.size else False)
    pointer = np.where(found, owners[order][position] if hashes.size else nodes, nodes)
    return [split_by(pa.table({"node": nodes, "pointer": pointer}, schema=POINTER_SCHEMA), "node", parts)]


def pointer_requests(parts: int, table: pa.Table) -> list:
    """A round of pointer doubling, first half: ask each pointer's partition for the pointer's pointer."""
    return [split_by(concat([table], POINTER_SCHEMA), "pointer", parts)]


def pointer_answers(parts: int, requests: pa.Table, values: pa.Table) -> list:
    """Second half: answer from this partition's pointers (`values`, what its first half was given); also
    whether any pointer moved."""
    requests = concat([requests], POINTER_SCHEMA)
    values = _sorted(concat([values], POINTER_SCHEMA), "node")
    targets = requests.column("pointer").to_numpy()
    following = values.column("pointer").to_numpy()[np.searchsorted(values.column("node").to_numpy(), targets)] \
        if targets.size else targets
    moved = bool((following != targets).any())
    answered = pa.table({"node": requests.column("node"), "pointer": following}, schema=POINTER_SCHEMA)
    return [split_by(answered, "node", parts), moved]


def root_requests(parts: int, table: pa.Table) -> list:
    return [split_by(concat([table], POINTER_SCHEMA), "pointer", parts)]


def id_values(folder: str, tasks: list[int], parts: int) -> list:
    tables = [_map_table(Path(folder), t, ["order", "id"]) for t in tasks]
    return [split_by(concat(tables, ORDER_ID_SCHEMA), "order", parts)]


def root_ids(n_tasks: int, groups: int, requests: pa.Table, values: pa.Table) -> list:
    """Each kept post's root, as the root's id, sent to the post's task group."""
    requests = concat([requests], POINTER_SCHEMA)
    values = _sorted(concat([values], ORDER_ID_SCHEMA))
    at = np.searchsorted(values.column("order").to_numpy(), requests.column("pointer").to_numpy())
    table = pa.table({"order": requests.column("node"), "root_id": values.column("id").take(pa.array(at))},
                     schema=ROOT_SCHEMA)
    return [_split_by_group(table, n_tasks, groups)]


def reasons_by_group(n_tasks: int, groups: int, table: pa.Table) -> list:
    return [_split_by_group(table.select(["order", "reason"]), n_tasks, groups)]


def deleted_ids(folder: str, tasks: list[int], reasons: pa.Table) -> list[str]:
    """Ids removed with a deleted account or as a copy of a deleted text (the deletion list names the rest)."""
    reasons = concat([reasons], REASON_SCHEMA)
    gone = reasons.filter(pa.array(np.isin(reasons.column("reason").to_numpy(), [DELETED, DELETED_COPY])))
    found = []
    for task in tasks:
        table = _map_table(Path(folder), task, ["order", "id"])
        found += table.filter(pa.array(np.isin(table.column("order").to_numpy(),
                                                gone.column("order").to_numpy()))).column("id").to_pylist()
    return found


def finish_group(folder: str, group: int, tasks: list[int], settings_json: str, gone: set[str],
                 accounts: set[str], tombstones: set[int], parts: int, reasons: pa.Table, roots: pa.Table) -> list:
    """A group's outputs: its posts in input order and its screened quarantine, written as part files; its
    thread rows by root and dropped authors by author, sent on; its counts."""
    from murmur.data.compliance import screen_quarantine
    from murmur.data.pii import PiiDetector
    from murmur.data.threads import kept_parent, without_deleted
    from murmur.data.records import POST_SCHEMA, QUARANTINE_SCHEMA
    from murmur.data.split import split_of
    from murmur.settings.data import DataSettings

    settings = DataSettings.model_validate_json(settings_json)
    folder = Path(folder)
    reasons = _sorted(concat([reasons], REASON_SCHEMA))
    roots = _sorted(concat([roots], ROOT_SCHEMA))
    stats = {"n_in": 0, "dropped": Counter(), "in_by_source": Counter(), "splits": Counter(), "kept": 0,
             "quarantine_reasons": Counter(), "quarantined": 0, "unquarantined": 0, "redacted": 0}
    posts, threads, authors, quarantine = [], [], [], []
    for task in tasks:
        summary = json.loads((folder / task_names(task)[1]).read_text())
        stats["n_in"] += summary["n_in"]
        stats["dropped"].update(summary["dropped"])
        stats["in_by_source"].update(summary["in_by_source"])
        quarantine += summary["quarantine"]
        for author, count, seen in summary["dropped_authors"]:
            authors.append((author, count, *seen))
        table = _map_table(folder, task, [*SURVIVOR_SCHEMA.names, "order"])
        orders = table.column("order").to_numpy()
        reason = reasons.column("reason").to_numpy()[np.searchsorted(reasons.column("order").to_numpy(), orders)] \
            if orders.size else np.zeros(0, np.int8)
        for code in np.unique(reason[reason > 0]):
            stats["dropped"][REASON_NAMES[code]] += int((reason == code).sum())
        for author, order in zip(table.column("author_id").filter(pa.array(reason > 0)).to_pylist(),
                                 orders[reason > 0].tolist()):
            authors.append((author, 1, 1, order, 0, 0))
        table = table.filter(pa.array(reason == 0))
        if not table.num_rows:
            continue
        at = np.searchsorted(roots.column("order").to_numpy(), table.column("order").to_numpy())
        root_ids = roots.column("root_id").take(pa.array(at)).to_pylist()
        splits = [split_of(root, settings.validation_fraction, settings.test_fraction, settings.seed)
                  for root in root_ids]
        stats["splits"].update(splits)
        stats["kept"] += table.num_rows
        post_ids = table.column("id").to_pylist()
        parent_ids = [kept_parent(pid, parent, conv, root) for pid, parent, conv, root in
                      zip(post_ids, table.column("in_reply_to_id").to_pylist(),
                          table.column("conversation_id").to_pylist(), root_ids)]
        posts.append(pa.table({
            "id": table.column("id"), "author_id": table.column("author_id"), "text": table.column("text"),
            "created_at": table.column("created_at"), "lang": table.column("lang"),
            "conversation_id": without_deleted(table.column("conversation_id"), gone),
            "in_reply_to_id": without_deleted(table.column("in_reply_to_id"), gone),
            "split": pa.array(splits, pa.string()), "source": table.column("source"),
            "root_id": pa.array(root_ids, pa.string()), "quoted_id": without_deleted(table.column("quoted_id"), gone),
        }, schema=POST_SCHEMA))
        threads.append(pa.table({"id": table.column("id"), "parent_id": pa.array(parent_ids, pa.string()),
                                 "author_id": table.column("author_id"), "text": table.column("text"),
                                 "root_id": pa.array(root_ids, pa.string()), "time": table.column("time"),
                                 "order": table.column("order")}, schema=THREAD_SCHEMA))
    quarantine = [{k: row.get(k) for k in QUARANTINE_SCHEMA.names} for row in quarantine]
    # Screened like the local step does it: deleted records leave, identified records keep no snippet.
    kept_rows, removed, redacted = screen_quarantine(quarantine, gone, accounts, tombstones, settings.dedup_min_chars)
    detector = PiiDetector.from_settings(settings)
    kept_rows = [row | {"raw": detector.scrub(row["raw"])[0]} if row.get("raw") else row for row in kept_rows]
    stats["quarantine_reasons"].update(row["reason"].split(":")[0] for row in kept_rows)
    stats["quarantined"], stats["unquarantined"], stats["redacted"] = len(kept_rows), removed, redacted
    thread_table = concat(threads, THREAD_SCHEMA)
    thread_keys = np.array([id_hash(r) for r in thread_table.column("root_id").to_pylist()], dtype=np.uint64)
    author_table = pa.table({"author": [a[0] for a in authors], "count": [a[1] for a in authors],
                             **{f"seen{i}": [a[2 + i] for a in authors] for i in range(4)}}, schema=AUTHOR_SCHEMA)
    author_keys = np.array([id_hash(a) for a in author_table.column("author").to_pylist()], dtype=np.uint64)
    write_part(part_path(folder, "posts", group), POST_SCHEMA, posts)
    write_part(part_path(folder, "quarantine", group), QUARANTINE_SCHEMA,
               [pa.Table.from_pylist(kept_rows, schema=QUARANTINE_SCHEMA)])
    return [split_by(thread_table, "root_id", parts, keys=thread_keys),
            split_by(author_table, "author", parts, keys=author_keys),
            {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}]


def conversations(folder: str, partition: int, settings_json: str, threads: pa.Table) -> tuple:
    """The conversations of whole trees (every post of a root is in this partition), written as a part file;
    (conversations, turns, conversations by split)."""
    from murmur.data.records import CONVERSATION_SCHEMA
    from murmur.data.threads import bucket_conversations
    from murmur.settings.data import DataSettings

    settings = DataSettings.model_validate_json(settings_json)
    table = concat([threads], THREAD_SCHEMA).sort_by([("root_id", "ascending"), ("time", "ascending"),
                                                   ("order", "ascending")])
    table = table.drop_columns(["time", "order"]).append_column("order", pa.array(np.arange(table.num_rows)))
    rows, turns, splits = bucket_conversations(table, settings)
    written = write_part(part_path(folder, "conversations", partition), CONVERSATION_SCHEMA,
                         [pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA)])
    return written, turns, dict(splits)


def top_authors(limit: int, authors: pa.Table) -> list:
    """The authors with most dropped posts here, ties to the one dropped first (as Counter.most_common)."""
    table = concat([authors], AUTHOR_SCHEMA)
    totals: dict[str, list] = {}
    for row in table.to_pylist():
        seen = (row["seen0"], row["seen1"], row["seen2"], row["seen3"])
        entry = totals.setdefault(row["author"], [0, seen])
        entry[0] += row["count"]
        entry[1] = min(entry[1], seen)
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[1][1]))[:limit]
    return [(author, count, seen) for author, (count, seen) in ranked]


def _with_reason(table: pa.Table, reason: np.ndarray) -> pa.Table:
    return table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason, pa.int8()))
