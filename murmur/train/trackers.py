"""Experiment trackers a training stage's records also go to, chosen by `train.loggers`: TensorBoard (events in
the stage's tb/), trackio (local-first: a SQLite file under $TRACKIO_DIR, `trackio show` to look) and
Weights & Biases (WANDB_MODE=offline keeps it on this machine; `wandb sync` uploads later).

metrics.jsonl is always written whatever is chosen; these are views of the same records. Each tracker's
package is an extra: one that is chosen but not installed stops the stage before it trains, saying which
extra to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

from murmur.errors import MurmurError

# Each tracker needs the package of its name, which Murmur's extra of the same name installs.
TRACKERS = ("tensorboard", "trackio", "wandb")


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def require(name: str):
    """The package tracker `name` needs, or a MurmurError naming the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MurmurError(f"train.loggers includes '{name}', which needs the {name} package: "
                          f"pip install 'murmur[{name}]' (or remove '{name}' from train.loggers; "
                          "metrics.jsonl is written either way)") from None


class TensorBoardTracker:
    def __init__(self, stage_dir: Path):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(stage_dir / "tb"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class TrackioTracker:
    """One trackio run per stage, in the project named after the run folder; a resumed stage appends to it."""

    def __init__(self, project: str, name: str, config: dict[str, Any]):
        trackio = require("trackio")
        # No background system-metrics threads: the records are the training's own.
        self.run = trackio.init(project=project, name=name, config=config, resume="allow", embed=False,
                                auto_log_gpu=False, auto_log_cpu=False)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class WandbTracker:
    """One W&B run per training session, grouped by run folder; its files go to the stage folder's wandb/."""

    def __init__(self, stage_dir: Path, project: str, name: str, config: dict[str, Any]):
        wandb = require("wandb")
        self.run = wandb.init(project=project, group=project, name=name, config=config, dir=str(stage_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: list[str], stage_dir: Path, config: dict[str, Any] | None = None) -> list[Tracker]:
    """The trackers `names` asks for, for the stage folder `stage_dir` (runs/NAME/STAGE)."""
    stage_dir = Path(stage_dir)
    project, name = stage_dir.parent.name or "murmur", stage_dir.name
    for tracker in names:  # every package checked before any tracker starts
        if tracker not in TRACKERS:
            raise MurmurError(f"unknown logger '{tracker}' in train.loggers; choose from {', '.join(TRACKERS)}")
        require(tracker)
    made = {"tensorboard": lambda: TensorBoardTracker(stage_dir),
            "trackio": lambda: TrackioTracker(project, name, config or {}),
            "wandb": lambda: WandbTracker(stage_dir, project, name, config or {})}
    return [made[tracker]() for tracker in dict.fromkeys(names)]
