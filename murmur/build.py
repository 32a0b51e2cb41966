"""The recipe runner behind `murmur build`: every stage in order, each skipped when nothing it reads changed.

    result = build(load_settings("recipes/demo.toml"))

Each stage records in `RUN_DIR/build.json` a fingerprint of what it read: the settings it depends on, and
the record of the stage(s) before it (their fingerprint and completion time, never the bytes of big files;
for source files, their size and modification time). A stage whose fingerprint matches its record and
whose output is present is skipped; a changed setting therefore reruns its stage and every stage after it.
A stage that rerun because something changed starts from an empty output folder; a stage interrupted
with the same fingerprint keeps its folder, so training resumes from its last checkpoint.

Before any work, `plan_build` checks that every stage to run will find its inputs, either on disk or
written by an earlier stage of the same build, and that the source files exist.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from murmur.config import Settings
from murmur.config import run_dir as settings_run_dir
from murmur.errors import MurmurError
from murmur.files import write_text_atomic

BUILD_FILE = "build.json"
# Bump when the meaning of a fingerprint changes, so that old records never match.
FINGERPRINT_VERSION = 1

StageFunction = Callable[[Settings, Path], dict]


@dataclass(frozen=True)
class Stage:
    """One step of a build: what it reads, what it writes, and the function that does it."""

    name: str
    entry: str  # "module:function"
    reads: tuple[str, ...]  # settings it depends on: sections ("train") or dotted keys ("model.base")
    after: tuple[str, ...]  # stages whose outputs it reads
    outputs: tuple[str, ...]  # folders under the run folder it owns (cleared when it reruns for a change)
    done_marker: str  # a file (relative to the run folder) that exists once the stage has completed
    needs: tuple[str, ...] = ()  # files (relative to the run folder) it reads, for the preflight check
    description: str = ""


STAGES: tuple[Stage, ...] = (
    Stage("data", "murmur.data.pipeline:run_stage", ("data",), (), ("data",), "data/stats.json",
          description="curate posts into posts and conversations"),
    Stage("tokenizer", "murmur.tokenizer:run_stage", ("tokenizer", "model.base"), ("data",), ("tokenizer",),
          "tokenizer/tokenizer.json", ("data/posts.parquet",), "train the tokenizer (or take the base model's)"),
    Stage("tokenize", "murmur.tokenize:run_stage", ("tokenizer", "tokenize"), ("data", "tokenizer"),
          ("tokens",), "tokens/manifest.json", ("data/posts.parquet", "data/conversations.parquet",
                                                "tokenizer/tokenizer.json"),
          "write token shards"),
    Stage("pretrain", "murmur.train.trainer:run_stage", ("model", "train"), ("tokenize",), ("pretrain",),
          "pretrain/checkpoints/latest", ("tokens/manifest.json",), "pretrain the model"),
    Stage("sft", "murmur.train.trainer:run_stage", ("model", "sft"), ("tokenize", "pretrain"), ("sft",),
          "sft/checkpoints/latest", ("tokens/manifest.json", "pretrain/checkpoints/latest"),
          "finetune on conversations"),
    Stage("export", "murmur.export:run_stage", (), ("sft",), ("model",), "model/config.json",
          ("sft/checkpoints/latest",), "export a Hugging Face directory"),
    Stage("eval", "murmur.eval.runner:run_stage", ("eval",), ("export", "tokenize", "data"), ("eval", "report"),
          "eval/results.json", ("model/config.json", "data/conversations.parquet"), "evaluate and write the report"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
STAGE_BY_NAME = {s.name: s for s in STAGES}


@dataclass
class StageStep:
    """What the build will do with one stage, and why."""

    stage: Stage
    action: str  # "run", "skip" (up to date), "omit" (outside --from/--only), "not-needed" (base model)
    reason: str
    clear: bool = False  # empty its output folders before running (its inputs changed)


# How a stage that does not run is reported, by the display and in the build's results.
SKIPPED_WORDS = {"skip": "skipped", "omit": "not selected", "not-needed": "not needed"}


@dataclass
class BuildPlan:
    """The steps of a build, decided before any work is done."""

    settings: Settings
    run_dir: Path
    steps: list[StageStep]
    record: dict[str, Any] = field(default_factory=dict)

    def step(self, name: str) -> StageStep:
        return next(s for s in self.steps if s.stage.name == name)


# --------------------------------------------------------------------------------------------- record


def load_record(run_dir: Path) -> dict[str, Any]:
    """The build record of a run folder ({"stages": {name: {...}}}), empty when there is none."""
    path = Path(run_dir) / BUILD_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {"stages": {}}  # an unreadable record only costs a rebuild
    record.setdefault("stages", {})
    return record


def save_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Write the build record atomically."""
    write_text_atomic(Path(run_dir) / BUILD_FILE, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------------------------------- fingerprints


def _setting(settings: Settings, dotted: str) -> Any:
    """The value at a section or dotted key, as plain data; None when the settings have no such key."""
    node: Any = settings.model_dump(mode="json")
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def stage_settings(settings: Settings, stage: Stage) -> dict[str, Any]:
    """The settings a stage reads, by the names used in recipes."""
    return {key: _setting(settings, key) for key in stage.reads}


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def split_source(source: str) -> tuple[str, str]:
    """'FORMAT:PATH' -> (format, path). A bare path has no format."""
    fmt, sep, path = source.partition(":")
    if not sep:
        return "", source
    return fmt, path


def source_files(source: str) -> list[Path]:
    """The files a FORMAT:PATH source names (a glob may name many); empty when none exist."""
    _, path = split_source(source)
    if not path:
        return []
    path = os.path.expanduser(path)  # as the data stage reads it (murmur.data.sources.resolve_sources)
    if glob.has_magic(path):
        return sorted(Path(p) for p in glob.glob(path, recursive=True) if Path(p).is_file())
    p = Path(path)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file())
    return [p] if p.is_file() else []


