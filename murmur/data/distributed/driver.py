"""The Ray executor's driver: plan the read tasks, run them as a Ray Data pipeline on the workers, then run the
global step's shuffles (global_step, through files: shuffle) and copy each group's part files (parts) into the
run's files.

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
from murmur.data.distributed.shuffle import SHUFFLE_FOLDER, Gather, forget, run_step, step_path
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
        # Task results under this size are kept in the driver's own memory (Ray's default is 100 kB): the
        # near-duplicate forests on their way to their merge would be. A cluster is started with the same:
        # ray start --system-config='{"max_direct_call_object_size": 1024}'.
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
        remote = {"run_step": ray.remote(max_retries=TASK_RETRIES)(run_step),
                  "write_outputs": ray.remote(max_retries=TASK_RETRIES)(write_outputs)}
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


class _Steps:
    """Starts the global step's tasks (shuffle.run_step, one object each) and deletes shuffle files."""

    def __init__(self, run_step, folder: str):
        self.run_step, self.folder = run_step, folder

    def start(self, function, calls: list[tuple], outputs: tuple[str, ...] = ()) -> list:
        """A task of `function` per argument tuple in `calls`, task i writing file i of each step in `outputs`;
        their references."""
        return [self.run_step.remote(function, tuple(str(step_path(self.folder, name, i)) for name in outputs),
                                     *args) for i, args in enumerate(calls)]

    def run(self, function, calls: list[tuple], outputs: tuple[str, ...] = ()) -> list:
        """As start, then wait for every task (their files complete) and fetch their summaries."""
        import ray

        return ray.get(self.start(function, calls, outputs))

    def gather(self, step: str, batch: int, mappers: int) -> Gather:
        """Batch `batch` of every file of `step`: a reducer's input."""
        return Gather(self.folder, step, batch, 0, mappers)

    def own(self, step: str, mapper: int) -> Gather:
        """The one table mapper `mapper` of `step` wrote: a partition handed on to the next step."""
        return Gather(self.folder, step, 0, mapper, mapper + 1)

    def forget(self, *steps: str) -> None:
        for step in steps:
            forget(self.folder, step)


