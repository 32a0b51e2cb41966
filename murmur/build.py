"""The recipe runner behind `murmur build`: every stage in order, each skipped when nothing it reads changed.

    result = build(load_settings("recipes/demo.toml"))

Each stage records in `RUN_DIR/build.json` a fingerprint of what it read: the settings it depends on (by
dotted key, `murmur.fingerprint`), and the record of the stage(s) before it (their fingerprint and
completion time, never the bytes of big files; for source files, their size and modification time). A stage
whose fingerprint matches its record and whose output is present is skipped; a changed setting therefore
reruns its stage and every stage after it that reads what changed. A stage that rerun because something
changed starts from an empty output folder; a stage interrupted with the same fingerprint keeps its folder,
so training resumes from its last checkpoint.

Some settings change only part of a stage's output: the chat settings of tokenize change the chat
finetuning shards, not the pretraining ones. A later stage names such settings (`Stage.unaffected_by`), and
what it records of the earlier stage is then a *view*: the earlier stage's fingerprint without them, and
the time that view last changed. A rerun explained by those settings alone leaves the view as it was; a
rerun nothing explains (forced, output missing) changes it, as any rerun changes a whole stamp.

Before any work, `plan_build` checks that every stage to run will find its inputs, either on disk or
written by an earlier stage of the same build, and runs each stage's own preflight checks.
"""

from __future__ import annotations

import datetime as _dt
import glob
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

from murmur.build_types import (
    BUILD_FILE,
    Action,
    BuildPlan,
    BuildResult,
    Stage,
    StageFunction,
    StageStep,
)
from murmur.config import Settings
from murmur.config import run_dir as settings_run_dir
from murmur.errors import MurmurError
from murmur.files import remove_dir, write_json_atomic
from murmur.fingerprint import digest, is_under, settings_by_key
from murmur.settings.train import training_settings

# Bump when the meaning of a fingerprint changes, so that old records never match.
FINGERPRINT_VERSION = 1

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
    """Write the build record atomically (its summaries are made JSON by `_jsonable` first)."""
    write_json_atomic(Path(run_dir) / BUILD_FILE, record)


# ---------------------------------------------------------------------------------- files from outside


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


def _hf_dir_manifest(path: Path) -> list[Any]:
    files = [p for p in sorted(path.iterdir()) if p.is_file()] if path.is_dir() else []
    return _file_manifest(files)


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
        from murmur.source import local_model_dir  # a GGUF (gguf:PATH, a short name) becomes a cached HF folder
        path = local_model_dir(base)
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


# ------------------------------------------------------------------------------------------ stage hooks
# Files from outside the run folder each stage reads, as (the setting naming them, fingerprint material).


def _data_files(settings: Settings) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for source in settings.data.sources:
        fmt, _ = split_source(source)
        items.append(("data.sources", [source, _file_manifest(source_files(source)), _bundled_corpus_version(fmt)]))
    if settings.data.deletions:
        items.append(("data.deletions",
                      ["deletions", _file_manifest(source_files(f"file:{settings.data.deletions}"))]))
    return items


def _chat_files(settings: Settings) -> list[tuple[str, Any]]:
    return [("tokenizer.chat_sources", ["chat", chat.path, _file_manifest(source_files(f"jsonl:{chat.path}"))])
            for chat in settings.tokenizer.chat_sources]


def _base_model_files(settings: Settings) -> list[tuple[str, Any]]:
    base = _base_dir(settings)
    return [] if base is None else [("model.base", ["base", _hf_dir_manifest(base)])]


# Preflight checks: each raises MurmurError naming the stage.


def _check_sources(settings: Settings, stage: Stage) -> None:
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


def _check_paths(stage: Stage, paths: list[tuple[str, str | None]]) -> None:
    """Paths named in settings that a stage reads must exist."""
    for key, value in paths:
        if value and not Path(value).exists():
            raise MurmurError(f"stage {stage.name}: {key} = {value} not found; point it at an existing path")


def _check_tokenizer(settings: Settings, stage: Stage) -> None:
    _check_paths(stage, [("tokenizer.pretrained", settings.tokenizer.pretrained)])


def _check_tokenize(settings: Settings, stage: Stage) -> None:
    _check_paths(stage, [("tokenizer.chat_sources", chat.path) for chat in settings.tokenizer.chat_sources])


def _check_pretrain(settings: Settings, stage: Stage) -> None:
    _check_training_layout(settings, stage.name)


def _check_sft(settings: Settings, stage: Stage) -> None:
    _check_training_layout(settings, stage.name)