def _file_manifest(paths: list[Path]) -> list[list[Any]]:
    """Path, size and modification time of each file: cheap, and changes when a file is replaced."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _bundled_corpus_version(fmt: str) -> str | None:
    """The version of the package a bundled corpus (chitchat:) comes from, so an upgrade rebuilds."""
    if fmt != "chitchat":
        return None
    from importlib import metadata

    try:
        return metadata.version("chitchat-dataset")
    except metadata.PackageNotFoundError:
        return None


def input_files_manifest(settings: Settings, stage: Stage) -> list[Any]:
    """Fingerprint material for files from outside the run folder that a stage reads."""
    items: list[Any] = []
    if stage.name == "data":
        for source in settings.data.sources:
            fmt, _ = split_source(source)
            items.append([source, _file_manifest(source_files(source)), _bundled_corpus_version(fmt)])
        if settings.data.deletions:
            items.append(["deletions", _file_manifest(source_files(f"file:{settings.data.deletions}"))])
    if stage.name == "tokenize":
        for chat in settings.tokenizer.chat_sources:
            items.append(["chat", chat.path, _file_manifest(source_files(f"jsonl:{chat.path}"))])
    base = _base_dir(settings)
    if base is not None and stage.name in ("tokenizer", "sft"):
        items.append(["base", _hf_dir_manifest(base)])
    return items


def _hf_dir_manifest(path: Path) -> list[Any]:
    files = [p for p in sorted(path.iterdir()) if p.is_file()] if path.is_dir() else []
    return _file_manifest(files)


def _upstream_stamp(record: dict[str, Any], name: str) -> list[Any]:
    """What a later stage knows of an earlier one: its fingerprint and when it completed."""
    entry = record.get("stages", {}).get(name, {})
    return [name, entry.get("fingerprint"), entry.get("completed_at")]


def stage_fingerprint(settings: Settings, stage: Stage, record: dict[str, Any]) -> str:
    """The fingerprint of a stage's inputs given the record of the stages before it."""
    return _digest({
        "version": FINGERPRINT_VERSION,
        "stage": stage.name,
        "settings": stage_settings(settings, stage),
        "files": input_files_manifest(settings, stage),
        "upstream": [_upstream_stamp(record, name) for name in stage.after if name in STAGE_BY_NAME],
    })


# --------------------------------------------------------------------------------------- base models


def _base_setting(settings: Settings) -> str | None:
    return getattr(settings.model, "base", None)


def _base_dir(settings: Settings) -> Path | None:
    """The local directory of the base model, when the recipe names one that is already local."""
    base = _base_setting(settings)
    if not base:
        return None
    if base.startswith("hf:"):
        return None
    return Path(base)


