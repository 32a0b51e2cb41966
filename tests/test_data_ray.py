"""The Ray executor on a real multi-process cluster (a head and two worker nodes started here): its outputs are
the local executor's, also when a worker node dies mid-run, and a rerun after the driver was killed resumes
from the read tasks that had completed."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import source_specs, tweet, write_corpus
from test_archive_folder import SECRET, make_archive

from murmur.data import pipeline
from murmur.data.distributed import driver
from murmur.settings.data import DataSettings

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.slow
COMPARED = ("in", "kept", "dropped", "quarantined", "quarantine_reasons", "quarantine_redacted", "duplicates",
            "deleted", "splits", "conversations", "conversation_turns", "conversation_splits", "in_by_source",
            "top_dropped_authors", "canaries_planted")


def write_inputs(root: Path) -> dict:
    """The test corpus (duplicates, near duplicates, a thread, spam, bad records of every kind), an archive
    folder with a planted direct message, a deletion list, and a plain file large enough to be read in ranges
    (with bad lines and blank lines in the middle, whose numbers must come out as the local reader's), and a
    log read through a file:// URL, in ranges too."""
    paths = write_corpus(root / "in")
    archive = make_archive(root / "own")
    rng = random.Random(0)
    words = ("river lantern copper meadow violin harbor pepper glacier orbit saddle thunder velvet maple "
             "canyon biscuit ember falcon quartz tulip walnut").split()
    lines = []
    for i in range(400):
        if i % 97 == 13:
            lines.append('{"id": "broken')
        elif i % 89 == 5:
            lines.append("")
        else:
            lines.append(json.dumps(tweet(7000 + i, " ".join(rng.choice(words) for _ in range(9)),
                                          author=f"u{i % 11}", reply_to=7000 + i - 1 if i % 5 else None,
                                          created=f"2024-06-{1 + i % 28:02d}T00:00:00.000Z")))
    big = root / "in" / "big.jsonl"
    big.write_text("\n".join(lines) + "\n")
    text = root / "in" / "lines.log"
    text.write_text("".join(f"plain line {i} of a long log about trains\n" if i % 9 else "\n" for i in range(900)))
    deletions = root / "in" / "deletions.txt"
    deletions.write_text("post:1000000000000000003\naccount:trent\npost:7020\n")
    specs = source_specs(paths) + [f"x-archive:{archive}", f"x-api:{big}", f"text:file://{text}"]
    return {"sources": specs, "deletions": str(deletions)}


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs (tasks run on the workers) and two worker nodes of one CPU each."""
    started = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [started.add_node(num_cpus=1) for _ in range(2)]
    started.wait_for_nodes()
    yield started, workers
    ray.shutdown()
    started.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    inputs = write_inputs(root)
    common = {"columns": {"id": "post", "text": "body", "author_id": "user", "created_at": "when"},
              "batch_size": 16, "canaries": 2, "split_bytes": 24_000, "partitions": 3, **inputs}
    local = pipeline.run(DataSettings(**common, workers=1), root / "local", progress=False)
    return root, common, local


def assert_same(root: Path, local: dict, name: str, remote: dict) -> None:
    for key in COMPARED:
        assert json.loads(json.dumps(local[key])) == json.loads(json.dumps(remote[key])), key
    for output in ("posts.parquet", "quarantine.parquet"):  # in input order, as the local executor writes them
        assert pq.read_table(root / "local" / output).equals(pq.read_table(root / name / output)), output
    # Conversations come a partition of roots at a time: the same rows, in another order.
    a, b = (pq.read_table(folder / "conversations.parquet").sort_by("id") for folder in (root / "local", root / name))
    assert a.num_rows and a.equals(b)
    assert (root / "local" / "canaries.json").read_text() == (root / name / "canaries.json").read_text()
    assert (root / "local" / "deleted_posts.txt").read_text() == (root / name / "deleted_posts.txt").read_text()
    assert (root / "local" / "tombstones.txt").read_text() == (root / name / "tombstones.txt").read_text()


def rows_in(value) -> int:
    """Rows of tables inside a value fetched from Ray (tuples, lists and dicts looked into)."""
    if isinstance(value, (pa.Table, pa.RecordBatch)):
        return value.num_rows
    if isinstance(value, (list, tuple)):
        return sum(rows_in(v) for v in value)
    if isinstance(value, dict):
        return sum(rows_in(v) for v in value.values())
    return 0


def test_ray_cluster_outputs_are_the_local_executors(cluster, corpus, capsys, monkeypatch):
    (head, _), (root, common, local) = cluster, corpus
    assert local["in"] > 500 and local["dropped"]["deleted"] >= 5 and local["dropped"]["near_duplicate"] >= 1
    assert local["quarantined"] >= 8 and local["conversations"] >= 3
    # What the driver itself fetches (Ray Data's own calls aside): counts and summaries, never a table of rows,
    # whose object-store pages and copies would grow the driver's memory with the posts.
    fetched = []
    real_get = ray.get

    def recording_get(refs, *args, **kwargs):
        values = real_get(refs, *args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__") == driver.__name__:
            fetched.append(values)
        return values

    monkeypatch.setattr(ray, "get", recording_get)
    remote = pipeline.run(DataSettings(**common, executor="ray", address=head.address), root / "ray",
                          progress=True)
    assert_same(root, local, "ray", remote)
    assert fetched and sum(rows_in(v) for v in fetched) == 0
    # The progress line counted every record as the read tasks finished.
    line = capsys.readouterr().err.replace("\r", "\n")
    assert f"read {local['in']:,} | kept" in line and "records/s" in line and "ETA" in line
    everything = b"".join(p.read_bytes() for p in (root / "ray").rglob("*") if p.is_file())
    assert SECRET.encode() not in everything


class TaskLedger:
    """Every task the driver module starts and every object it puts, seen through a spy on ray.remote and
    ray.put: the ObjectRefs Ray keeps bookkeeping for in the driver."""

    def __init__(self, monkeypatch):
        self.returns, self.ref_args, self.puts = [], [], 0
        real_remote, real_put = ray.remote, ray.put

        def from_driver() -> bool:
            return sys._getframe(2).f_globals.get("__name__") == driver.__name__

        def spy_remote(*args, **kwargs):
            made = real_remote(*args, **kwargs)
            if not from_driver():
                return made
            if args and callable(args[0]) and not kwargs:
                return self._spied(made, 1)
            return lambda function: self._spied(made(function), kwargs.get("num_returns", 1))

        def spy_put(*args, **kwargs):
            if from_driver():
                self.puts += 1
            return real_put(*args, **kwargs)

        monkeypatch.setattr(ray, "remote", spy_remote)
        monkeypatch.setattr(ray, "put", spy_put)

    def _spied(self, remote_function, num_returns: int):
        ledger = self

        class Spied:
            def options(self, **options):
                return ledger._spied(remote_function.options(**options), options.get("num_returns", num_returns))

            def remote(self, *args, **kwargs):
                ledger.returns.append(num_returns)
                ledger.ref_args.append(sum(isinstance(a, ray.ObjectRef) for a in [*args, *kwargs.values()]))
                return remote_function.remote(*args, **kwargs)

        return Spied()


def test_every_shuffle_holds_one_object_a_task_in_the_driver(cluster, corpus, monkeypatch):
    """A shuffle of M mappers and P reducers leaves O(M + P) objects in the driver: mappers write one file each
    and return one small object; reducers are told where the files are, not given M references each (Ray keeps
    some 3 kB of bookkeeping a reference in the driver: M x P of them grew the driver with the posts)."""
    (head, _), (root, common, local) = cluster, corpus
    ledger = TaskLedger(monkeypatch)
    remote = pipeline.run(DataSettings(**common | {"partitions": 4}, executor="ray", address=head.address),
                          root / "ledger", progress=False)
    assert_same(root, local, "ledger", remote)  # other partitions, the same outputs
    tasks = len(ledger.returns)
    assert tasks > 4 * 10  # the global step's tasks were all seen: scatters, reduces, doubling rounds
    assert max(ledger.returns) == 1, "a task returned an object per partition"
    # Each task is given at most the three broadcasts (deletions, tombstones), not one reference per mapper;
    # only the merge of the near-duplicate forests takes one per partition.
    assert sorted(ledger.ref_args)[-2] <= 3, sorted(ledger.ref_args)[-5:]


def test_a_worker_killed_mid_run_changes_nothing(cluster, corpus):
    (head, workers), (root, common, local) = cluster, corpus
    out = root / "killed"
    killed = threading.Event()

    def kill_a_worker_once_reading_started():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if any(out.glob(".work-*/ray-*/map-*.json")):
                # Its raylet and workers die at once; the tasks running there and the objects it held are lost.
                head.remove_node(workers.pop(0), allow_graceful=False)
                killed.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_a_worker_once_reading_started)
    watcher.start()
    remote = pipeline.run(DataSettings(**common, executor="ray", address=head.address), out, progress=False)
    watcher.join()
    assert killed.is_set()
    assert_same(root, local, "killed", remote)


DRIVER = """
import sys, time
from murmur.data import pipeline
from murmur.data.distributed import driver
from murmur.settings.data import DataSettings
import json
settings = DataSettings(**json.loads(sys.argv[1]))
driver._global = lambda *a, **k: time.sleep(3600)  # the driver is killed while here, after reading
pipeline.run(settings, sys.argv[2], progress=False)
"""


def test_a_rerun_after_the_driver_was_killed_resumes_from_completed_read_tasks(cluster, corpus, monkeypatch):
    (head, _), (root, common, local) = cluster, corpus
    out = root / "resumed"
    settings = {**common, "executor": "ray", "address": head.address}
    child = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(settings), str(out)],
                             env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            manifests = list(out.glob(".work-*/ray-*/manifest.json"))
            if manifests:
                n_tasks = len(json.loads(manifests[0].read_text())["tasks"])
                if len(list(manifests[0].parent.glob("map-*.json"))) == n_tasks:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("the driver did not finish reading")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    folder = manifests[0].parent
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("map-*")}
    assert not (out / "stats.json").exists()
    seen = {}
    real_global = driver._global

    def global_step_after_a_look(*args, **kwargs):
        seen.update({p.name: p.stat().st_mtime_ns for p in folder.glob("map-*")})
        return real_global(*args, **kwargs)

    monkeypatch.setattr(driver, "_global", global_step_after_a_look)
    remote = pipeline.run(DataSettings(**settings), out, progress=False)
    assert seen == before  # no completed read task was run again
    assert_same(root, local, "resumed", remote)
