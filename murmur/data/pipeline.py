"""The data stage: read every source, run the per-batch step on an executor, then the global step.

    read (driver, streaming) -> per batch: clean, filter, fingerprint (executor) -> spill to .work/
    global: duplicate ids, deletions, author-repeat spam, exact and near dedup, thread roots, split
    write: posts.parquet, conversations.parquet, quarantine.parquet, canaries.json, stats.json (last)

Memory is bounded by the batch size and the in-flight window, except for the per-post hashes of the global
step (about 200 bytes a post). A crashed run leaves no stats.json; rerunning reuses the spilled batches of
the same inputs and settings and redoes the rest.

With `executor = "ray"` the read, the per-batch step and the global step all run on the cluster, with these
rules and outputs (murmur.data.distributed); this module then only publishes what it staged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import murmur
from murmur.data import canaries as canary_module
from murmur.data.batch import SURVIVOR_SCHEMA, BatchResult, band_column
from murmur.data.compliance import (
    DELETED_POSTS_FILE,
    TOMBSTONES_FILE,
    Deletions,
    add_deleted_post_ids,
    add_tombstones,
    load_deletion_events,
    record_deletions,
    recorded_deletion_events,
    screen_quarantine,
)
from murmur.data.dedup import bucket_links, first_occurrence, min_label_components
from murmur.data.executors import make_executor
from murmur.data.pii import PiiDetector
from murmur.data.progress import Progress
from murmur.data.records import (
    CONVERSATION_SCHEMA,
    POST_SCHEMA,
    QUARANTINE_SCHEMA,
    SPLITS,
)
from murmur.data.sources import FileReader, SourceFile, archive_deletion_events, resolve_sources
from murmur.data.split import split_of
from murmur.data.threads import bucket_conversations, kept_parent, without_deleted
from murmur.errors import MurmurError
from murmur.files import atomic_path, move_atomic, write_json_atomic, write_table_atomic
from murmur.fingerprint import digest, settings_by_key
from murmur.settings.data import DataSettings

PIPELINE_VERSION = 1
# Settings that change where or how fast the work runs, not what it produces.
EXECUTION_ONLY = {"executor", "address", "workers", "split_bytes", "partitions"}
# Settings the per-batch step does not read: changing them reuses spilled batches.
GLOBAL_ONLY = {"deletions", "max_author_repeats", "min_turns", "max_turns", "max_paths_per_tree",
               "validation_fraction", "test_fraction", "canaries", "canary_repeats"}
POSTS_PER_BUCKET = 50_000  # thread building holds one bucket of posts (grouped by root) at a time


def run_stage(settings, run_dir: str | Path) -> dict:
    """The build runner's entry point: curate `settings.data.sources` into RUN_DIR/data; the funnel's key figures."""
    stats = run(settings.data, Path(run_dir) / "data")
    return {key: stats[key] for key in ("in", "kept", "quarantined", "duplicates", "deleted", "conversations",
                                        "splits", "canaries_planted", "elapsed_s") if key in stats} | \
        {"dropped": sum(stats["dropped"].values()), "up_to_date": bool(stats.get("up_to_date"))}


def run(settings: DataSettings, out: str | Path, progress: bool | None = None) -> dict:
    """Curate the sources named in `settings` into `out`; returns the stats written to out/stats.json."""
    started = time.perf_counter()
    out = Path(out)
    sources = resolve_sources(settings.sources)  # a missing file is an error before any work
    # Deletions are for ever: a rebuild honours every list this output folder ever applied (purges included).
    recorded = recorded_deletion_events(out)
    new_events = load_deletion_events(settings.deletions) if settings.deletions else []
    # An archive's deleted-tweets.js lists posts its owner deleted: they are deletions like any other.
    new_events += archive_deletion_events(sources, settings.max_json_depth)
    deletions = Deletions.from_events(recorded + new_events)
    batch_fp = _fingerprint(settings, sources, exclude=EXECUTION_ONLY | GLOBAL_ONLY)
    full_fp = _fingerprint(settings, sources, exclude=EXECUTION_ONLY | {"deletions"},
                           extra=json.dumps([sorted(deletions.posts), sorted(deletions.accounts)]))
    previous = _read_stats(out)
    if previous and previous.get("fingerprint") == full_fp:
        return previous | {"up_to_date": True}
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".work-{batch_fp[:16]}"
    for stale in out.glob(".work-*"):
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(exist_ok=True)

    line = Progress(sum(s.size() for s in sources), show=progress)
    try:
        if settings.executor == "ray":
            from murmur.data.distributed.driver import run_ray

            stats = run_ray(settings, sources, work, deletions, line)
        else:
            n_batches = _run_batches(settings, sources, work, line)
            line.stage("dedup, deletions, threads")
            stats = _global_step(settings, work, n_batches, deletions)
    finally:
        line.close()
    stats.update({"fingerprint": full_fp, "executor": settings.executor, "sources": [s.label for s in sources],
                  "dedup_min_chars": settings.dedup_min_chars, "min_turns": settings.min_turns})
    elapsed = time.perf_counter() - started
    stats["elapsed_s"] = round(elapsed, 3)
    stats["posts_per_s"] = round(stats["in"] / elapsed, 1) if elapsed > 0 else None
    _check_accounting(stats)

    # Publish: stats.json goes last, so a crash before it leaves no output that looks complete.
    (out / "stats.json").unlink(missing_ok=True)
    for name in ("posts.parquet", "conversations.parquet", "quarantine.parquet", "canaries.json"):
        staged = work / name
        if staged.exists():
            move_atomic(staged, out / name)
        elif (out / name).exists():
            (out / name).unlink()
    (out / TOMBSTONES_FILE).unlink(missing_ok=True)
    (out / DELETED_POSTS_FILE).unlink(missing_ok=True)
    # Record the list when it changes what is deleted (a text search would take `post:12` as already
    # recorded because `post:123` is).
    if new_events and Deletions.from_events(recorded) != deletions:
        record_deletions(out, new_events)
    add_tombstones(out, stats.pop("_tombstones"))
    add_deleted_post_ids(out, stats.pop("_deleted_ids"))
    write_json_atomic(out / "stats.json", stats, durable=True)
    shutil.rmtree(work, ignore_errors=True)
    return stats


def _fingerprint(settings: DataSettings, sources: list[SourceFile], exclude: set[str], extra: str = "") -> str:
    """Every data setting but those in `exclude` (a new setting is covered without a list to edit), the
    sources' sizes and times, the code's version, and `extra`."""
    return digest({"settings": settings_by_key(settings, ignore=exclude),
                   "sources": [s.stamp() for s in sources],
                   "version": [murmur.__version__, PIPELINE_VERSION],
                   "extra": hashlib.sha256(extra.encode()).hexdigest()})


def _read_stats(out: Path) -> dict | None:
    try:
        return json.loads((out / "stats.json").read_text())
    except (OSError, ValueError):
        return None


def _check_accounting(stats: dict) -> None:
    total = stats["kept"] + sum(stats["dropped"].values()) + stats["quarantined"]
    if total != stats["in"]:
        raise MurmurError(f"internal accounting error: in={stats['in']} but kept+dropped+quarantined={total}; "
                          "please report this with the input that caused it")


# -- per-batch step ------------------------------------------------------------------------------------------

def _raw_batches(settings: DataSettings, sources: list[SourceFile], done: set[int],
                 position: list[int]) -> Iterator[tuple[int, list]]:
    """(index, records) batches in input order; batches already spilled are read past, not returned.
    position[0] follows the input bytes read, for the progress line."""
    index, batch, finished_bytes = 0, [], 0
    for source in sources:
        reader = FileReader(source, settings)
        for record in reader.records():
            batch.append(record)
            if len(batch) >= settings.batch_size:
                position[0] = finished_bytes + reader.bytes_read
                if index not in done:
                    yield index, batch
                index, batch = index + 1, []
        finished_bytes += source.size()
    position[0] = finished_bytes
    if batch and index not in done:
        yield index, batch


def _run_batches(settings: DataSettings, sources: list[SourceFile], work: Path, progress: Progress) -> int:
    """Process every batch not already spilled in `work`; returns the number of batches."""
    done = {int(p.stem.split("-")[1]) for p in work.glob("batch-*.json")}
    executor = make_executor(settings)
    position = [0]
    try:
        for result in executor.map(_raw_batches(settings, sources, done, position)):
            _spill(work, result)
            progress.advance(result.n_in, result.table.num_rows, len(result.quarantine), done_bytes=position[0])
    finally:
        executor.close()
    indices = sorted(int(p.stem.split("-")[1]) for p in work.glob("batch-*.json"))
    if indices != list(range(len(indices))):
        raise MurmurError(f"spilled batches in {work} are not contiguous; delete that folder and rerun")
    return len(indices)


def _spill(work: Path, result: BatchResult) -> None:
    """Write one batch's result: the table first, then its summary, whose presence marks it complete."""
    name = f"batch-{result.index:06d}"
    write_table_atomic(result.table, work / f"{name}.parquet")
    summary = {"n_in": result.n_in, "dropped": result.dropped, "dropped_authors": result.dropped_authors,
               "in_by_source": result.in_by_source, "quarantine": result.quarantine}
    write_json_atomic(work / f"{name}.json", summary)