def resolve_base_model(settings: Settings) -> Settings:
    """Settings for a build that finetunes `model.base` instead of pretraining.

    A hub id (`hf:ORG/NAME`) is downloaded with huggingface_hub (a clear error when offline). The tokenizer
    stage then takes the base model's tokenizer and SFT starts from its weights, unless the recipe already
    says otherwise (`tokenizer.pretrained`, `sft.init_from`).
    """
    base = _base_setting(settings)
    if not base:
        return settings
    if base.startswith("hf:"):
        path = _download_hub_model(base.removeprefix("hf:"))
    else:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise MurmurError(f"model.base {base} is not a Hugging Face model directory (no config.json there); "
                              "pass a local directory holding config.json, model.safetensors and tokenizer.json, "
                              "or a hub id as hf:ORG/NAME")
        if not (path / "tokenizer.json").is_file():
            raise MurmurError(f"model.base {base} has no tokenizer.json; a base model is finetuned with its own "
                              "tokenizer, so its directory must hold one")
    settings = settings.model_copy(deep=True)
    settings.model.base = str(path)
    if settings.tokenizer.pretrained is None:
        settings.tokenizer.pretrained = str(path)
    if settings.sft.init_from is None:
        settings.sft.init_from = str(path)
    return settings


def _download_hub_model(repo_id: str) -> Path:
    """A hub model's files in the local cache, downloading them when online."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MurmurError("model.base names a hub model but huggingface_hub is not installed; "
                          "pip install huggingface_hub, or download the model and name its directory") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                          "*.model"])
    except Exception as err:  # offline, unknown repo, gated repo: all are the user's to fix
        raise MurmurError(f"could not fetch hf:{repo_id} from the Hugging Face hub ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'}); check the name and the "
                          "network, or download it elsewhere and set model.base to its local directory") from None
    return Path(path)


# ------------------------------------------------------------------------------------------- planning


def _stage_selection(from_stage: str | None, only: str | None) -> tuple[set[str], str]:
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGE_BY_NAME:
            raise MurmurError(f"{flag} {value}: unknown stage; stages are {', '.join(STAGE_NAMES)}")
    if from_stage and only:
        raise MurmurError("pass --from or --only, not both")
    if only:
        return {only}, f"--only {only}"
    if from_stage:
        start = STAGE_NAMES.index(from_stage)
        return set(STAGE_NAMES[start:]), f"--from {from_stage}"
    return set(STAGE_NAMES), ""


def _check_sources(settings: Settings) -> None:
    """Every data source names files that exist, as the data stage's own reader resolves them."""
    from murmur.data.sources import resolve_sources

    if not settings.data.sources:
        raise MurmurError("stage data: the recipe names no sources; add data.sources = [\"FORMAT:PATH\", ...] "
                          "(e.g. \"x-api:posts/*.json\" or \"chitchat:\")")
    try:
        resolve_sources(settings.data.sources)
    except MurmurError as err:
        raise MurmurError(f"stage data: {err}") from None
    if settings.data.deletions and not Path(settings.data.deletions).is_file():
        raise MurmurError(f"stage data: deletions file {settings.data.deletions} not found (data.deletions)")


def _check_inputs(plan: BuildPlan) -> None:
    """Every stage to run finds each input on disk or from an earlier stage of this build."""
    will_write = set()
    for step in plan.steps:
        if step.action == "run":
            if step.stage.name == "data":
                _check_sources(plan.settings)
            for need in step.stage.needs:
                producer = next((s for s in STAGES if s.done_marker == need or need.startswith(
                    tuple(f"{o}/" for o in s.outputs))), None)
                if producer is not None and producer.name in will_write:
                    continue
                if producer is not None and plan.step(producer.name).action == "not-needed":
                    continue  # e.g. no pretraining when finetuning a base model
                if (plan.run_dir / need).exists():
                    continue
                made_by = f" (written by stage {producer.name})" if producer else ""
                raise MurmurError(f"stage {step.stage.name}: input {plan.run_dir / need} is missing{made_by}; "
                                  f"run the build without --from/--only, or start from "
                                  f"--from {producer.name if producer else STAGE_NAMES[0]}")
            _check_setting_paths(plan.settings, step.stage)
            if step.stage.name in ("pretrain", "sft"):
                _check_training_layout(plan.settings, step.stage.name)
        if step.action in ("run", "skip"):
            will_write.add(step.stage.name)


