"""`murmur plan` from the command line: output, launch files the trainer accepts, and refused input."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from murmur.cli import main
from murmur.config import load_settings


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["plan", *argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_json_plan_for_a_preset(capsys):
    code, out, _ = _run(capsys, "--gpu", "h200", "--gpus", "64", "--preset", "8b", "--tokens", "1T",
                        "--price-per-gpu-hour", "3.5", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["gpu"]["name"] == "h200" and plan["gpu"]["count"] == 64
    assert plan["model"]["parameters"] == pytest.approx(8.03e9, rel=0.01)
    s = plan["schedule"]
    assert s["tokens"] == 1e12
    assert s["cost"] == pytest.approx(s["gpu_hours"] * 3.5)
    best = plan["layouts"][0]
    assert best["dp_replicate"] * best["dp_shard"] * best["tp"] * best["pp"] == 64
    assert best["memory_gib"]["total"] < 141e9 / 2**30
    assert s["wall_days"] >= s["compute_days"] > 0


def test_console_table(capsys):
    code, out, _ = _run(capsys, "--gpu", "a100-80gb", "--gpus", "256", "--params", "13B", "--days", "14")
    assert code == 0
    assert "tokens trainable in 14 days" in out and "goodput" in out and "Young/Daly" in out
    assert re.search(r"^ 1\*? +\d+ +\d+ +\d+ ", out, re.M), out


def test_written_recipe_and_scripts_are_accepted(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "plan"
    code, out, _ = _run(capsys, "--gpu", "h100", "--gpus", "16", "--preset", "1b", "--tokens", "20B",
                        "--seq-len", "4096", "--write", str(out_dir), "--run-name", "fleet-test")
    assert code == 0 and "wrote recipe" in out
    recipe = out_dir / "recipe.toml"
    settings = load_settings(recipe)
    par = settings.train.parallel
    assert par.dp_replicate * par.dp_shard * par.tp == 16
    assert settings.model.preset == "1b" and settings.train.seq_len == 4096 and settings.run.name == "fleet-test"
    assert settings.train.global_batch_tokens % (4096 * settings.train.micro_batch_size * par.dp_replicate
                                                 * par.dp_shard) == 0
    assert settings.train.steps * settings.train.global_batch_tokens >= 20e9

    for script in ("launch_torchrun.sh", "launch.sbatch"):
        path = out_dir / script
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
        assert "-m murmur train" in path.read_text()
    torchrun = (out_dir / "launch_torchrun.sh").read_text()
    assert "--nnodes=2" in torchrun and "--nproc-per-node=8" in torchrun
    assert os.access(out_dir / "launch_torchrun.sh", os.X_OK)
    sbatch = (out_dir / "launch.sbatch").read_text()
    assert re.search(r"^#SBATCH --nodes=2$", sbatch, re.M) and re.search(r"^#SBATCH --gpus-per-node=8$", sbatch, re.M)
    assert re.search(r"^#SBATCH --time=\d+-\d\d:\d\d:00$", sbatch, re.M)

    # The trainer's own validation of the recipe for the planned world size: `murmur train RECIPE --dry-run`,
    # called in this process (a fresh interpreter would spend most of the test budget importing torch).
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(recipe), "--dry-run", "--world-size", "16"]) == 0
    dry = capsys.readouterr().out
    assert "dry run: the recipe and layout are valid" in dry and "dp_shard" in dry


def test_calibrated_efficiency(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": i, "mfu": 0.05 if i < 2 else 0.31} for i in range(20)] + [{"step": 20, "mfu": None}]
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, out, _ = _run(capsys, "--gpu", "h100", "--gpus", "8", "--preset", "1b", "--calibrate-from",
                        str(metrics), "--json")
    assert code == 0 and json.loads(out)["efficiency"] == pytest.approx(0.31)
    metrics.write_text(json.dumps({"step": 1, "mfu": None}) + "\n")
    code, _, err = _run(capsys, "--gpu", "h100", "--gpus", "8", "--preset", "1b", "--calibrate-from", str(metrics))
    assert code == 1 and "no record has an mfu" in err


@pytest.mark.parametrize("argv", [
    ["--gpus", "0", "--preset", "8b"],
    ["--gpus", "-8", "--preset", "8b"],
    ["--gpus", "8", "--params", "-7B"],
    ["--gpus", "8", "--preset", "8b", "--tokens", "0"],
    ["--gpus", "8", "--preset", "8b", "--days", "-1"],
    ["--gpus", "8", "--preset", "8b", "--mfu", "1.5"],
    ["--gpus", "8", "--preset", "8b", "--price-per-gpu-hour", "0"],
    ["--gpus", "8", "--preset", "8b", "--failure-rate", "-1e-5"],
    ["--gpus", "8", "--preset", "8b", "--seq-len", "0"],
    ["--gpus", "8", "--preset", "8b", "--tokens", "lots"],
])
def test_bad_numbers_are_usage_errors(capsys, argv):
    code, _, err = _run(capsys, "--gpu", "h100", *argv)
    assert code == 2 and "error: argument" in err


def test_explained_failures(capsys):
    code, _, err = _run(capsys, "--gpu", "tpu-v5", "--gpus", "8", "--preset", "8b")
    assert code == 1 and "unknown GPU 'tpu-v5'; known GPUs: a100-40gb" in err and "b200" in err
    assert len(err.strip().splitlines()) == 1

    code, _, err = _run(capsys, "--gpu", "a100-40gb", "--gpus", "8", "--preset", "405b")
    assert code == 1 and "no layout" in err and "fits on" in err and len(err.strip().splitlines()) == 1

    code, _, err = _run(capsys, "--gpu", "h100", "--gpus", "12", "--preset", "8b")
    assert code == 1 and "whole number of 8-GPU nodes" in err

    code, _, err = _run(capsys, "--gpu", "h100", "--gpus", "8")
    assert code == 1 and "give a model" in err

    code, _, err = _run(capsys, "--gpu", "h100", "--gpus", "8", "--preset", "8b", "--global-batch-tokens", "10000")
    assert code == 1 and "not a multiple of the sequence length 8192" in err

    code, _, err = _run(capsys, "--gpu", "h100", "--gpus", "1024", "--preset", "8b", "--global-batch-tokens", "8192")
    assert code == 1 and "no layout of 1024 GPUs divides a global batch" in err


def test_shape_flags_recipe(tmp_path, capsys):
    code, _, _ = _run(capsys, "--gpu", "a100-80gb", "--gpus", "8", "--dim", "1024", "--n-layers", "8", "--n-heads",
                      "8", "--n-kv-heads", "4", "--vocab-size", "32000", "--seq-len", "2048", "--write", str(tmp_path))
    assert code == 0
    model = load_settings(tmp_path / "recipe.toml").model
    assert (model.dim, model.n_layers, model.kv_heads, model.vocab_size, model.max_seq_len) == (1024, 8, 4, 32000, 2048)


@pytest.mark.parametrize("preset,gpus,batch", [("8b", 1024, None), ("8b", 16384, None), ("405b", 1024, None),
                                               ("405b", 16384, None), ("405b", 16384, "16777216")])
def test_planned_fleet_layout_is_accepted_by_the_trainer(tmp_path, capsys, monkeypatch, preset, gpus, batch):
    """The planner's fastest layout, pipeline parallel or not, is what the recipe holds and what
    `murmur train --dry-run` accepts for that many processes (the closing table of docs/plan.md).
    Llama 3's 16M-token batch on 16,384 GPUs makes a pipeline the fastest layout for 405B."""
    out_dir = tmp_path / "plan"
    code, out, _ = _run(capsys, "--gpu", "h100", "--gpus", str(gpus), "--preset", preset, "--json",
                        "--write", str(out_dir), *(["--global-batch-tokens", batch] if batch else []))
    assert code == 0
    best = json.loads(out)["layouts"][0]
    par = load_settings(out_dir / "recipe.toml").train.parallel
    assert (par.pp, par.dp_replicate, par.dp_shard, par.tp, par.virtual_stages) == (
        best["pp"], best["dp_replicate"], best["dp_shard"], best["tp"], best["virtual_stages"])
    assert par.pp_schedule == best["pp_schedule"]
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(out_dir / "recipe.toml"), "--dry-run", "--world-size", str(gpus)]) == 0
    dry = capsys.readouterr().out
    assert "dry run: the recipe and layout are valid" in dry
    if batch:
        assert best["pp"] > 1 and f"pp {best['pp']} ({best['pp_schedule']}" in dry


def test_pipeline_layouts_only_for_untied_heads():
    """The trainer puts the embedding and the head on different stages: a tied model gets no pipeline."""
    from murmur.plan.memory import ModelFacts
    from murmur.plan.search import pipeline_degrees
    from murmur.settings.model import ModelSettings

    untied = ModelFacts(ModelSettings(preset="70b"), 8192)
    tied = ModelFacts(ModelSettings(preset="70b", tie_embeddings=True), 8192)
    assert max(pipeline_degrees(untied, 1024, 8, 8)) > 1
    assert pipeline_degrees(tied, 1024, 8, 8) == [1]