def _check_index(settings: Settings, stage: Stage) -> None:
    from importlib.util import find_spec

    if settings.index.url and find_spec("psycopg") is None:
        raise MurmurError(f"stage {stage.name}: index.url names a PostgreSQL server but psycopg is not installed; "
                          "pip install 'murmur[postgres]', or unset index.url for SQLite in RUN/index/")


def intended_world_size(settings: Settings, stage: str) -> int:
    """The number of processes a training stage's layout names (dp_shard=-1, "the rest", counts as 1)."""
    parallel = training_settings(settings, stage).parallel
    return parallel.dp_replicate * max(parallel.dp_shard, 1) * parallel.tp


def _check_training_layout(settings: Settings, stage: str) -> None:
    """The trainer's own validation of batch, sequence length and parallel layout, at the intended world size,
    for the model it will train: [model], or the one SFT starts from, resolved as the trainer resolves it."""
    from murmur.source import resolve_training_start
    from murmur.train.trainer import make_plan

    init = settings.sft.init_from if stage == "sft" else None
    try:
        model = resolve_training_start(init, "sft.init_from").settings if init else None
        make_plan(settings, stage, intended_world_size(settings, stage), model=model)
    except MurmurError as err:
        raise MurmurError(f"stage {stage}: {err}") from None


def _not_needed_with_a_base_model(settings: Settings) -> str | None:
    return f"finetuning base model {settings.model.base}" if _base_setting(settings) else None


def _call_trainer(function: StageFunction, settings: Settings, run_dir: Path, stage: Stage) -> dict:
    """The trainer runs both training stages and is told which."""
    return function(settings, run_dir, stage.name)


# ------------------------------------------------------------------------------------------- the stages

# Tokenize settings that change only the chat finetuning shards (see murmur.tokenize: they choose, weigh and
# sample the chats); pretraining reads none of them. A setting left off this list reruns pretraining.
CHAT_SHARD_SETTINGS = ("tokenizer.sft_roles", "tokenizer.thread_weight", "tokenizer.chat_sources", "tokenizer.seed")
# Settings of the [tokenizer] section that only the tokenize stage reads; the tokenizer stage ignores them.
# A setting left off this list retrains the tokenizer.
TOKENIZE_ONLY_SETTINGS = CHAT_SHARD_SETTINGS + ("tokenizer.shard_tokens",)
# Index settings the parent-recall evaluation depends on (murmur.index.parent_recall); the eval stage reads them.
RECALL_SETTINGS = ("index.candidates", "index.recency_weight", "index.recency_half_life_hours",
                   "index.max_query_chars", "index.max_query_terms", "index.recall_examples")
# Index settings that change no row of a built index: how it is queried, followed or written in batches.
# The index stage ignores them; a setting left off this list rebuilds the index.
INDEX_QUERY_SETTINGS = RECALL_SETTINGS + ("index.top_k", "index.poll_interval_s", "index.max_record_bytes",
                                          "index.max_json_depth", "index.batch_size")

