"""Watching a run: the interval meter, metrics.jsonl, TensorBoard events, a console line with ETA, a loss
PNG, and MFU.

Only rank 0 writes. Records are written at the log interval, never every step, so that logging
costs nothing between intervals.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from murmur.files import read_jsonl, write_atomic
from murmur.train.trackers import open_trackers

# Dense bf16 tensor-core peak FLOP/s per GPU, from the vendors' data sheets (without sparsity).
# Matched against torch.cuda.get_device_name() by the first key it contains.
PEAK_BF16_FLOPS: dict[str, float] = {
    "GB200": 2.5e15,
    "B200": 2.25e15,
    "B100": 1.75e15,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "H20": 148e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A6000": 155e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "MI300X": 1307e12,
    "MI325X": 1307e12,
    "MI250X": 383e12,
}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak bf16 FLOP/s of one device, its name); None when the device is a CPU or not in the table."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key.lower() in name.lower():
            return value, name
    return None, name


def peak_flops_note(device: torch.device) -> str:
    """One line saying how MFU will be reported on this device."""
    peak, name = peak_flops(device)
    if device.type != "cuda":
        return "MFU: not defined on CPU; reporting achieved GFLOP/s instead"
    if peak is None:
        return (f"MFU: GPU '{name}' is not in Murmur's peak FLOP/s table (murmur/train/metrics.py); "
                "reporting achieved TFLOP/s only, not guessing a peak")
    return f"MFU: against {peak / 1e12:.0f} TFLOP/s bf16 peak of '{name}' per GPU"


def _human(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass(frozen=True)
class Interval:
    """The totals of one log interval, as host numbers."""

    loss_sum: float  # summed loss (nats) over the interval's counted targets, after `reduce`
    targets: int  # target tokens of the steps that updated the model
    tokens: int  # tokens of every step, skipped ones included
    seconds: float  # time spent training, evaluation and checkpoints excluded
    grad_norm: float | None  # of the interval's last step
    skipped_steps: int  # steps skipped for a non-finite loss since the meter started


class IntervalMeter:
    """Counts what the training steps of one log interval add up to, and how long they took.

    The loss sum (and, with several processes, the target count) stay device tensors between log
    intervals, so counting a step never waits for the device; `close()` reads them once. Evaluation
    and checkpointing run inside `paused()`, so tokens/s measures training alone whatever the intervals.
    """

    def __init__(self, device: torch.device | str, clock: Callable[[], float] | None = None):
        self._clock = clock or time.perf_counter  # looked up now, so a test can patch time.perf_counter
        self._loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self._targets: int | Tensor = 0
        self._tokens = 0
        self._grad_norm: Tensor | None = None
        self.skipped_steps = 0
        self._started = self._clock()
        self._paused = 0.0

    def count_step(self, tokens: int, grad_norm: Tensor, loss_sum: Tensor | None = None,
                   targets: int | Tensor = 0) -> None:
        """One optimizer step over `tokens` tokens; a skipped step (no update) passes no loss_sum."""
        self._tokens += tokens
        self._grad_norm = grad_norm
        if loss_sum is None:
            self.skipped_steps += 1
        else:
            self._loss_sum += loss_sum.double()
            self._targets += targets

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent in this block out of the interval (evaluation, checkpoints)."""
        start = self._clock()
        try:
            yield
        finally:
            self._paused += self._clock() - start

    def close(self, reduce: Callable[[Tensor], Tensor] = lambda t: t) -> Interval:
        """The interval's totals, then start the next one. `reduce` sums the loss over processes.

        The clock is read after the loss reaches the host, so the device's queued work is timed too.
        """
        loss_sum = reduce(self._loss_sum.clone()).item()
        targets = int(self._targets)
        grad_norm = float(self._grad_norm) if self._grad_norm is not None else None
        now = self._clock()
        interval = Interval(loss_sum, targets, self._tokens, now - self._started - self._paused, grad_norm,
                            self.skipped_steps)
        self._loss_sum.zero_()
        self._targets = self._tokens = 0
        self._started, self._paused = now, 0.0
        return interval


