"""One report card for several models side by side, on one run's held-out data (the demo's card).

    side_by_side("runs/demo", [("untouched base", "smollm2-135m-instruct"), ("from scratch", "runs/demo-scratch")],
                 settings.eval)

The run's own results (eval/results.json, written by its eval stage) come first. Each other entry is a run
folder already evaluated (its results are read: the demo builds both runs from the same [data] and [eval]
sections, so they were measured on the same posts, contexts and prompts), or a model source, evaluated here
on this run's data into RUN/compare/NAME/ (kept, and reused while the eval settings are the same). Then the
coherence of every model's samples is judged by every other model (murmur.eval.coherence), and
RUN/report/report.md is rewritten with all of them; eval/compare.json holds the figures.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from murmur.errors import MurmurError
from murmur.eval.coherence import Judge, coherence_matrix
from murmur.eval.runner import _load, evaluate, is_run_folder, read_results
from murmur.files import write_json_atomic
from murmur.settings.eval import EvalSettings

COMPARE_DIR = "compare"


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "model"


def _results_of(label: str, source: str | Path, run_dir: Path, settings: EvalSettings, progress,
                retrieval: dict | None) -> tuple[Path | str, dict]:
    """(what loads the model, its results): read from an evaluated run, or evaluated here on run_dir's data."""
    path = Path(source)
    if path.is_dir() and is_run_folder(path):
        results = read_results(path)
        if results is None:
            raise MurmurError(f"{path} has no eval/results.json; evaluate it first (`murmur eval {path}`)")
        return path, results
    out = run_dir / COMPARE_DIR / _slug(label)
    results = read_results(out)
    wanted = settings.model_dump(mode="json")
    if results is None or results.get("settings") != wanted or results.get("data") != str(run_dir / "data"):
        progress(f"eval: {label} ({source}) on {run_dir / 'data'}")
        # The index's parent recall is the run's, whatever the model: the run's own figures are reused.
        results = evaluate(source, settings, data_dir=run_dir / "data", out_dir=out, progress=progress,
                           retrieval=retrieval)
    return source, results


def side_by_side(run_dir: str | Path, others: list[tuple[str, str | Path]], settings: EvalSettings,
                 label: str = "this run", progress=None) -> Path:
    """Evaluate or read every model, judge their samples' coherence, write the run's report card; its path."""
    progress = progress or (lambda line: print(line, flush=True))  # flushed: the build's output may be a pipe
    from murmur.accel import resolve_device
    from murmur.eval.report import write_report

    run_dir = Path(run_dir)
    own = read_results(run_dir)
    if own is None:
        raise MurmurError(f"{run_dir} has no eval/results.json; run its eval stage first (`murmur build`)")
    entries: list[tuple[str, Path | str, dict]] = [(label, run_dir, own)]
    for name, source in others:
        entries.append((name, *_results_of(name, source, run_dir, settings, progress, own.get("retrieval"))))
    names = [name for name, _, _ in entries]
    if len(set(names)) != len(names):
        raise MurmurError(f"the models side by side need distinct labels, got {names}")

    device = torch.device(resolve_device(settings.device))
    judges = {}
    for name, source, _ in entries:  # every model judges the others: the models are small enough to hold together
        model, tokenizer, _ = _load(Path(source), device)
        judges[name] = Judge(name, model, tokenizer)
    progress("eval: coherence of the samples, each model's judged by the others")
    matrix = coherence_matrix({name: results.get("samples") or [] for name, _, results in entries}, judges)
    for name, _, results in entries:
        results["coherence"] = matrix["models"][name]
    write_json_atomic(run_dir / "eval" / "compare.json",
                      {"models": [{"label": name, "source": str(source), "results": _summary(results)}
                                  for name, source, results in entries],
                       "coherence": matrix})
    return write_report(run_dir, {**own, "name": label}, [(name, results) for name, _, results in entries[1:]])


def _summary(results: dict) -> dict[str, Any]:
    keep = ("model", "bpb", "ranking", "coherence", "timings", "data")
    return {k: results[k] for k in keep if k in results}
