"""A training stage's wall-clock budget (`train.time_budget_minutes`, `sft.time_budget_minutes`).

The trainer times a few steps at the start of a fresh stage (after a warm-up step that pays for compilation
and allocation), rewinds them, and fixes here the number of steps that fit what is left of the budget,
counting the evaluations and checkpoints those steps will run. The number is written to STAGE/budget.json
before the first real step: a resumed stage keeps it, and `--set SECTION.steps=N
SECTION.time_budget_minutes=0` reproduces the run exactly, since the schedule (warmup, decay) is computed
for N from step 0 as it would be for a plain N-step run.

Three timed steps can flatter a machine, and a machine's speed drifts (on an idle 2-core VM the demo's
steps ran 7-35% slower than calibrated, minutes later). So the trainer times its real steps too and fixes
the number again, but only while the learning rates already used do not depend on the total
(`lr_independent_before`): then `--set SECTION.steps=N` with the final N still reproduces the run exactly.
With `cosine` that is the warmup (one recheck at its end, when it has at least RECHECK_MIN_WARMUP steps);
with `wsd` every RECHECK_WINDOW steps until the decay starts; with `constant` to the end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from murmur.files import write_json_atomic

BUDGET_FILE = "budget.json"
# Steps run before timing (compilation, first allocations) and steps timed; both are rewound.
WARMUP_STEPS = 1
TIMED_STEPS = 3
# Share of the remaining budget left unplanned: step times vary by a few percent on a busy machine.
SAFETY_MARGIN = 0.05
# The shortest warmup whose steps are timed to fix the number of steps again (the first is not timed), and
# the steps timed between two rechecks of a wsd or constant schedule.
RECHECK_MIN_WARMUP = 5
RECHECK_WINDOW = 5


@dataclass
class BudgetPlan:
    """What the calibration measured and the number of steps it fixed."""

    time_budget_minutes: float
    steps: int  # the fixed number of optimizer steps
    steps_ceiling: int  # SECTION.steps: the most the budget may plan
    seconds_per_step: float
    tokens_per_sec: float
    eval_seconds: float  # one validation pass
    checkpoint_seconds: float  # one checkpoint save
    seconds_before_training: float  # setup, first validation, calibration: spent before step 1
    planned_seconds: float  # what the plan expects the whole stage to take
    reproduce: str  # the overrides that rerun exactly these steps without a budget
    # Set when the real steps' times fixed the number again: the last step it happened after, the steps the
    # calibration had fixed, the measured time a step, and how many times the number changed.
    rechecked_at_step: int | None = None
    steps_calibrated: int | None = None
    seconds_per_step_rechecked: float | None = None
    rechecks: int = 0

    def record(self) -> dict[str, Any]:
        return asdict(self)


def occurrences(steps: int, interval: int) -> int:
    """How many of steps 1..`steps` are a multiple of `interval` or the last (the trainer's rule for
    evaluations and checkpoints)."""
    return steps // interval + (1 if steps % interval else 0)


def stage_seconds(steps: int, step_s: float, eval_s: float, eval_interval: int, checkpoint_s: float,
                  checkpoint_interval: int) -> float:
    """Seconds `steps` optimizer steps take with their evaluations and checkpoints."""
    return (steps * step_s + occurrences(steps, eval_interval) * eval_s
            + occurrences(steps, checkpoint_interval) * checkpoint_s)


def lr_independent_before(schedule: str, steps: int, warmup_steps: int, decay_fraction: float) -> int:
    """The first optimizer step whose learning rate depends on the total `steps` (murmur.train.optim's
    schedules): a run may change its total before that step and still be a plain run of the new total."""
    warmup = min(warmup_steps, steps)
    if schedule == "cosine":
        return warmup
    if schedule == "constant":
        return steps
    return max(steps - int(round(decay_fraction * steps)), warmup)  # wsd: where the decay starts


def steps_that_fit(seconds_left: float, ceiling: int, step_s: float, eval_s: float, eval_interval: int,
                   checkpoint_s: float, checkpoint_interval: int) -> int:
    """The most steps (at most `ceiling`) whose training, evaluations and checkpoints fit in `seconds_left`
    less the safety margin; 0 when not even one fits."""
    usable = seconds_left * (1 - SAFETY_MARGIN)

    def fits(n: int) -> bool:
        return stage_seconds(n, step_s, eval_s, eval_interval, checkpoint_s, checkpoint_interval) <= usable

    low, high = 0, ceiling  # fits() is monotonic in n: the largest n that fits, by bisection
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def read_budget(stage_dir: Path) -> dict[str, Any] | None:
    """The budget record of a stage folder, None when no budget fixed its steps."""
    import json

    path = Path(stage_dir) / BUDGET_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_budget(stage_dir: Path, plan: BudgetPlan) -> None:
    """Durable: a crash after the first step must find the fixed number of steps again."""
    write_json_atomic(Path(stage_dir) / BUDGET_FILE, plan.record(), durable=True)