# -- global step ---------------------------------------------------------------------------------------------

# What the global step holds per post (about 90 bytes plus the id); LSH bands are read a few at a time.
META_COLUMNS = ["id", "id_hash", "parent_hash", "author_hash", "exact", "dedupable", "time"]
BANDS_PER_READ = 4
# Drop reasons of the global step, in the order they are applied (deleted_copy is reported as deleted).
GLOBAL_REASONS = ["", "duplicate_id", "deleted", "deleted_copy", "author_repeat", "duplicate", "near_duplicate"]


def _global_step(settings: DataSettings, work: Path, n_batches: int, deletions: Deletions) -> dict:
    stats_in, dropped, dropped_authors, in_by_source = 0, Counter(), Counter(), Counter()
    quarantine: list[dict] = []
    metas, sizes = [], []
    for i in range(n_batches):
        summary = json.loads((work / f"batch-{i:06d}.json").read_text())
        stats_in += summary["n_in"]
        dropped.update(summary["dropped"])
        dropped_authors.update(summary["dropped_authors"])
        in_by_source.update(summary["in_by_source"])
        quarantine += summary["quarantine"]
        table = pq.read_table(work / f"batch-{i:06d}.parquet", columns=META_COLUMNS)
        metas.append(table)
        sizes.append(table.num_rows)
    meta = pa.concat_tables(metas) if metas else None
    n = meta.num_rows if meta is not None else 0
    reason = np.zeros(n, dtype=np.int8)  # 0 = kept, else an index into GLOBAL_REASONS
    tombstones: set[int] = set()
    deleted_ids: list[str] = []
    if n:
        ids = meta.column("id")
        id_hashes = meta.column("id_hash").to_numpy()
        author_hashes = meta.column("author_hash").to_numpy()
        exact = meta.column("exact").to_numpy()
        dedupable = meta.column("dedupable").to_numpy(zero_copy_only=False)
        times = meta.column("time").to_numpy()

        def drop(mask: np.ndarray, name: str) -> None:
            reason[(reason == 0) & mask] = GLOBAL_REASONS.index(name)

        drop(~first_occurrence(id_hashes), "duplicate_id")
        if deletions:
            from murmur.data.batch import id_hash

            deleted_posts = np.array(sorted(id_hash(p) for p in deletions.posts), dtype=np.uint64)
            deleted_accounts = np.array(sorted(id_hash(a) for a in deletions.accounts), dtype=np.uint64)
            deleted = np.isin(id_hashes, deleted_posts) | np.isin(author_hashes, deleted_accounts)
            drop(deleted, "deleted")
            tombstones = {int(h) for h in exact[deleted & dedupable]}
            # Another account's exact copy of a deleted text goes too: the audit promises the text is gone.
            drop(dedupable & np.isin(exact, np.array(sorted(tombstones), dtype=np.uint64)), "deleted_copy")
        live = (reason == 0) & dedupable
        pair = author_hashes * np.uint64(0x9E3779B97F4A7C15) ^ exact
        candidates = np.flatnonzero(live)
        _, inverse, counts = np.unique(pair[candidates], return_inverse=True, return_counts=True)
        spam = np.zeros(n, dtype=bool)
        spam[candidates[counts[inverse] > settings.max_author_repeats]] = True
        drop(spam, "author_repeat")
        # Keep the earliest: visit candidates by (time, input order).
        order = np.lexsort((np.arange(n), times))
        order = order[((reason == 0) & dedupable)[order]]
        duplicate = np.zeros(n, dtype=bool)
        duplicate[order[~first_occurrence(exact[order])]] = True
        drop(duplicate, "duplicate")
        if settings.near_dedup:
            # Clusters of near duplicates (posts linked through any band's bucket) keep their earliest post.
            order = order[(reason == 0)[order]]
            links_a, links_b = [], []
            for first_band in range(0, settings.minhash_bands, BANDS_PER_READ):
                names = [band_column(b) for b in range(first_band, min(settings.minhash_bands,
                                                                        first_band + BANDS_PER_READ))]
                bands = pa.concat_tables([pq.read_table(work / f"batch-{i:06d}.parquet", columns=names)
                                          for i in range(n_batches)])
                for name in names:
                    member, first = bucket_links(bands.column(name).to_numpy()[order])
                    links_a.append(member)
                    links_b.append(first)
                del bands
            labels = min_label_components(order.size, np.concatenate(links_a), np.concatenate(links_b))
            near = np.zeros(n, dtype=bool)
            near[order[labels != np.arange(order.size)]] = True
            drop(near, "near_duplicate")
        removed = np.flatnonzero(np.isin(reason, [GLOBAL_REASONS.index("deleted"),
                                                  GLOBAL_REASONS.index("deleted_copy")]))
        deleted_ids = [pid for pid in ids.take(pa.array(removed)).to_pylist() if pid not in deletions.posts]
        for code in np.unique(reason[reason > 0]):
            name = GLOBAL_REASONS[code]
            dropped["deleted" if name == "deleted_copy" else name] += int((reason == code).sum())
    keep = reason == 0
    roots = _roots(meta, keep) if n else np.zeros(0, dtype=np.int64)

    gone = deletions.posts | set(deleted_ids)  # references to these are blanked
    # The quarantine is screened like the posts: records of deleted posts, or whose snippet belongs to a
    # deletion, leave it; records whose id is known keep no snippet.
    quarantine, unquarantined, redacted = screen_quarantine(quarantine, gone, deletions.accounts, tombstones,
                                                            settings.dedup_min_chars)
    if unquarantined:
        dropped["deleted"] += unquarantined
    # A broken line is still someone's text: its snippet is scrubbed like a post before it is kept.
    detector = PiiDetector.from_settings(settings)
    quarantine = [row | {"raw": detector.scrub(row["raw"])[0]} if row.get("raw") else row for row in quarantine]
    split_counts, conversation_stats = _write_outputs(settings, work, sizes, keep, roots, meta, gone,
                                                      dropped_authors)
    canary_list = canary_module.make_canaries(settings.canaries, settings.canary_repeats, settings.seed)
    planted = sum(c.repeats for c in canary_list)
    write_table_atomic(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), work / "quarantine.parquet")
    if settings.canaries:
        write_json_atomic(work / "canaries.json", canary_module.canaries_document(canary_list, settings.seed))
    quarantine_reasons = Counter(q["reason"].split(":")[0] for q in quarantine)
    dropped_total = {k: v for k, v in sorted(dropped.items()) if v}
    return {
        "in": stats_in, "kept": int(keep.sum()), "dropped": dropped_total, "quarantined": len(quarantine),
        "quarantine_reasons": dict(sorted(quarantine_reasons.items())), "quarantine_redacted": redacted,
        "duplicates": dropped_total.get("duplicate", 0) + dropped_total.get("near_duplicate", 0)
        + dropped_total.get("duplicate_id", 0),
        "deleted": dropped_total.get("deleted", 0),
        "splits": split_counts, **conversation_stats, "canaries_planted": planted,
        "in_by_source": dict(sorted(in_by_source.items())),
        "top_dropped_authors": dropped_authors.most_common(10),
        "_tombstones": tombstones, "_deleted_ids": deleted_ids,
    }


