"""The build's data types: a stage, the plan of a build and its result. A leaf module: the runner
(`murmur.build`) and its display (`murmur.build_display`) both import it, and it imports neither."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from murmur.config import Settings
from murmur.fingerprint import check_keys, is_under

BUILD_FILE = "build.json"

StageFunction = Callable[..., dict]  # (settings, run_dir) -> summary; training stages also take their name


class Action(enum.StrEnum):
    """What the plan does with a stage."""

    RUN = "run"
    SKIP = "skip"  # up to date
    OMIT = "omit"  # outside --from/--only
    NOT_NEEDED = "not-needed"  # pretraining, when finetuning a base model

    @property
    def outcome(self) -> Outcome:
        return {Action.RUN: Outcome.RAN, Action.SKIP: Outcome.SKIPPED, Action.OMIT: Outcome.NOT_SELECTED,
                Action.NOT_NEEDED: Outcome.NOT_NEEDED}[self]


class Outcome(enum.StrEnum):
    """What a build did with a stage, as its result and its display say it."""

    RAN = "ran"
    SKIPPED = "skipped"
    NOT_SELECTED = "not selected"
    NOT_NEEDED = "not needed"


def _no_files(settings: Settings) -> list[tuple[str, Any]]:
    return []


def _no_check(settings: Settings, stage: Stage) -> None:
    return None


def _always_needed(settings: Settings) -> str | None:
    return None


def _call_plain(function: StageFunction, settings: Settings, run_dir: Path, stage: Stage) -> dict:
    return function(settings, run_dir)


@dataclass(frozen=True)
class Stage:
    """One step of a build: what it reads, what it writes, the function that does it, and its hooks.

    `reads` names sections ("train") or dotted keys ("model.base") of Settings; `ignores` takes out settings
    under them the stage does not use, and `unaffected_by` names settings of earlier stages that change none
    of the files this stage reads (their change reruns the earlier stage but not this one). All three are
    checked against Settings when the stage is made, so a misspelled key fails at import.
    """

    name: str
    entry: str  # "module:function"
    reads: tuple[str, ...]
    after: tuple[str, ...]  # stages whose outputs it reads
    outputs: tuple[str, ...]  # folders under the run folder it owns (cleared when it reruns for a change)
    done_marker: str  # a file (relative to the run folder) that exists once the stage has completed
    needs: tuple[str, ...] = ()  # files (relative to the run folder) it reads, for the preflight check
    description: str = ""
    ignores: tuple[str, ...] = ()
    unaffected_by: tuple[str, ...] = ()
    # Files from outside the run folder it reads, as (the setting naming them, fingerprint material).
    input_files: Callable[[Settings], list[tuple[str, Any]]] = _no_files
    # Checks of its settings before any stage runs; raise MurmurError naming the stage.
    preflight: Callable[[Settings, Stage], None] = _no_check
    # How its function is called.
    call: Callable[[StageFunction, Settings, Path, Stage], dict] = _call_plain
    # Why the recipe needs no run of it at all (pretraining, when finetuning a base model); None when it does.
    not_needed: Callable[[Settings], str | None] = _always_needed

    def __post_init__(self) -> None:
        check_keys(Settings, self.reads + self.ignores + self.unaffected_by, f"stage {self.name}")
        stray = [key for key in self.ignores if not is_under(key, self.reads)]
        if stray:
            raise ValueError(f"stage {self.name}: ignores {stray} lie outside what it reads {list(self.reads)}")


@dataclass
class StageStep:
    """What the build will do with one stage, and why."""

    stage: Stage
    action: Action
    reason: str
    clear: bool = False  # empty its output folders before running (its inputs changed)


@dataclass
class BuildPlan:
    """The steps of a build, decided before any work is done."""

    settings: Settings
    run_dir: Path
    steps: list[StageStep]
    record: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str) -> StageStep:
        return next(s for s in self.steps if s.stage.name == name)


@dataclass
class BuildResult:
    """What a build did: per stage, its outcome, its seconds and its summary."""

    run_dir: Path
    stages: list[dict[str, Any]]
    seconds: float

    def ran(self) -> list[str]:
        return [s["stage"] for s in self.stages if s["action"] == Outcome.RAN]

    def skipped(self) -> list[str]:
        return [s["stage"] for s in self.stages if s["action"] == Outcome.SKIPPED]
