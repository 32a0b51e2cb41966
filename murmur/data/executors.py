"""Where the per-batch step runs: local worker processes, or a Ray cluster through Ray Data.

Both take an iterator of (index, batch) tasks and yield (index, BatchResult) as results arrive, keeping only
a bounded window of batches in flight so memory does not grow with the input. The global step runs in the
driver either way, so both executors produce identical outputs.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Iterator

from murmur.data.batch import BatchResult, process_batch
from murmur.errors import MurmurError
from murmur.settings.data import DataSettings

Task = tuple[int, list]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LocalExecutor:
    """Runs batches in this process (one worker) or in a pool of worker processes."""

    def __init__(self, settings: DataSettings):
        self.settings_json = settings.model_dump_json()
        self.workers = settings.workers or cpu_count()

    def map(self, tasks: Iterator[Task]) -> Iterator[BatchResult]:
        if self.workers <= 1:
            for index, items in tasks:
                yield process_batch(index, items, self.settings_json)
            return
        context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
        with context.Pool(self.workers) as pool:
            pending: deque = deque()
            for index, items in tasks:
                pending.append(pool.apply_async(process_batch, (index, items, self.settings_json)))
                while len(pending) >= 2 * self.workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()

    def close(self) -> None:
        pass


class RayExecutor:
    """Runs batches as Ray Data map tasks on a local Ray instance or the cluster at `address`."""

    def __init__(self, settings: DataSettings):
        try:
            import ray
        except ImportError:
            raise MurmurError("--executor ray needs Ray: pip install 'murmur[ray]'") from None
        self.settings_json = settings.model_dump_json()
        self.started = False
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if settings.address:
                options["address"] = settings.address
            else:
                options["num_cpus"] = settings.workers or cpu_count()
            try:
                ray.init(**options)
            except (ConnectionError, RuntimeError, ValueError) as err:
                raise MurmurError(f"cannot start or reach Ray ({settings.address or 'local'}): {err}") from None
            self.started = True
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        # Batches per Ray Data execution: enough to keep every CPU busy, few enough to bound memory.
        self.window = max(4, 2 * int(ray.cluster_resources().get("CPU", 1)))

    def map(self, tasks: Iterator[Task]) -> Iterator[BatchResult]:
        window: list[dict] = []
        for index, items in tasks:
            window.append({"index": index, "payload": pickle.dumps(items)})
            if len(window) >= self.window:
                yield from self._run(window)
                window = []
        if window:
            yield from self._run(window)

    def _run(self, window: list[dict]) -> Iterator[BatchResult]:
        import ray.data

        settings_json = self.settings_json

        def run_row(row: dict) -> dict:
            result = process_batch(int(row["index"]), pickle.loads(row["payload"]), settings_json)
            return {"index": int(row["index"]), "result": pickle.dumps(result)}

        dataset = ray.data.from_items(window, override_num_blocks=len(window)).map(run_row)
        for row in dataset.iter_rows():
            yield pickle.loads(row["result"])

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def make_executor(settings: DataSettings) -> LocalExecutor | RayExecutor:
    return RayExecutor(settings) if settings.executor == "ray" else LocalExecutor(settings)