def _global(settings: DataSettings, remote: dict, n_tasks: int, folder: Path, work: Path,
            deletions: Deletions) -> dict:
    """The shuffles (global_step), each step's tasks waited for before the next step reads their files."""
    import ray

    parts = _partitions(settings, folder, n_tasks)
    group_tasks = g.group_tasks(n_tasks, parts)
    n_groups = len(group_tasks)
    dir_ = str(folder)
    shutil.rmtree(folder / PARTS_FOLDER, ignore_errors=True)  # a previous run's, perhaps of other partitions
    (folder / PARTS_FOLDER).mkdir()
    steps = _Steps(remote["run_step"], str(folder / PARTS_FOLDER))
    every_partition = range(parts)

    # Duplicate ids and deletions, by id hash.
    deleted_posts = np.array(sorted(id_hash(p) for p in deletions.posts), dtype=np.uint64)
    deleted_accounts = np.array(sorted(id_hash(a) for a in deletions.accounts), dtype=np.uint64)
    steps.run(g.scatter_meta, [(dir_, tasks, parts) for tasks in group_tasks], ("by-id",))
    posts_ref, accounts_ref = ray.put(deleted_posts), ray.put(deleted_accounts)
    summaries = steps.run(g.reduce_ids, [(posts_ref, accounts_ref, steps.gather("by-id", j, n_groups))
                                         for j in every_partition], ("ids",))
    del posts_ref, accounts_ref
    tombstones = {int(h) for (tomb,) in summaries for h in tomb}
    tomb_ref = ray.put(np.array(sorted(tombstones), dtype=np.uint64))
    steps.forget("by-id")
    # Copies of deleted texts, author-repeat spam and exact duplicates, by text hash.
    steps.run(g.scatter_exact, [(tomb_ref, parts, steps.own("ids", j)) for j in every_partition], ("by-text",))
    del tomb_ref
    steps.run(g.reduce_exact, [(settings.max_author_repeats, steps.gather("by-text", j, parts))
                               for j in every_partition], ("exact",))
    steps.forget("ids", "by-text")
    meta = "exact"  # the step whose file j holds partition j's posts and why each was dropped
    if settings.near_dedup:
        steps.run(g.near_candidates, [(n_tasks, n_groups, steps.own(meta, j)) for j in every_partition],
                  ("candidates",))
        steps.run(g.band_links, [(dir_, tasks, settings.minhash_bands, parts, steps.gather("candidates", k, parts))
                                 for k, tasks in enumerate(group_tasks)], ("bands",))
        forests = steps.start(g.bucket_forest, [(steps.gather("bands", j, n_groups),) for j in every_partition])
        near = steps.start(g.merge_near, [tuple(forests)])[0]
        del forests
        steps.run(g.apply_near, [(near, steps.own(meta, j)) for j in every_partition], ("near",))
        del near
        steps.forget("candidates", "bands", meta)
        meta = "near"
    # Thread roots by pointer doubling over kept posts.
    steps.run(g.scatter_kept, [(parts, steps.own(meta, j)) for j in every_partition], ("parents", "id-nodes"))
    steps.run(g.resolve_parents, [(parts, steps.gather("parents", j, parts), steps.gather("id-nodes", j, parts))
                                  for j in every_partition], ("pointers-0",))
    steps.forget("parents", "id-nodes")
    nodes = "pointers-0"  # the step whose files hold every kept post's pointer, by post
    for round_ in range(g.MAX_DOUBLINGS):
        asked, answered = f"asked-{round_}", f"pointers-{round_ + 1}"
        steps.run(g.pointer_requests, [(parts, steps.gather(nodes, j, parts)) for j in every_partition], (asked,))
        moved = steps.run(g.pointer_answers, [(parts, steps.gather(asked, j, parts), steps.gather(nodes, j, parts))
                                              for j in every_partition], (answered,))
        steps.forget(asked)
        if not any(m for (m,) in moved):
            steps.forget(answered)
            break
        steps.forget(nodes)
        nodes = answered
    steps.run(g.root_requests, [(parts, steps.gather(nodes, j, parts)) for j in every_partition], ("asked-roots",))
    steps.run(g.id_values, [(dir_, tasks, parts) for tasks in group_tasks], ("id-values",))
    steps.forget(nodes)
    steps.run(g.root_ids, [(n_tasks, n_groups, steps.gather("asked-roots", j, parts),
                            steps.gather("id-values", j, n_groups)) for j in every_partition], ("roots",))
    steps.run(g.reasons_by_group, [(n_tasks, n_groups, steps.own(meta, j)) for j in every_partition], ("reasons",))
    steps.forget("asked-roots", "id-values", meta)
    # Ids deleted with an account or a deleted text: every group must blank references to them.
    deleted_ids = [pid for found in steps.run(g.deleted_ids, [(dir_, tasks, steps.gather("reasons", k, parts))
                                                              for k, tasks in enumerate(group_tasks)])
                   for pid in found]
    found = [pid for pid in deleted_ids if pid not in deletions.posts]
    gone_ref = ray.put(deletions.posts | set(deleted_ids))
    accounts_set, tomb_set = ray.put(set(deletions.accounts)), ray.put(tombstones)
    settings_json = settings.model_dump_json()
    finished = steps.start(g.finish_group, [
        (dir_, k, tasks, settings_json, gone_ref, accounts_set, tomb_set, parts, steps.gather("reasons", k, parts),
         steps.gather("roots", k, parts)) for k, tasks in enumerate(group_tasks)], ("threads", "authors"))
    del gone_ref, accounts_set, tomb_set
    counts = _group_counts(finished)
    steps.forget("reasons", "roots")
    conversation_refs = steps.start(g.conversations, [(dir_, j, settings_json, steps.gather("threads", j, n_groups))
                                                      for j in every_partition])
    author_refs = steps.start(g.top_authors, [(10, steps.gather("authors", j, n_groups)) for j in every_partition])
    stats = _write(settings, remote, work, folder, counts, n_groups, conversation_refs, author_refs, tombstones,
                   found)
    shutil.rmtree(Path(steps.folder) / SHUFFLE_FOLDER, ignore_errors=True)
    return stats


def _group_counts(finished: list) -> dict:
    """The groups' counts, added up as each group's task finishes (its part files are complete then)."""
    import ray

    counts = {"n_in": 0, "dropped": Counter(), "in_by_source": Counter(), "splits": Counter(), "kept": 0,
              "quarantine_reasons": Counter(), "quarantined": 0, "unquarantined": 0, "redacted": 0}
    for k in range(len(finished)):
        (group,) = ray.get(finished[k])
        finished[k] = None
        for key, value in group.items():
            if isinstance(value, dict):
                counts[key].update(value)
            else:
                counts[key] += value
    return counts


def _write(settings: DataSettings, remote: dict, work: Path, folder: Path, counts: dict, n_groups: int,
           conversation_refs, author_refs, tombstones, found) -> dict:
    """Gather the partitions' conversation counts, then have a task copy the part files into the staged
    output files. The driver fetches counts only: rows it fetched, or Parquet it decoded, would grow its memory
    with the posts (docs/journal.md, "Ray driver memory, session 4")."""
    import ray

    n_conversations = n_turns = 0
    conversation_splits = Counter()
    for j in range(len(conversation_refs)):
        written, turns, splits = ray.get(conversation_refs[j])
        conversation_refs[j] = None
        n_conversations += written
        n_turns += turns
        conversation_splits.update(splits)
    ray.get(remote["write_outputs"].remote(str(folder), str(work), n_groups, len(conversation_refs),
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