STAGES: tuple[Stage, ...] = (
    Stage("data", "murmur.data.pipeline:run_stage", ("data",), (), ("data",), "data/stats.json",
          description="curate posts into posts and conversations", input_files=_data_files,
          preflight=_check_sources),
    Stage("tokenizer", "murmur.tokenizer:run_stage", ("tokenizer", "model.base"), ("data",), ("tokenizer",),
          "tokenizer/tokenizer.json", ("data/posts.parquet",), "train the tokenizer (or take the base model's)",
          ignores=TOKENIZE_ONLY_SETTINGS, input_files=_base_model_files, preflight=_check_tokenizer),
    Stage("tokenize", "murmur.tokenize:run_stage", ("tokenizer",), ("data", "tokenizer"), ("tokens",),
          "tokens/manifest.json", ("data/posts.parquet", "data/conversations.parquet", "tokenizer/tokenizer.json"),
          "write token shards", input_files=_chat_files, preflight=_check_tokenize),
    Stage("pretrain", "murmur.train.trainer:run_stage", ("model", "train"), ("tokenize",), ("pretrain",),
          "pretrain/checkpoints/latest", ("tokens/manifest.json",), "pretrain the model",
          unaffected_by=CHAT_SHARD_SETTINGS, preflight=_check_pretrain, call=_call_trainer,
          not_needed=_not_needed_with_a_base_model),
    Stage("sft", "murmur.train.trainer:run_stage", ("model", "sft"), ("tokenize", "pretrain"), ("sft",),
          "sft/checkpoints/latest", ("tokens/manifest.json", "pretrain/checkpoints/latest"),
          "finetune on conversations", input_files=_base_model_files, preflight=_check_sft, call=_call_trainer),
    Stage("export", "murmur.export:run_stage", (), ("sft",), ("model",), "model/config.json",
          ("sft/checkpoints/latest",), "export a Hugging Face directory"),
    # outputs=(): a rerun must not clear index/ first; the stage swaps its new index in itself and carries
    # over the old one's tombstones, which a cleared SQLite file would lose (deletions applied by --follow).
    Stage("index", "murmur.index:run_stage", ("index",), ("data",), (), "index/index.json",
          ("data/posts.parquet",), "index the posts for retrieval", ignores=INDEX_QUERY_SETTINGS,
          preflight=_check_index),
    Stage("eval", "murmur.eval.runner:run_stage", ("eval", *RECALL_SETTINGS), ("export", "tokenize", "data", "index"),
          ("eval", "report"), "eval/results.json", ("model/config.json", "data/conversations.parquet"),
          "evaluate and write the report"),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
STAGE_BY_NAME = {s.name: s for s in STAGES}


# ---------------------------------------------------------------------------------------- fingerprints


def stage_settings(settings: Settings, stage: Stage) -> dict[str, Any]:
    """The settings a stage reads, by the names used in recipes."""
    return settings_by_key(settings, stage.reads, ignore=stage.ignores)


def stage_fingerprint(settings: Settings, stage: Stage, record: dict[str, Any], ignore: tuple[str, ...] = ()
                      ) -> str:
    """The fingerprint of a stage's inputs given the record of the stages before it; `ignore` leaves out
    more of its settings (and the files they name), for the view a later stage takes of it."""
    ignored = stage.ignores + ignore
    return digest({
        "version": FINGERPRINT_VERSION,
        "stage": stage.name,
        "settings": settings_by_key(settings, stage.reads, ignore=ignored),
        "files": [item for key, item in stage.input_files(settings) if not is_under(key, ignored)],
        "upstream": [_upstream_stamp(record, stage, name) for name in stage.after],
    })


def _unaffecting(stage: Stage, upstream: Stage) -> tuple[str, ...]:
    """Settings `upstream` reads that change none of the files `stage` reads of it."""
    return tuple(key for key in stage.unaffected_by if is_under(key, upstream.reads))


def _upstream_stamp(record: dict[str, Any], stage: Stage, name: str) -> list[Any]:
    """What a later stage knows of an earlier one: its fingerprint and when it completed, or its view of it."""
    entry = record.get("stages", {}).get(name, {})
    if _unaffecting(stage, STAGE_BY_NAME[name]):
        view = entry.get("views", {}).get(stage.name, {})
        return [name, view.get("fingerprint"), view.get("changed_at")]
    return [name, entry.get("fingerprint"), entry.get("completed_at")]


def _view_changes(old: dict[str, Any] | None, view_fingerprint: str, fingerprint: str) -> bool:
    """Whether a rerun with `fingerprint` changes a later stage's view: unless the view's fingerprint is the
    same and the rerun is explained by a changed setting outside it (the whole fingerprint differs)."""
    return not old or old.get("fingerprint") != view_fingerprint or old.get("of") == fingerprint


def _views(settings: Settings, stage: Stage, record: dict[str, Any], fingerprint: str, old: dict[str, Any],
           now: str) -> dict[str, Any]:
    """The views later stages take of `stage`, just completed with `fingerprint`."""
    views = {}
    for later in STAGES:
        ignored = _unaffecting(later, stage) if stage.name in later.after else ()
        if not ignored:
            continue
        view_fingerprint = stage_fingerprint(settings, stage, record, ignored)
        previous = old.get(later.name)
        changed_at = now if _view_changes(previous, view_fingerprint, fingerprint) else previous["changed_at"]
        views[later.name] = {"fingerprint": view_fingerprint, "of": fingerprint, "changed_at": changed_at}
    return views


def _rerun_reaches(settings: Settings, record: dict[str, Any], stage: Stage, name: str, rerunning: set[str],
                   planned: dict[str, str]) -> bool:
    """Whether the rerun of earlier stage `name` changes what `stage` reads of it (as `_views` will find)."""
    upstream = STAGE_BY_NAME[name]
    ignored = _unaffecting(stage, upstream)
    if not ignored or any(a in rerunning for a in upstream.after):
        return True
    old = record["stages"].get(name, {}).get("views", {}).get(stage.name)
    return _view_changes(old, stage_fingerprint(settings, upstream, record, ignored), planned[name])


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


def _check_inputs(plan: BuildPlan) -> None:
    """Every stage to run finds each input on disk or from an earlier stage of this build, and passes its
    own preflight checks."""
    will_write = set()
    for step in plan.steps:
        if step.action == Action.RUN:
            for need in step.stage.needs:
                producer = next((s for s in STAGES if s.done_marker == need or need.startswith(
                    tuple(f"{o}/" for o in s.outputs))), None)
                if producer is not None and producer.name in will_write:
                    continue
                if producer is not None and plan.step(producer.name).action == Action.NOT_NEEDED:
                    continue  # e.g. no pretraining when finetuning a base model
                if (plan.run_dir / need).exists():
                    continue
                made_by = f" (written by stage {producer.name})" if producer else ""
                raise MurmurError(f"stage {step.stage.name}: input {plan.run_dir / need} is missing{made_by}; "
                                  f"run the build without --from/--only, or start from "
                                  f"--from {producer.name if producer else STAGE_NAMES[0]}")
            step.stage.preflight(plan.settings, step.stage)
        if step.action in (Action.RUN, Action.SKIP):
            will_write.add(step.stage.name)


def plan_build(settings: Settings, from_stage: str | None = None, only: str | None = None) -> BuildPlan:
    """Decide, before any work, which stages run and which are skipped, and check their inputs."""
    settings = resolve_base_model(settings)
    selected, why_selected = _stage_selection(from_stage, only)
    directory = settings_run_dir(settings)
    record = load_record(directory)
    stages_record = record["stages"]
    forced = bool(from_stage or only)
    # Fingerprints are computed against the record as it will be when each stage is reached: a stage that
    # reruns gets a new completion time, so every stage after it that reads what it changes is stale too.
    rerunning: set[str] = set()
    planned: dict[str, str] = {}  # the fingerprint of each stage that reruns
    steps: list[StageStep] = []
    for stage in STAGES:
        why_not = stage.not_needed(settings)
        if why_not:
            steps.append(StageStep(stage, Action.NOT_NEEDED, why_not))
            continue
        fingerprint = stage_fingerprint(settings, stage, record)
        entry = stages_record.get(stage.name, {})
        done = (entry.get("state") == "completed" and entry.get("fingerprint") == fingerprint
                and (directory / stage.done_marker).exists())
        upstream_changed = any(a in rerunning and _rerun_reaches(settings, record, stage, a, rerunning, planned)
                               for a in stage.after)
        if stage.name not in selected:
            steps.append(StageStep(stage, Action.OMIT, f"outside {why_selected}"))
            continue
        if forced:
            reason = f"asked for by {why_selected}"
        elif not entry:
            reason = "never built"
        elif upstream_changed:
            reason = "an earlier stage reruns"
        elif done:
            steps.append(StageStep(stage, Action.SKIP, "up to date"))
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
        steps.append(StageStep(stage, Action.RUN, reason, clear=not resume))
        rerunning.add(stage.name)
        planned[stage.name] = fingerprint
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
    return getattr(importlib.import_module(module_name), attr)


def _clear_outputs(directory: Path, stage: Stage) -> None:
    for name in stage.outputs:
        remove_dir(directory / name)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def execute(plan: BuildPlan, functions: dict[str, StageFunction] | None = None, display: Any = None
            ) -> BuildResult:
    """Run the stages a plan says to run, recording each as it starts and completes."""
    from murmur.build_display import BuildDisplay  # rich, only when a build runs

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
        if step.action != Action.RUN:
            results.append({"stage": stage.name, "action": step.action.outcome, "reason": step.reason,
                            "summary": record["stages"].get(stage.name, {}).get("summary", {})})
            display.stage_skipped(index, step)
            continue
        # The fingerprint is recomputed now: earlier stages of this build have just written new records.
        fingerprint = stage_fingerprint(plan.settings, stage, record)
        function = functions.get(stage.name) or _load_function(stage)
        if step.clear:
            _clear_outputs(directory, stage)
        # The views later stages took of the last run carry over, so that a crash keeps them.
        old_views = record["stages"].get(stage.name, {}).get("views", {})
        record["stages"][stage.name] = {"state": "running", "fingerprint": fingerprint, "started_at": _now(),
                                        "settings": stage_settings(plan.settings, stage), "views": old_views}
        save_record(directory, record)
        display.stage_started(index, step)
        t0 = time.monotonic()
        try:
            summary = stage.call(function, plan.settings, directory, stage) or {}
        except BaseException:
            display.stage_failed(index, step, time.monotonic() - t0)
            raise
        seconds = time.monotonic() - t0
        if not (directory / stage.done_marker).exists():
            raise MurmurError(f"stage {stage.name} finished without writing {directory / stage.done_marker}; "
                              "its output is incomplete")
        completed_at = _now()
        record["stages"][stage.name].update(
            state="completed", completed_at=completed_at, seconds=round(seconds, 2), summary=_jsonable(summary),
            views=_views(plan.settings, stage, record, fingerprint, old_views, completed_at))
        save_record(directory, record)
        results.append({"stage": stage.name, "action": step.action.outcome, "reason": step.reason,
                        "seconds": seconds, "summary": summary})
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