def _check_setting_paths(settings: Settings, stage: Stage) -> None:
    """Paths named in settings that a stage reads must exist."""
    paths: list[tuple[str, str | None]] = []
    if stage.name == "tokenizer":
        paths.append(("tokenizer.pretrained", settings.tokenizer.pretrained))
    if stage.name == "tokenize":
        paths.extend(("tokenizer.chat_sources", chat.path) for chat in settings.tokenizer.chat_sources)
    if stage.name == "sft":
        paths.append(("sft.init_from", settings.sft.init_from))
    for key, value in paths:
        if value and not Path(value).exists():
            raise MurmurError(f"stage {stage.name}: {key} = {value} not found; point it at an existing path")


def intended_world_size(settings: Settings, stage: str) -> int:
    """The number of processes a training stage's layout names (dp_shard=-1, "the rest", counts as 1)."""
    parallel = (settings.train if stage == "pretrain" else settings.sft).parallel
    return parallel.dp_replicate * max(parallel.dp_shard, 1) * parallel.tp


def _check_training_layout(settings: Settings, stage: str) -> None:
    """The trainer's own validation of batch, sequence length and parallel layout, at the intended world size."""
    try:
        from murmur.train.trainer import make_plan
    except ImportError:
        return
    model = None
    init = settings.sft.init_from if stage == "sft" else None
    if init and (Path(init) / "config.json").is_file():
        from murmur import hf

        model = hf.settings_from_hf_config(hf.read_hf_config(init), source=str(Path(init) / "config.json"))
    try:
        make_plan(settings, stage, intended_world_size(settings, stage), model=model)
    except MurmurError as err:
        raise MurmurError(f"stage {stage}: {err}") from None


def plan_build(settings: Settings, from_stage: str | None = None, only: str | None = None) -> BuildPlan:
    """Decide, before any work, which stages run and which are skipped, and check their inputs."""
    settings = resolve_base_model(settings)
    selected, why_selected = _stage_selection(from_stage, only)
    directory = settings_run_dir(settings)
    record = load_record(directory)
    stages_record = record["stages"]
    forced = bool(from_stage or only)
    # Fingerprints are computed against the record as it will be when each stage is reached: a stage that
    # reruns gets a new completion time, so every stage after it is stale too.
    stale_upstream: set[str] = set()
    steps: list[StageStep] = []
    for stage in STAGES:
        if stage.name == "pretrain" and _base_setting(settings):
            steps.append(StageStep(stage, "not-needed", f"finetuning base model {settings.model.base}"))
            continue
        fingerprint = stage_fingerprint(settings, stage, record)
        entry = stages_record.get(stage.name, {})
        done = (entry.get("state") == "completed" and entry.get("fingerprint") == fingerprint
                and (directory / stage.done_marker).exists())
        upstream_changed = any(a in stale_upstream for a in stage.after)
        if stage.name not in selected:
            steps.append(StageStep(stage, "omit", f"outside {why_selected}"))
            continue
        if forced:
            reason = f"asked for by {why_selected}"
        elif not entry:
            reason = "never built"
        elif upstream_changed:
            reason = "an earlier stage reruns"
        elif done:
            steps.append(StageStep(stage, "skip", "up to date"))
            continue
        elif entry.get("fingerprint") != fingerprint:
            changed = _changed_settings(entry.get("settings", {}), stage_settings(settings, stage))
            reason = f"changed: {', '.join(changed)}" if changed else "its inputs changed"
        elif entry.get("state") == "running":
            reason = "resuming an interrupted run"
        else:
            reason = "its output is missing"
        # An interrupted stage with the same inputs keeps its folder (training resumes); anything else
        # starts clean so that no output of the old inputs survives.
        resume = entry.get("state") == "running" and entry.get("fingerprint") == fingerprint and not upstream_changed
        steps.append(StageStep(stage, "run", reason, clear=not resume))
        stale_upstream.add(stage.name)
    plan = BuildPlan(settings, directory, steps, record)
    _check_inputs(plan)
    return plan


