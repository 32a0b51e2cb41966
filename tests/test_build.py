"""The recipe runner's logic, with fake stage functions that write their stage's files and log their calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from murmur.build import STAGE_NAMES, build, load_record, plan_build
from murmur.build_display import QuietDisplay
from murmur.config import settings_from_dict
from murmur.errors import MurmurError

OUTPUT_FILES = {
    "data": ["data/stats.json", "data/posts.parquet", "data/conversations.parquet"],
    "tokenizer": ["tokenizer/tokenizer.json"],
    "tokenize": ["tokens/manifest.json"],
    "pretrain": ["pretrain/checkpoints/latest"],
    "sft": ["sft/checkpoints/latest"],
    "export": ["model/config.json"],
    "index": ["index/index.json"],
    "eval": ["eval/results.json"],
}


TINY_LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "max_position_embeddings": 512, "tie_word_embeddings": True}


class FakeStages:
    """Stage functions that write their outputs and remember what they were called with."""

    def __init__(self, fail: str | None = None):
        self.calls: list[str] = []
        self.settings_seen: dict = {}
        self.fail = fail

    def functions(self):
        return {name: self._make(name) for name in STAGE_NAMES}

    def _make(self, name):
        def run(settings, run_dir, *stage):
            if stage:
                assert stage == (name,)  # the trainer is told which of its two stages to run
            self.calls.append(name)
            self.settings_seen[name] = settings
            if name == self.fail:
                (Path(run_dir) / name).mkdir(parents=True, exist_ok=True)
                (Path(run_dir) / name / "partial").write_text("half done")
                raise RuntimeError(f"{name} crashed")
            for rel in OUTPUT_FILES[name]:
                path = Path(run_dir) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{name} output")
            return {"stage": name, "value": 1.5}
        return run


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"id": "1", "text": "hello"}\n')
    return path


def _settings(tmp_path, corpus, **sections):
    data = {"run": {"name": "t", "dir": str(tmp_path / "run")},
            "data": {"sources": [f"jsonl:{corpus}"]},
            "model": {"preset": "tiny-cpu"},
            "train": {"steps": 10}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return settings_from_dict(data)


def _build(settings, fakes, **kw):
    return build(settings, functions=fakes.functions(), display=QuietDisplay(), **kw)


def test_first_build_runs_every_stage_in_order_and_records_it(tmp_path, corpus):
    fakes = FakeStages()
    result = _build(_settings(tmp_path, corpus), fakes)
    assert fakes.calls == list(STAGE_NAMES)
    assert result.ran() == list(STAGE_NAMES)
    record = load_record(tmp_path / "run")
    assert set(record["stages"]) == set(STAGE_NAMES)
    assert all(entry["state"] == "completed" for entry in record["stages"].values())
    assert record["stages"]["pretrain"]["settings"]["train"]["steps"] == 10
    assert record["stages"]["eval"]["summary"] == {"stage": "eval", "value": 1.5}


def test_second_build_skips_everything_and_a_training_change_reruns_only_what_follows(tmp_path, corpus):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    fakes.calls.clear()
    result = _build(_settings(tmp_path, corpus), fakes)
    assert fakes.calls == []
    assert result.skipped() == list(STAGE_NAMES)

    plan = plan_build(_settings(tmp_path, corpus, train={"steps": 20}))
    assert "train.steps" in plan.step("pretrain").reason
    _build(_settings(tmp_path, corpus, train={"steps": 20}), fakes)
    assert fakes.calls == ["pretrain", "sft", "export", "eval"]

    fakes.calls.clear()
    _build(_settings(tmp_path, corpus, train={"steps": 20}, sft={"lr": 5e-4}), fakes)
    assert fakes.calls == ["sft", "export", "eval"]


def test_changed_source_file_reruns_the_whole_build(tmp_path, corpus):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    fakes.calls.clear()
    corpus.write_text('{"id": "1", "text": "hello"}\n{"id": "2", "text": "a second post"}\n')
    _build(_settings(tmp_path, corpus), fakes)
    assert fakes.calls == list(STAGE_NAMES)


def test_a_source_under_the_home_folder_is_fingerprinted(tmp_path, monkeypatch):
    from murmur.build import source_files

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "posts.jsonl").write_text("{}\n")
    assert source_files("jsonl:~/posts.jsonl") == [tmp_path / "posts.jsonl"]
    assert source_files("jsonl:~/*.jsonl") == [tmp_path / "posts.jsonl"]


def test_a_deleted_output_reruns_its_stage_and_those_after(tmp_path, corpus):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    fakes.calls.clear()
    (tmp_path / "run" / "model" / "config.json").unlink()
    _build(_settings(tmp_path, corpus), fakes)
    assert fakes.calls == ["export", "eval"]


def test_from_and_only(tmp_path, corpus):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    fakes.calls.clear()
    _build(_settings(tmp_path, corpus), fakes, from_stage="export")
    assert fakes.calls == ["export", "index", "eval"]  # --from: the stage and every one after it
    fakes.calls.clear()
    _build(_settings(tmp_path, corpus), fakes, only="tokenize")
    assert fakes.calls == ["tokenize"]
    # tokenize reran, so what reads its output is stale on the next plain build
    fakes.calls.clear()
    _build(_settings(tmp_path, corpus), fakes)
    assert fakes.calls == ["pretrain", "sft", "export", "eval"]


def test_stage_missing_its_input_fails_before_any_work(tmp_path, corpus):
    fakes = FakeStages()
    with pytest.raises(MurmurError) as err:
        _build(_settings(tmp_path, corpus), fakes, only="sft")
    message = str(err.value)
    assert "stage sft" in message and str(tmp_path / "run" / "tokens" / "manifest.json") in message
    assert fakes.calls == []
    with pytest.raises(MurmurError, match="stage export: input .*sft/checkpoints/latest"):
        _build(_settings(tmp_path, corpus), fakes, from_stage="export")
    assert fakes.calls == []


def test_missing_corpus_fails_before_any_work_naming_stage_and_file(tmp_path, corpus):
    fakes = FakeStages()
    missing = tmp_path / "nowhere" / "posts-*.json"
    settings = _settings(tmp_path, corpus, data={"sources": [f"jsonl:{corpus}", f"x-api:{missing}"]})
    with pytest.raises(MurmurError) as err:
        _build(settings, fakes)
    assert "stage data" in str(err.value) and str(missing) in str(err.value)
    assert fakes.calls == [] and not (tmp_path / "run").exists()
    with pytest.raises(MurmurError, match="stage data: the recipe names no sources"):
        _build(_settings(tmp_path, corpus, data={"sources": []}), fakes)
    with pytest.raises(MurmurError, match="stage data: deletions file"):
        _build(_settings(tmp_path, corpus, data={"deletions": str(tmp_path / "gone.txt")}), fakes)


def test_interrupted_stage_resumes_in_place_but_a_changed_one_starts_clean(tmp_path, corpus):
    crashing = FakeStages(fail="pretrain")
    with pytest.raises(RuntimeError):
        _build(_settings(tmp_path, corpus), crashing)
    assert load_record(tmp_path / "run")["stages"]["pretrain"]["state"] == "running"
    partial = tmp_path / "run" / "pretrain" / "partial"
    assert partial.exists()

    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    assert fakes.calls == ["pretrain", "sft", "export", "index", "eval"]  # the index was never reached
    assert partial.exists()  # same inputs: the folder (its checkpoints) was kept so training resumes

    _build(_settings(tmp_path, corpus, train={"steps": 30}), fakes)
    assert not partial.exists()  # changed inputs: old checkpoints must not be resumed
    assert (tmp_path / "run" / "pretrain" / "checkpoints" / "latest").exists()


def test_base_model_skips_pretraining_and_finetunes_with_its_tokenizer(tmp_path, corpus):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    (base / "tokenizer.json").write_text("{}")
    fakes = FakeStages()
    result = _build(_settings(tmp_path, corpus, model={"base": str(base)}), fakes)
    assert fakes.calls == ["data", "tokenizer", "tokenize", "sft", "export", "index", "eval"]
    assert [s["action"] for s in result.stages if s["stage"] == "pretrain"] == ["not needed"]
    seen = fakes.settings_seen["sft"]
    assert seen.sft.init_from == str(base) and seen.tokenizer.pretrained == str(base)

    with pytest.raises(MurmurError, match="model.base .* not a Hugging Face model directory"):
        _build(_settings(tmp_path, corpus, model={"base": str(tmp_path)}), fakes)


def test_unknown_stage_and_both_flags_are_refused(tmp_path, corpus):
    with pytest.raises(MurmurError, match="unknown stage"):
        plan_build(_settings(tmp_path, corpus), only="train")
    with pytest.raises(MurmurError, match="not both"):
        plan_build(_settings(tmp_path, corpus), only="sft", from_stage="data")


def _murmur(*args, env=None):
    return subprocess.run([sys.executable, "-m", "murmur", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_dry_run_prints_the_plan_and_errors_are_one_line(tmp_path, corpus):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\nname = "t"\ndir = "{tmp_path / "run"}"\n[data]\nsources = ["jsonl:{corpus}"]\n'
                      f'[model]\nbase = "hf:nobody-org/no-such-model"\n')
    proc = _murmur("build", str(recipe), "--dry-run", "--set", "model.base=", "--set", "train.steps=5")
    assert proc.returncode == 0, proc.stderr
    assert "never built" in proc.stdout and "pretrain" in proc.stdout
    assert not (tmp_path / "run").exists()

    proc = _murmur("build", str(recipe), "--dry-run", "--set", f"data.sources=['jsonl:{tmp_path}/none.jsonl']",
                   "--set", "model.base=")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "stage data" in proc.stderr and "none.jsonl" in proc.stderr

    # an offline machine gets a clear message, not a traceback
    proc = _murmur("build", str(recipe), "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    assert "could not fetch hf:nobody-org/no-such-model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("recipe", sorted(Path(__file__).parent.parent.glob("recipes/*.toml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe, tmp_path):
    """Every shipped recipe loads, and its build plan (inputs checked) passes once its corpus exists."""
    from murmur.config import load_settings

    settings = load_settings(recipe, [f"run.dir={tmp_path / 'run'}"])
    posts = tmp_path / "posts.jsonl"
    posts.write_text('{"id": "1", "text": "hi"}\n')
    overrides = {"run": {"dir": str(tmp_path / "run")}}
    if any(not s.startswith("chitchat:") for s in settings.data.sources):
        overrides["data"] = {"sources": [f"jsonl:{posts}"]}
    if settings.model.base:
        base = tmp_path / "base"
        base.mkdir()
        (base / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
        (base / "tokenizer.json").write_text("{}")
        overrides["model"] = {"base": str(base)}
    data = settings.model_dump(mode="json", exclude_none=True)
    for key, value in overrides.items():
        data[key].update(value)
    plan = plan_build(settings_from_dict(data))
    assert [s.action for s in plan.steps if s.stage.name != "pretrain"] == ["run"] * (len(STAGE_NAMES) - 1)


def test_bad_layout_and_missing_chat_source_fail_in_the_plan(tmp_path, corpus):
    with pytest.raises(MurmurError, match="stage pretrain: .*global_batch_tokens"):
        plan_build(_settings(tmp_path, corpus, train={"global_batch_tokens": 1000}))
    with pytest.raises(MurmurError, match="stage tokenize: tokenizer.chat_sources = .*extra.jsonl not found"):
        plan_build(_settings(tmp_path, corpus, tokenizer={"chat_sources": [{"path": str(tmp_path / "extra.jsonl")}]}))


def test_demo_builds_the_shipped_recipe_then_serves_the_run(monkeypatch, tmp_path):
    import murmur.build
    import murmur.cli
    from murmur.commands import demo

    built, served = [], []

    class Result:
        run_dir = tmp_path / "runs" / "demo"
        stages: list = []

    monkeypatch.setattr(murmur.build, "build", lambda settings: built.append(settings) or Result())
    monkeypatch.setattr(murmur.cli, "main", lambda argv: served.append(argv) or 0)
    monkeypatch.setattr(demo, "write_card", lambda *a, **k: tmp_path / "report.md")  # tests/test_demo_recipe.py
    assert demo.run(demo.argparse.Namespace(overrides=["sft.steps=3", "serve.port=9001"], host=None, port=None,
                                            no_serve=False)) == 0
    assert built[0].data.sources == ["chitchat:"] and built[0].model.preset == "tiny-cpu"
    assert built[0].sft.steps == 3
    assert served == [["serve", str(Result.run_dir), "--recipe", str(demo.demo_recipe()), "--set=serve.port=9001"]]
