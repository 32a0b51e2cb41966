"""The console line of a long data run, for both executors: records read, kept by the per-batch step,
quarantined, throughput, and the time left (estimated from the input bytes done). Quiet unless asked for or
stderr is a terminal."""

from __future__ import annotations

import sys
import time

BAR_FORMAT = "{desc}: {percentage:3.0f}% of {total_fmt}B | {postfix} | {elapsed} elapsed, ETA {remaining}"


class Progress:
    """Counts and a tqdm line on stderr; `show=None` shows it when stderr is a terminal."""

    def __init__(self, total_bytes: int, show: bool | None = None, desc: str = "murmur data"):
        from tqdm import tqdm

        self.show = sys.stderr.isatty() if show is None else show
        self.read = self.kept = self.quarantined = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=max(1, total_bytes), unit="B", unit_scale=True, desc=desc, disable=not self.show,
                        dynamic_ncols=True, bar_format=BAR_FORMAT, file=sys.stderr, mininterval=0.5)

    def advance(self, read: int, kept: int, quarantined: int, done_bytes: int | None = None,
                more_bytes: int = 0) -> None:
        """Add a finished piece of work: its records, and either the input bytes now done or those it added."""
        self.read += read
        self.kept += kept
        self.quarantined += quarantined
        if done_bytes is not None:
            self.bar.n = done_bytes
        else:
            self.bar.n += more_bytes
        rate = self.read / max(1e-9, time.perf_counter() - self.started)
        self.bar.set_postfix_str(f"read {self.read:,} | kept {self.kept:,} | quarantined {self.quarantined:,} | "
                                 f"{rate:,.0f} records/s", refresh=False)
        self.bar.refresh()

    def resumed(self, done_bytes: int) -> None:
        """Input a previous run already read (its results are reused)."""
        self.bar.n = done_bytes
        self.bar.refresh()

    def stage(self, name: str) -> None:
        """Name the step now running (the global step has no byte count)."""
        self.bar.set_description_str(f"murmur data ({name})", refresh=True)

    def close(self) -> None:
        self.bar.close()