class MetricsLogger:
    """Writes training records of one stage to metrics.jsonl, the console and the experiment trackers of
    `loggers` (TensorBoard in tb/, trackio, wandb: murmur.train.trackers), on rank 0 only."""

    def __init__(self, stage_dir: Path, total_steps: int, flops_per_token: float, device: torch.device,
                 world_size: int, enabled: bool = True, loggers: list[str] = ("tensorboard",), stream=None,
                 config: dict[str, Any] | None = None):
        self.stage_dir = Path(stage_dir)
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak, self.device_name = peak_flops(device)
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._jsonl = None
        self._trackers = []
        if enabled:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            self._trackers = open_trackers(list(loggers), self.stage_dir, config)
            self._jsonl = open(self.stage_dir / "metrics.jsonl", "a", encoding="utf-8")

    def rates(self, tokens: int, seconds: float) -> dict[str, float | None]:
        """tokens/s (whole job), achieved FLOP/s per device as GFLOP/s, and MFU when the peak is known."""
        tps = tokens / seconds if seconds > 0 else 0.0
        flops_per_device = tps * self.flops_per_token / self.world_size
        mfu = flops_per_device / self.peak if self.peak else None
        return {"tokens_per_sec": tps, "gflops_per_sec": flops_per_device / 1e9, "mfu": mfu}

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (a training interval or an evaluation) everywhere."""
        if not self.enabled:
            return
        step = record["step"]
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        scalars = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for tracker in self._trackers:
            tracker.log(scalars, step)
        print(self._console_line(record), file=self.stream, flush=True)

    def _console_line(self, record: dict[str, Any]) -> str:
        step = record["step"]
        parts = [f"step {step}/{self.total_steps}"]
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
            if record.get("val_bpb") is not None:
                parts.append(f"val_bpb {record['val_bpb']:.4f}")
            return " | ".join(parts)
        parts.append(f"loss {record['loss']:.4f}" if record["loss"] is not None else "loss n/a")
        parts.append(f"lr {record['lr']:.2e}")
        parts.append(f"gnorm {record['grad_norm']:.3f}")
        parts.append(f"{record['tokens_per_sec'] / 1e3:.1f}k tok/s")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        else:
            parts.append(f"{record['gflops_per_sec']:.1f} GFLOP/s")
        if record.get("memory_gb"):
            parts.append(f"mem {record['memory_gb']:.1f}GB")
        # At the current rate, not counting evaluations and checkpoints still to come.
        if record["tokens_per_sec"] > 0 and step > 0:
            tokens_per_step = record["tokens"] / step
            parts.append(f"ETA {_human((self.total_steps - step) * tokens_per_step / record['tokens_per_sec'])}")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush the files and draw the loss curve."""
        if not self.enabled:
            return
        for tracker in self._trackers:
            tracker.close()
        if self._jsonl is not None:
            self._jsonl.close()
        self.plot()

    def plot(self) -> Path | None:
        """loss.png from every record of metrics.jsonl (earlier sessions of a resumed run included)."""
        path = self.stage_dir / "metrics.jsonl"
        if not path.is_file():
            return None
        train, val = [], []
        for rec in read_jsonl(path):  # a line cut short by a kill is skipped
            if rec.get("loss") is not None and math.isfinite(rec["loss"]):
                train.append((rec["step"], rec["loss"]))
            if rec.get("val_loss") is not None:
                val.append((rec["step"], rec["val_loss"]))
        if not train and not val:
            return None
        try:
            import matplotlib
        except ImportError:  # the curve is a convenience: training goes on without it
            print("loss.png needs matplotlib: pip install 'murmur[plot]'", file=self.stream)
            return None

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*sorted(dict(train).items())), label="train loss")
        if val:
            ax.plot(*zip(*sorted(dict(val).items())), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.stage_dir.name)
        ax.legend()
        ax.grid(alpha=0.3)
        try:
            return write_atomic(self.stage_dir / "loss.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
