"""The time budget of a training stage (murmur/train/budget.py), on a fake clock: no wall-clock assertions.

The fake clock advances by fixed amounts when the trainer steps, validates and saves; the first step costs
more (compilation), which the budget must not count as a step's time.
"""

import json

import pytest

from train_helpers import link_tokens, read_losses, read_val, settings_for, write_pretrain_tokens
from murmur.train import budget as time_budget
from murmur.train import trainer as trainer_module
from murmur.train.trainer import Trainer, run_stage, start_runtime

STEP_S, FIRST_STEP_S, EVAL_S, SAVE_S = 1.0, 3.0, 2.0, 1.5
SETTINGS = dict(steps=1000, time_budget_minutes=0.5, eval_interval=4, checkpoint_interval=8, keep_checkpoints=10,
                warmup_steps=3)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("budget") / "tokens"
    write_pretrain_tokens(folder)
    return folder


def timed_run(run_dir, clock: FakeClock, monkeypatch, step_s: float = STEP_S, crash_at: int | None = None,
              first_eval_s: float = EVAL_S, compiled: bool = False, later_step_s: float | None = None, **train):
    """Train pretraining with the fake clock advanced by each step, validation and checkpoint; `compiled`
    stands for torch.compile, whose first validation pays `first_eval_s` for compiling the forward;
    `later_step_s` is the time of every step after the calibration's (a machine that slowed down)."""
    calibration = time_budget.WARMUP_STEPS + time_budget.TIMED_STEPS
    calls = {"steps": 0, "evals": 0}
    original_step, original_eval, original_save = Trainer.train_step, Trainer.evaluate, Trainer.save

    def train_step(self, batches):
        if crash_at is not None and self.step == crash_at:
            raise KeyboardInterrupt("killed")
        calls["steps"] += 1
        if calls["steps"] == 1:
            clock.now += FIRST_STEP_S
        elif later_step_s is not None and calls["steps"] > calibration:
            clock.now += later_step_s
        else:
            clock.now += step_s
        return original_step(self, batches)

    def evaluate(self):
        calls["evals"] += 1
        clock.now += first_eval_s if calls["evals"] == 1 else EVAL_S
        return original_eval(self)

    def save(self):
        clock.now += SAVE_S
        return original_save(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    monkeypatch.setattr(Trainer, "save", save)
    settings = settings_for(run_dir, **{**SETTINGS, **train})
    trainer = Trainer(settings, run_dir, "pretrain", start_runtime(settings.train), clock=clock)
    trainer.setup()
    trainer.compiled = compiled or trainer.compiled
    try:
        return trainer.train()
    finally:
        monkeypatch.undo()


@pytest.fixture(scope="module")
def budget_run(tokens, tmp_path_factory):
    run = tmp_path_factory.mktemp("budget_run")
    link_tokens(run, tokens)
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as monkeypatch:
        summary = timed_run(run, clock, monkeypatch)
    return run, summary, clock.now - 1000.0


def test_the_budget_fixes_the_steps_that_fit_and_the_stage_finishes_inside_it(budget_run):
    run, summary, elapsed = budget_run
    record = json.loads((run / "pretrain" / time_budget.BUDGET_FILE).read_text())
    # Before step 1: validation 2 s + the step-0 checkpoint 1.5 s + warm-up 3 s + 3 timed steps 3 s = 9.5 s.
    assert record["seconds_before_training"] == pytest.approx(9.5)
    assert record["seconds_per_step"] == pytest.approx(STEP_S)  # the compiling first step is not a step's time
    assert record["eval_seconds"] == pytest.approx(EVAL_S) and record["checkpoint_seconds"] == pytest.approx(SAVE_S)
    # 20.5 s left, 95% of it usable (19.475 s). 10 steps: 10 s + validations at 4, 8, 10 (6 s) + checkpoints at
    # 8, 10 (3 s) = 19 s fit; 11 steps: 11 + 6 + 3 = 20 s do not.
    assert record["steps"] == summary["steps"] == 10
    assert record["reproduce"] == "--set train.steps=10 --set train.time_budget_minutes=0"
    assert elapsed <= 30.0
    assert elapsed == pytest.approx(9.5 + 19)
    assert max(read_losses(run / "pretrain")) == 10
    meta = json.loads((run / "pretrain" / "checkpoints" / "step_00000010" / "murmur.json").read_text())
    assert meta["train"]["steps"] == 10  # the run record names the fixed number, not the ceiling


def test_the_recorded_steps_reproduce_the_losses_bit_exactly(budget_run, tokens, tmp_path):
    run, summary, _ = budget_run
    link_tokens(tmp_path, tokens)
    plain = settings_for(tmp_path, **{**SETTINGS, "steps": summary["steps"], "time_budget_minutes": 0})
    run_stage(plain, tmp_path, "pretrain")
    assert read_losses(tmp_path / "pretrain") == read_losses(run / "pretrain")  # exact floats, every step
    assert read_val(tmp_path / "pretrain") == read_val(run / "pretrain")
    assert not (tmp_path / "pretrain" / time_budget.BUDGET_FILE).exists()


def test_a_resumed_stage_keeps_the_fixed_steps(budget_run, tokens, tmp_path, monkeypatch):
    run, summary, _ = budget_run
    link_tokens(tmp_path, tokens)
    with pytest.raises(KeyboardInterrupt):
        timed_run(tmp_path, FakeClock(), monkeypatch, crash_at=9)  # after the step-8 checkpoint
    # Resumed on a machine 10 times faster: a new calibration would fit far more steps; the stage keeps 10.
    resumed = timed_run(tmp_path, FakeClock(), monkeypatch, step_s=STEP_S / 10)
    assert resumed["steps"] == summary["steps"] == 10
    assert read_losses(tmp_path / "pretrain") == read_losses(run / "pretrain")


def test_a_budget_too_small_for_one_step_runs_one_and_says_so(tokens, tmp_path, monkeypatch, capsys):
    link_tokens(tmp_path, tokens)
    summary = timed_run(tmp_path, FakeClock(), monkeypatch, time_budget_minutes=0.1)  # 6 s: 9.5 s go before step 1
    assert summary["steps"] == 1
    assert "leaves no room for a step" in capsys.readouterr().out


def test_a_compiled_model_plans_with_a_validation_that_did_not_compile(tokens, tmp_path, monkeypatch):
    link_tokens(tmp_path, tokens)
    timed_run(tmp_path, FakeClock(), monkeypatch, first_eval_s=40.0, compiled=True, time_budget_minutes=1.5)
    record = json.loads((tmp_path / "pretrain" / time_budget.BUDGET_FILE).read_text())
    assert record["eval_seconds"] == pytest.approx(EVAL_S)  # not the 40 s of the compiling first one
    # 40 s first validation + 1.5 s checkpoint + 3 s warm-up + 3 timed steps + the timed validation 2 s = 49.5 s.
    assert record["seconds_before_training"] == pytest.approx(49.5)
    # 40.5 s left, 38.475 s usable: 20 steps cost 20 + 5 × 2 + 3 × 1.5 = 34.5 s; 23 steps 23 + 6 × 2 + 3 × 1.5
    # = 39.5 s do not fit; 22 steps: 22 + 6 × 2 + 3 × 1.5 = 38.5 s do not either; 21: 21 + 12 + 4.5 = 37.5 s.
    assert record["steps"] == 21


def test_a_slower_warmup_fixes_the_steps_again_inside_the_budget(tokens, tmp_path, monkeypatch):
    """The calibration's steps took 1 s, the real ones 1.5 s: at the end of a 6-step warmup the stage fixes
    8 steps instead of 10 and ends inside its 30 s (10 steps would have taken 33.5 s)."""
    link_tokens(tmp_path / "a", tokens)
    clock = FakeClock()
    summary = timed_run(tmp_path / "a", clock, monkeypatch, later_step_s=1.5, warmup_steps=6)
    record = json.loads((tmp_path / "a" / "pretrain" / time_budget.BUDGET_FILE).read_text())
    # At step 6: 9.5 s before training + 6 steps × 1.5 s + the step-4 validation 2 s = 20.5 s; 9.5 s left,
    # 9.025 s usable. 8 steps: 2 × 1.5 + the last validation 2 + the step-8 checkpoint 1.5 = 6.5 s fit;
    # 9 steps: 3 × 1.5 + validations at 8, 9 (4) + checkpoints at 8, 9 (3) = 11.5 s do not.
    assert record["steps_calibrated"] == 10 and record["rechecked_at_step"] == 6
    assert record["seconds_per_step_rechecked"] == pytest.approx(1.5) and record["rechecks"] == 1
    assert record["steps"] == summary["steps"] == 8
    assert record["reproduce"] == "--set train.steps=8 --set train.time_budget_minutes=0"
    assert clock.now - 1000.0 == pytest.approx(27.0)
    # The warmup's learning rates do not depend on the total: the recorded steps reproduce the run exactly.
    link_tokens(tmp_path / "b", tokens)
    run_stage(settings_for(tmp_path / "b", **{**SETTINGS, "warmup_steps": 6, "steps": 8, "time_budget_minutes": 0}),
              tmp_path / "b", "pretrain")
    assert read_losses(tmp_path / "b" / "pretrain") == read_losses(tmp_path / "a" / "pretrain")
    assert read_val(tmp_path / "b" / "pretrain") == read_val(tmp_path / "a" / "pretrain")


def test_a_wsd_schedule_refits_until_its_decay_and_stays_exact(tokens, tmp_path, monkeypatch):
    """wsd holds the peak rate until its decay, whatever the total: the stage refits every RECHECK_WINDOW
    steps (here to a machine 2x slower after the calibration) and the recorded total reproduces the run."""
    settings = {"schedule": "wsd", "decay_fraction": 0.5, "time_budget_minutes": 0.75, "eval_interval": 100,
                "checkpoint_interval": 100}
    link_tokens(tmp_path / "a", tokens)
    clock = FakeClock()
    summary = timed_run(tmp_path / "a", clock, monkeypatch, later_step_s=2.0, **settings)
    record = json.loads((tmp_path / "a" / "pretrain" / time_budget.BUDGET_FILE).read_text())
    # Calibration: 45 s, 9.5 s before training, 35.5 x 0.95 = 33.725 s usable: 30 steps (30 + 2 + 1.5 s).
    # At step 3 (steps 1-3 at 2 s): 15.5 s spent, 28.025 s usable: 12 more steps (24 + 2 + 1.5 = 27.5 s) fit,
    # 13 do not -> 15 steps, whose decay starts at step 7: no later recheck may change them.
    assert record["steps_calibrated"] == 30 and record["rechecks"] == 1 and record["rechecked_at_step"] == 3
    assert summary["steps"] == record["steps"] == 15
    assert clock.now - 1000.0 == pytest.approx(43.0)  # inside the 45 s; the calibrated 30 steps: 71.5 s
    assert record["reproduce"] == f"--set train.steps={record['steps']} --set train.time_budget_minutes=0"
    link_tokens(tmp_path / "b", tokens)
    run_stage(settings_for(tmp_path / "b", **{**SETTINGS, **settings, "steps": record["steps"],
                                              "time_budget_minutes": 0}), tmp_path / "b", "pretrain")
    assert read_losses(tmp_path / "b" / "pretrain") == read_losses(tmp_path / "a" / "pretrain")


def test_the_schedules_say_until_when_the_total_can_change():
    assert time_budget.lr_independent_before("cosine", 100, 10, 0.2) == 10
    assert time_budget.lr_independent_before("wsd", 100, 10, 0.2) == 80
    assert time_budget.lr_independent_before("wsd", 10, 10, 0.5) == 10  # the decay never starts before warmup ends
    assert time_budget.lr_independent_before("constant", 100, 10, 0.2) == 100


def test_a_short_warmup_keeps_the_calibrated_steps(tokens, tmp_path, monkeypatch):
    link_tokens(tmp_path, tokens)
    summary = timed_run(tmp_path, FakeClock(), monkeypatch, later_step_s=1.5)  # warmup 3: too few steps to time
    record = json.loads((tmp_path / "pretrain" / time_budget.BUDGET_FILE).read_text())
    assert summary["steps"] == record["steps"] == 10 and record["rechecked_at_step"] is None


def test_steps_that_fit_counts_evaluations_and_checkpoints():
    # 10 s per step, an evaluation of 30 s every 5 steps and at the end, checkpoints of 5 s every 10 steps.
    assert time_budget.stage_seconds(10, 10, 30, 5, 5, 10) == 100 + 2 * 30 + 5
    assert time_budget.stage_seconds(11, 10, 30, 5, 5, 10) == 110 + 3 * 30 + 2 * 5
    usable = 165 / (1 - time_budget.SAFETY_MARGIN)
    assert time_budget.steps_that_fit(usable, 1000, 10, 30, 5, 5, 10) == 10
    assert time_budget.steps_that_fit(usable, 7, 10, 30, 5, 5, 10) == 7  # never more than the ceiling
    assert time_budget.steps_that_fit(5, 1000, 10, 30, 5, 5, 10) == 0
