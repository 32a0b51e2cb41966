"""Where the local executor's per-batch step runs: this process, or a pool of worker processes.

It takes an iterator of (index, batch) tasks and yields BatchResults as they arrive, keeping only a bounded
window of batches in flight so memory does not grow with the input. The Ray executor does not batch through
here: its workers read, and the global step runs on the cluster too (murmur.data.distributed).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator

from murmur.data.batch import BatchResult, process_batch
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


def make_executor(settings: DataSettings) -> LocalExecutor:
    """The local executor's pool (the Ray executor runs the whole stage: murmur.data.distributed.driver)."""
    return LocalExecutor(settings)
