"""The demo's two recipes and `murmur demo`: what they promise, checked without training anything."""

from __future__ import annotations

import argparse
import tomllib

import pytest

from murmur.commands import demo
from murmur.config import load_settings

DEMO_MINUTES = 20  # the whole `make demo` after the install, on 2 AVX2-only cores (README, docs/build.md)


@pytest.fixture(scope="module")
def recipes():
    return {name: load_settings(demo.recipe_path(name)) for name in (demo.SCRATCH_RECIPE, demo.OPEN_MODEL_RECIPE)}


def test_the_served_recipe_finetunes_the_open_model_with_lora(recipes):
    served = recipes[demo.OPEN_MODEL_RECIPE]
    assert demo.demo_recipe().name == demo.OPEN_MODEL_RECIPE
    assert served.model.base == "smollm2-135m-instruct"
    assert served.sft.lora_rank > 0 and served.sft.dtype == "float32"
    scratch = recipes[demo.SCRATCH_RECIPE]
    assert scratch.model.base is None and scratch.model.preset == "tiny-cpu"
    assert served.run.name != scratch.run.name


def test_both_recipes_read_the_same_data_and_evaluate_alike(recipes):
    raw = {name: tomllib.loads(demo.recipe_path(name).read_text()) for name in recipes}
    scratch, served = raw[demo.SCRATCH_RECIPE], raw[demo.OPEN_MODEL_RECIPE]
    assert scratch["data"] == served["data"]  # same posts, splits and contexts: the card compares like with like
    assert scratch["eval"] == served["eval"] and scratch["index"] == served["index"]
    assert len(served["eval"]["prompts"]) == 10  # the ten everyday prompts of the card and the README


def test_every_training_stage_has_a_budget_that_leaves_room_for_the_rest(recipes):
    scratch, served = recipes[demo.SCRATCH_RECIPE], recipes[demo.OPEN_MODEL_RECIPE]
    budgets = [scratch.train.time_budget_minutes, scratch.sft.time_budget_minutes, served.sft.time_budget_minutes]
    assert all(b > 0 for b in budgets)
    # Data, tokenizers, exports, three evaluations and the card take the rest (docs/journal.md has the split).
    assert sum(budgets) <= DEMO_MINUTES - 8
    for settings in recipes.values():
        assert settings.eval.checkpoints == "latest" and settings.eval.ranking_examples <= 50


def test_murmur_demo_builds_scratch_then_the_open_model_writes_the_card_and_serves_it(monkeypatch, tmp_path):
    import murmur.build
    import murmur.cli

    built, cards, served = [], [], []

    class Result:
        def __init__(self, name):
            self.run_dir, self.stages = tmp_path / "runs" / name, [{"stage": "sft", "seconds": 1.0}]

    monkeypatch.setattr(murmur.build, "build", lambda settings: built.append(settings) or Result(settings.run.name))
    monkeypatch.setattr(demo, "write_card", lambda scratch, settings: cards.append((scratch, settings.run.name))
                        or tmp_path / "report.md")
    monkeypatch.setattr(murmur.cli, "main", lambda argv: served.append(argv) or 0)
    args = argparse.Namespace(overrides=["sft.time_budget_minutes=0.5"], host=None, port=9002, no_serve=False)
    assert demo.run(args) == 0
    assert [s.run.name for s in built] == ["demo-scratch", "demo"]
    assert all(s.sft.time_budget_minutes == 0.5 for s in built)  # --set reaches both recipes
    assert cards == [(tmp_path / "runs" / "demo-scratch", "demo")]
    assert served == [["serve", str(tmp_path / "runs" / "demo"), "--recipe", str(demo.demo_recipe()),
                       "--port", "9002"]]