def _changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of the settings that differ between two snapshots."""
    changed: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            changed.append(prefix)

    walk(old, new, "")
    return changed[:5] + ([f"… {len(changed) - 5} more"] if len(changed) > 5 else [])


# ------------------------------------------------------------------------------------------ execution


def _load_function(stage: Stage) -> StageFunction:
    module_name, _, attr = stage.entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise MurmurError(f"stage {stage.name}: {module_name} is not part of this installation") from None
        raise
    return getattr(module, attr)


def _call_stage(function: StageFunction, stage: Stage, settings: Settings, directory: Path) -> dict:
    if stage.name in ("pretrain", "sft"):
        return function(settings, directory, stage.name) or {}
    return function(settings, directory) or {}


def _clear_outputs(directory: Path, stage: Stage) -> None:
    for name in stage.outputs:
        path = directory / name
        if path.exists():
            # Rename first so that a crash mid-delete never leaves a half-removed folder under the real name.
            doomed = path.with_name(f".{name}.old.{os.getpid()}")
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class BuildResult:
    """What a build did: per stage, the action taken, its seconds and its summary."""

    run_dir: Path
    stages: list[dict[str, Any]]
    seconds: float

    def ran(self) -> list[str]:
        return [s["stage"] for s in self.stages if s["action"] == "ran"]

    def skipped(self) -> list[str]:
        return [s["stage"] for s in self.stages if s["action"] == "skipped"]


def execute(plan: BuildPlan, functions: dict[str, StageFunction] | None = None, display: Any = None
            ) -> BuildResult:
    """Run the stages a plan says to run, recording each as it starts and completes."""
    from murmur.build_display import BuildDisplay

    display = display or BuildDisplay()
    functions = functions or {}
    directory = plan.run_dir
    directory.mkdir(parents=True, exist_ok=True)
    record = plan.record
    record["recipe_settings"] = plan.settings.to_toml_dict()
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    display.start(plan)
    for index, step in enumerate(plan.steps):
        stage = step.stage
        if step.action != "run":
            action = SKIPPED_WORDS[step.action]
            results.append({"stage": stage.name, "action": action, "reason": step.reason,
                            "summary": record["stages"].get(stage.name, {}).get("summary", {})})
            display.stage_skipped(index, step)
            continue
        # The fingerprint is recomputed now: earlier stages of this build have just written new records.
        fingerprint = stage_fingerprint(plan.settings, stage, record)
        function = functions.get(stage.name) or _load_function(stage)
        if step.clear:
            _clear_outputs(directory, stage)
        record["stages"][stage.name] = {"state": "running", "fingerprint": fingerprint, "started_at": _now(),
                                        "settings": stage_settings(plan.settings, stage)}
        save_record(directory, record)
        display.stage_started(index, step)
        t0 = time.monotonic()
        try:
            summary = _call_stage(function, stage, plan.settings, directory)
        except BaseException:
            display.stage_failed(index, step, time.monotonic() - t0)
            raise
        seconds = time.monotonic() - t0
        if not (directory / stage.done_marker).exists():
            raise MurmurError(f"stage {stage.name} finished without writing {directory / stage.done_marker}; "
                              "its output is incomplete")
        record["stages"][stage.name].update(state="completed", completed_at=_now(), seconds=round(seconds, 2),
                                            summary=_jsonable(summary))
        save_record(directory, record)
        results.append({"stage": stage.name, "action": "ran", "reason": step.reason, "seconds": seconds,
                        "summary": summary})
        display.stage_completed(index, step, seconds, summary)
    result = BuildResult(directory, results, time.monotonic() - started)
    display.finish(plan, result)
    return result


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def build(settings: Settings, from_stage: str | None = None, only: str | None = None,
          functions: dict[str, StageFunction] | None = None, display: Any = None) -> BuildResult:
    """Plan and run a build. `functions` replaces stage functions by name (tests use it)."""
    plan = plan_build(settings, from_stage=from_stage, only=only)
    return execute(plan, functions=functions, display=display)


def outputs_summary(run_dir: Path) -> list[tuple[str, Path]]:
    """Where a build's results live, for the final summary: (what, path) for each that exists."""
    items = [("curated data", "data"), ("tokenizer", "tokenizer"), ("token shards", "tokens"),
             ("pretraining checkpoints", "pretrain/checkpoints"), ("chat checkpoints", "sft/checkpoints"),
             ("model (Hugging Face)", "model"), ("evaluation", "eval/results.json"),
             ("report card", "report/report.md"), ("build record", BUILD_FILE)]
    return [(what, run_dir / rel) for what, rel in items if (run_dir / rel).exists()]