def _roots(meta: pa.Table, keep: np.ndarray) -> np.ndarray:
    """For every post, the index of its thread root among kept posts (-1 for dropped posts).

    A post whose parent was not kept starts a thread of its own: conversations are cut where a post vanished.
    Pointer doubling finds all roots in O(log depth) vectorised passes.
    """
    n = keep.size
    kept = np.flatnonzero(keep)
    hashes = meta.column("id_hash").to_numpy()[kept]
    parents = meta.column("parent_hash").to_numpy()[kept]
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    position = np.clip(np.searchsorted(sorted_hashes, parents), 0, max(0, kept.size - 1))
    found = (parents != 0) & (kept.size > 0) & (sorted_hashes[position] == parents)
    pointer = np.where(found, order[position], np.arange(kept.size))
    for _ in range(64):  # 2**64 levels deep: more than any thread; also ends reply cycles
        following = pointer[pointer]
        if np.array_equal(following, pointer):
            break
        pointer = following
    roots = np.full(n, -1, dtype=np.int64)
    roots[kept] = kept[pointer]
    return roots


def _write_outputs(settings: DataSettings, work: Path, sizes: list[int], keep: np.ndarray, roots: np.ndarray,
                   meta: pa.Table | None, gone: set[str], dropped_authors: Counter) -> tuple[dict, dict]:
    """Stream the kept posts into posts.parquet and thread buckets, then build conversations per bucket."""
    ids = meta.column("id") if meta is not None else pa.array([], pa.string())
    kept_total = int(keep.sum())
    n_buckets = max(1, -(-kept_total // POSTS_PER_BUCKET))
    bucket_schema = pa.schema([("id", pa.string()), ("parent_id", pa.string()), ("author_id", pa.string()),
                               ("text", pa.string()), ("root_id", pa.string()), ("order", pa.int64())])
    bucket_writers = [pq.ParquetWriter(work / f"threads-{b:04d}.parquet", bucket_schema) for b in range(n_buckets)]
    split_counts = Counter()
    times = meta.column("time").to_numpy() if meta is not None else np.zeros(0, np.int64)
    rank = np.empty(times.size, dtype=np.int64)
    rank[np.lexsort((np.arange(times.size), times))] = np.arange(times.size)
    with atomic_path(work / "posts.parquet") as posts_tmp, pq.ParquetWriter(posts_tmp, POST_SCHEMA) as writer:
        start = 0
        for i, size in enumerate(sizes):
            mask = keep[start:start + size]
            if size:
                table = pq.read_table(work / f"batch-{i:06d}.parquet", columns=list(SURVIVOR_SCHEMA.names))
                dropped_authors.update(table.column("author_id").filter(pa.array(~mask)).to_pylist())
                table = table.filter(pa.array(mask))
            if mask.any():
                global_index = np.flatnonzero(mask) + start
                root_index = roots[global_index]
                root_ids = ids.take(pa.array(root_index)).to_pylist()
                splits = [split_of(root, settings.validation_fraction, settings.test_fraction, settings.seed)
                          for root in root_ids]
                split_counts.update(splits)
                post_ids = table.column("id").to_pylist()
                parents = table.column("in_reply_to_id").to_pylist()
                # The thread parent is kept only when it is the root's descendant chain (i.e. was kept).
                parent_ids = [kept_parent(pid, parent, conv, root) for pid, parent, conv, root in
                              zip(post_ids, parents, table.column("conversation_id").to_pylist(), root_ids)]
                columns = {
                    "id": table.column("id"), "author_id": table.column("author_id"), "text": table.column("text"),
                    "created_at": table.column("created_at"), "lang": table.column("lang"),
                    "conversation_id": without_deleted(table.column("conversation_id"), gone),
                    "in_reply_to_id": without_deleted(table.column("in_reply_to_id"), gone),
                    "split": pa.array(splits, pa.string()), "source": table.column("source"),
                    "root_id": pa.array(root_ids, pa.string()),
                    "quoted_id": without_deleted(table.column("quoted_id"), gone),
                }
                writer.write_table(pa.table(columns, schema=POST_SCHEMA))
                buckets = np.array([_bucket(r, n_buckets) for r in root_ids])
                thread_table = pa.table({"id": table.column("id"), "parent_id": pa.array(parent_ids, pa.string()),
                                         "author_id": table.column("author_id"), "text": table.column("text"),
                                         "root_id": pa.array(root_ids, pa.string()),
                                         "order": pa.array(rank[global_index])}, schema=bucket_schema)
                for b in range(n_buckets):
                    selected = buckets == b
                    if selected.any():
                        bucket_writers[b].write_table(thread_table.filter(pa.array(selected)))
            start += size
        canary_list = canary_module.make_canaries(settings.canaries, settings.canary_repeats, settings.seed)
        rows = canary_module.canary_rows(canary_list)
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=POST_SCHEMA))
    for bucket_writer in bucket_writers:
        bucket_writer.close()

    n_conversations = n_turns = 0
    conversation_splits = Counter()
    with atomic_path(work / "conversations.parquet") as conversations_tmp, \
            pq.ParquetWriter(conversations_tmp, CONVERSATION_SCHEMA) as writer:
        for b in range(n_buckets):
            table = pq.read_table(work / f"threads-{b:04d}.parquet").sort_by([("root_id", "ascending"),
                                                                               ("order", "ascending")])
            rows, turns, splits = bucket_conversations(table, settings)
            n_turns += turns
            conversation_splits.update(splits)
            n_conversations += len(rows)
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=CONVERSATION_SCHEMA))
            (work / f"threads-{b:04d}.parquet").unlink()
    return ({name: split_counts.get(name, 0) for name in SPLITS},
            {"conversations": n_conversations, "conversation_turns": n_turns,
             "conversation_splits": {name: conversation_splits.get(name, 0) for name in SPLITS}})


def _bucket(root_id: str, n_buckets: int) -> int:
    if n_buckets == 1:
        return 0
    return int.from_bytes(hashlib.blake2b(root_id.encode(), digest_size=4).digest(), "little") % n_buckets
