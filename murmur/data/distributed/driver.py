"""The Ray executor's driver: plan the read tasks, run them as a Ray Data pipeline on the workers, then run the
global step's shuffles (global_step) and copy each group's part files (parts) into the run's files.

Completed read tasks persist in the work folder (`ray-<plan>/map-*.{parquet,json}` and the plan in
`manifest.json`): a rerun after the driver died skips them. The work folder must be on storage every node
reads and writes (the output folder on a shared filesystem); sources likewise.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from murmur.data import canaries as canary_module
from murmur.data.batch import id_hash
from murmur.data.compliance import Deletions
from murmur.data.distributed import global_step as g
from murmur.data.distributed.parts import PARTS_FOLDER, write_outputs
from murmur.data.distributed.reading import (
    ReadTask,
    count_spans,
    line_ends_between,
    number_lines,
    plan_ranges,
    run_read_task,
    task_names,
)
from murmur.data.distributed.shuffle import call
from murmur.data.records import SPLITS
from murmur.errors import MurmurError
from murmur.files import write_json_atomic
from murmur.fingerprint import digest
from murmur.settings.data import DataSettings

POSTS_PER_PARTITION = 50_000  # what one reducer, and the driver writing one group, holds (about)
SYSTEM_CONFIG = {"max_direct_call_object_size": 1024}
TASK_RETRIES = 5  # a task lost with its worker is run again (inputs are files, so reruns are identical)


def connect(settings: DataSettings) -> bool:
    """Join the cluster at settings.address, or start a local Ray; whether this call started it."""
    try:
        import ray
    except ImportError:
        raise MurmurError("--executor ray needs Ray: pip install 'murmur[ray]'") from None
    if ray.is_initialized():
        return False
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if settings.address:
        options["address"] = settings.address
    else:
        from murmur.data.executors import cpu_count

        options["num_cpus"] = settings.workers or cpu_count()
        # Task results under this size are kept in the driver's own memory (Ray's default is 100 kB): with
        # partitions x partitions results a shuffle, that is every post's row in the driver. A cluster is
        # started with the same: ray start --system-config='{"max_direct_call_object_size": 1024}'.
        options["_system_config"] = SYSTEM_CONFIG
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise MurmurError(f"cannot start or reach Ray ({settings.address or 'local'}): {err}") from None
    return True


def run_ray(settings: DataSettings, sources, work: Path, deletions: Deletions, progress) -> dict:
    """The data stage on Ray: outputs staged in `work` as the local executor stages them; the stats."""
    import ray

    started = connect(settings)
    try:
        remote = {name: ray.remote(max_retries=TASK_RETRIES)(getattr(g, name)) for name in (
            "scatter_meta", "reduce_ids", "scatter_exact", "reduce_exact", "near_candidates", "band_links",
            "bucket_forest", "merge_near", "apply_near", "scatter_kept", "resolve_parents", "pointer_requests",
            "pointer_answers", "root_requests", "id_values", "root_ids", "reasons_by_group", "deleted_ids",
            "finish_group", "conversations", "top_authors")}
        remote["write_outputs"] = ray.remote(max_retries=TASK_RETRIES)(write_outputs)
        tasks, folder = _plan(settings, sources, work)
        _map_stage(settings, tasks, folder, progress)
        progress.stage("dedup, deletions, threads on the cluster")
        return _global(settings, remote, len(tasks), folder, work, deletions)
    finally:
        if started:
            ray.shutdown()


def _plan(settings: DataSettings, sources, work: Path) -> tuple[list[ReadTask], Path]:
    """The read tasks (byte ranges numbered by line-end counts run on workers) and their folder."""
    import ray

    tasks = plan_ranges(sources, settings.split_bytes)
    plan_id = digest({"tasks": [dataclasses.asdict(t) for t in tasks]})[:16]
    folder = work / f"ray-{plan_id}"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        import json

        return [ReadTask(**t) for t in json.loads(manifest.read_text())["tasks"]], folder
    counter = ray.remote(max_retries=TASK_RETRIES)(line_ends_between)
    counts = ray.get([counter.remote(*span) for span in count_spans(tasks)])
    tasks = number_lines(tasks, counts)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(manifest, {"tasks": [dataclasses.asdict(t) for t in tasks]}, durable=True)
    return tasks, folder


def _map_stage(settings: DataSettings, tasks: list[ReadTask], folder: Path, progress) -> None:
    """Run every read task not already complete as a Ray Data map over the task list."""
    import ray.data

    done = {t.index for t in tasks if (folder / task_names(t.index)[1]).is_file()}
    pending = [t for t in tasks if t.index not in done]
    sizes = {t.index: t.size() for t in tasks}
    progress.resumed(sum(sizes[i] for i in done))
    if pending:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        settings_json = settings.model_dump_json()

        def read(batch: dict) -> dict:
            results = [run_read_task(ReadTask(**{k: _plain(v) for k, v in row.items()}), settings_json, str(folder))
                       for row in _rows(batch)]
            return {key: np.array([r[key] for r in results]) for key in ("task", "n_in", "kept", "quarantined")}

        items = [dataclasses.asdict(t) for t in pending]
        # Ray Data runs a map task again when its worker dies (its retries are unlimited for system failures).
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(read, batch_size=1, num_cpus=1)
        for batch in dataset.iter_batches(batch_size=1, batch_format="numpy"):
            progress.advance(int(batch["n_in"][0]), int(batch["kept"][0]), int(batch["quarantined"][0]),
                             more_bytes=sizes[int(batch["task"][0])])
    missing = [t.index for t in tasks if not (folder / task_names(t.index)[1]).is_file()]
    if missing:
        raise MurmurError(f"read tasks {missing[:5]} left no output in {folder}; rerun (completed tasks are kept)")


def _rows(batch: dict):
    names = list(batch)
    for values in zip(*(batch[n] for n in names)):
        yield dict(zip(names, values))


def _plain(value):
    """A numpy scalar from a Ray batch as the Python value a ReadTask holds."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _partitions(settings: DataSettings, folder: Path, n_tasks: int) -> int:
    if settings.partitions:
        return settings.partitions
    import ray

    posts = sum(pq.ParquetFile(folder / task_names(t)[0]).metadata.num_rows for t in range(n_tasks))
    return max(1, min(int(ray.cluster_resources().get("CPU", 1)), n_tasks), -(-posts // POSTS_PER_PARTITION))


def _global(settings: DataSettings, remote: dict, n_tasks: int, folder: Path, work: Path,
            deletions: Deletions) -> dict:
    import ray

    parts = _partitions(settings, folder, n_tasks)
    group_tasks = g.group_tasks(n_tasks, parts)
    n_groups = len(group_tasks)
    dir_ = str(folder)
    shutil.rmtree(folder / PARTS_FOLDER, ignore_errors=True)  # a previous run's, perhaps of other partitions
    (folder / PARTS_FOLDER).mkdir()

    def shuffle(mapper_outputs: list[list]) -> list[list]:
        """Reducer j's inputs: the j-th output of every mapper."""
        return [[out[j] for out in mapper_outputs] for j in range(parts)]

    # Duplicate ids and deletions, by id hash.
    deleted_posts = np.array(sorted(id_hash(p) for p in deletions.posts), dtype=np.uint64)
    deleted_accounts = np.array(sorted(id_hash(a) for a in deletions.accounts), dtype=np.uint64)
    scattered = [call(remote["scatter_meta"], parts, dir_, tasks, parts) for tasks in group_tasks]
    posts_ref, accounts_ref = ray.put(deleted_posts), ray.put(deleted_accounts)
    reduced = [call(remote["reduce_ids"], 2, posts_ref, accounts_ref, *inputs) for inputs in shuffle(scattered)]
    tombstones = set()
    for _, tomb in reduced:
        tombstones.update(int(h) for h in ray.get(tomb))
    tomb_ref = ray.put(np.array(sorted(tombstones), dtype=np.uint64))
    # Copies of deleted texts, author-repeat spam and exact duplicates, by text hash.
    scattered = [call(remote["scatter_exact"], parts, tomb_ref, parts, table) for table, _ in reduced]
    meta = [call(remote["reduce_exact"], 1, settings.max_author_repeats, *inputs)[0] for inputs in shuffle(scattered)]
    if settings.near_dedup:
        candidates = [call(remote["near_candidates"], n_groups, n_tasks, n_groups, table) for table in meta]
        by_group = [[out[k] for out in candidates] for k in range(n_groups)]
        links = [call(remote["band_links"], parts, dir_, tasks, settings.minhash_bands, parts, *by_group[k])
                 for k, tasks in enumerate(group_tasks)]
        forests = [call(remote["bucket_forest"], 1, *inputs)[0] for inputs in shuffle(links)]
        near = call(remote["merge_near"], 1, *forests)[0]
        meta = [call(remote["apply_near"], 1, near, table)[0] for table in meta]
    # Thread roots by pointer doubling over kept posts.
    scattered = [call(remote["scatter_kept"], 2 * parts, parts, table) for table in meta]
    nodes = [call(remote["resolve_parents"], parts, len(scattered), parts,
                  *[out[j] for out in scattered], *[out[parts + j] for out in scattered]) for j in range(parts)]
    nodes = shuffle(nodes)
    for _ in range(g.MAX_DOUBLINGS):
        asked = [call(remote["pointer_requests"], parts + 1, parts, *inputs) for inputs in nodes]
        answers = [call(remote["pointer_answers"], parts + 1, len(asked), parts,
                        *[out[j] for out in asked], asked[j][parts]) for j in range(parts)]
        if not any(ray.get([a[parts] for a in answers])):
            break
        nodes = shuffle([a[:parts] for a in answers])
    requests = [call(remote["root_requests"], parts, parts, *inputs) for inputs in nodes]
    values = [call(remote["id_values"], parts, dir_, tasks, parts) for tasks in group_tasks]
    roots = [call(remote["root_ids"], n_groups, len(requests), n_tasks, n_groups,
                  *[out[j] for out in requests], *[out[j] for out in values]) for j in range(parts)]
    reasons = [call(remote["reasons_by_group"], n_groups, n_tasks, n_groups, table) for table in meta]
    # Ids deleted with an account or a deleted text: every group must blank references to them.
    deleted_ids = []
    for k, tasks in enumerate(group_tasks):
        deleted_ids += ray.get(call(remote["deleted_ids"], 1, dir_, tasks, *[out[k] for out in reasons])[0])
    found = [pid for pid in deleted_ids if pid not in deletions.posts]
    gone_ref = ray.put(deletions.posts | set(deleted_ids))
    accounts_set, tomb_set = ray.put(set(deletions.accounts)), ray.put(tombstones)
    settings_json = settings.model_dump_json()
    finished = [call(remote["finish_group"], 1 + 2 * parts, dir_, k, tasks, settings_json, gone_ref, accounts_set,
                     tomb_set, parts, len(reasons), *[out[k] for out in reasons], *[out[k] for out in roots])
                for k, tasks in enumerate(group_tasks)]
    conversation_refs = [call(remote["conversations"], 1, dir_, j, settings_json,
                              *[out[1 + j] for out in finished])[0] for j in range(parts)]
    author_refs = [call(remote["top_authors"], 1, 10, *[out[1 + parts + j] for out in finished])[0]
                   for j in range(parts)]
    group_refs = [out[0] for out in finished]
    # The shuffles' objects are freed as their consumers finish once the driver lets go of them.
    del scattered, reduced, meta, nodes, requests, values, roots, reasons, finished
    return _write(settings, remote, work, folder, group_refs, conversation_refs, author_refs, tombstones, found)


def _write(settings: DataSettings, remote: dict, work: Path, folder: Path, group_refs, conversation_refs,
           author_refs, tombstones, found) -> dict:
    """Gather the groups' and partitions' counts, then have a task copy their part files into the staged
    output files. The driver fetches counts only: rows it fetched, or Parquet it decoded, would grow its memory
    with the posts (docs/journal.md, "Ray driver memory, session 4")."""
    import ray

    counts = {"n_in": 0, "dropped": Counter(), "in_by_source": Counter(), "splits": Counter(), "kept": 0,
              "quarantine_reasons": Counter(), "quarantined": 0, "unquarantined": 0, "redacted": 0}
    for k in range(len(group_refs)):
        group = ray.get(group_refs[k])  # a group's part files are complete once its counts are here
        group_refs[k] = None
        for key, value in group.items():
            if isinstance(value, dict):
                counts[key].update(value)
            else:
                counts[key] += value
    n_conversations = n_turns = 0
    conversation_splits = Counter()
    for j in range(len(conversation_refs)):
        written, turns, splits = ray.get(conversation_refs[j])
        conversation_refs[j] = None
        n_conversations += written
        n_turns += turns
        conversation_splits.update(splits)
    ray.get(remote["write_outputs"].remote(str(folder), str(work), len(group_refs), len(conversation_refs),
                                           settings.model_dump_json()))
    canary_list = canary_module.make_canaries(settings.canaries, settings.canary_repeats, settings.seed)
    if settings.canaries:
        write_json_atomic(work / "canaries.json", canary_module.canaries_document(canary_list, settings.seed))
    authors = sorted((a for ref in author_refs for a in ray.get(ref)), key=lambda a: (-a[1], a[2]))[:10]
    dropped = counts["dropped"]
    if counts["unquarantined"]:
        dropped["deleted"] += counts["unquarantined"]
    dropped_total = {k: v for k, v in sorted(dropped.items()) if v}
    return {
        "in": counts["n_in"], "kept": counts["kept"], "dropped": dropped_total, "quarantined": counts["quarantined"],
        "quarantine_reasons": dict(sorted(counts["quarantine_reasons"].items())),
        "quarantine_redacted": counts["redacted"],
        "duplicates": dropped_total.get("duplicate", 0) + dropped_total.get("near_duplicate", 0)
        + dropped_total.get("duplicate_id", 0),
        "deleted": dropped_total.get("deleted", 0),
        "splits": {name: counts["splits"].get(name, 0) for name in SPLITS},
        "conversations": n_conversations, "conversation_turns": n_turns,
        "conversation_splits": {name: conversation_splits.get(name, 0) for name in SPLITS},
        "canaries_planted": sum(c.repeats for c in canary_list),
        "in_by_source": dict(sorted(counts["in_by_source"].items())),
        "top_dropped_authors": [(author, count) for author, count, _ in authors],
        "_tombstones": tombstones, "_deleted_ids": found,
    }


__all__ = ["connect", "run_ray"]
