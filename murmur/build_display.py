"""What `murmur build` shows: the plan, one numbered line per stage as it runs, and a final summary.

Stages print their own progress (training steps, records read) between the stage headers; the headers
carry the build's position (stage 4 of 7) and its elapsed time, so the whole build reads as one display.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from murmur.build_types import BUILD_FILE, Action, BuildPlan, BuildResult, Outcome, StageStep


def _short(summary: Any, limit: int = 4) -> str:
    """A stage summary as a few `key value` pairs (scalars only)."""
    if not isinstance(summary, dict):
        return ""
    parts = []
    for key, value in summary.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, (int, str, bool)) and len(str(value)) <= 60:
            parts.append(f"{key} {value}")
        if len(parts) == limit:
            break
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def outputs_summary(run_dir: Path) -> list[tuple[str, Path]]:
    """Where a build's results live, for the final summary: (what, path) for each that exists."""
    items = [("curated data", "data"), ("tokenizer", "tokenizer"), ("token shards", "tokens"),
             ("pretraining checkpoints", "pretrain/checkpoints"), ("chat checkpoints", "sft/checkpoints"),
             ("model (Hugging Face)", "model"), ("evaluation", "eval/results.json"),
             ("report card", "report/report.md"), ("build record", BUILD_FILE)]
    return [(what, run_dir / rel) for what, rel in items if (run_dir / rel).exists()]


class BuildDisplay:
    """Console output of a build."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False)
        self.started = time.monotonic()
        self.total = 0

    def start(self, plan: BuildPlan) -> None:
        self.started = time.monotonic()
        self.total = len(plan.steps)
        runs = [s.stage.name for s in plan.steps if s.action == Action.RUN]
        self.console.print(f"[bold]murmur build[/] → {plan.run_dir}  "
                           f"({len(runs)} of {self.total} stages to run: {', '.join(runs) or 'none'})")

    def _prefix(self, index: int) -> str:
        return f"[{index + 1}/{self.total} {_clock(time.monotonic() - self.started)}]"

    def stage_skipped(self, index: int, step: StageStep) -> None:
        self.console.print(f"{self._prefix(index)} [dim]{step.stage.name}: {step.action.outcome} ({step.reason})[/]")

    def stage_started(self, index: int, step: StageStep) -> None:
        self.console.rule(f"{self._prefix(index)} [bold]{step.stage.name}[/]: {step.stage.description} "
                          f"({step.reason})", align="left")

    def stage_completed(self, index: int, step: StageStep, seconds: float, summary: Any) -> None:
        detail = _short(summary)
        self.console.print(f"{self._prefix(index)} [green]✓ {step.stage.name}[/] in {seconds:.1f}s"
                           + (f": {detail}" if detail else ""))

    def stage_failed(self, index: int, step: StageStep, seconds: float) -> None:
        self.console.print(f"{self._prefix(index)} [red]✗ {step.stage.name}[/] failed after {seconds:.1f}s")

    def finish(self, plan: BuildPlan, result: BuildResult) -> None:
        table = Table(title=f"build finished in {_clock(result.seconds)}", title_justify="left")
        for column in ("stage", "result", "time", "figures"):
            table.add_column(column)
        for item in result.stages:
            if item["action"] == Outcome.NOT_SELECTED:
                continue  # outside --from/--only: already said as it was passed over
            seconds = f"{item['seconds']:.1f}s" if "seconds" in item else ""
            what = item["action"] if item["action"] == Outcome.RAN else f"{item['action']} ({item['reason']})"
            table.add_row(item["stage"], what, seconds, _short(item.get("summary")))
        self.console.print(table)
        for what, path in outputs_summary(result.run_dir):
            self.console.print(f"  {what:<24} {path}")
        if (result.run_dir / "model").is_dir():
            self.console.print(f"next: [bold]murmur serve {result.run_dir}[/] (web chat on "
                               f"http://{plan.settings.serve.host}:{plan.settings.serve.port}) or "
                               f"[bold]murmur chat {result.run_dir}[/]")


class QuietDisplay(BuildDisplay):
    """A display that prints nothing (for callers that show their own output)."""

    def __init__(self) -> None:
        super().__init__(Console(quiet=True))
