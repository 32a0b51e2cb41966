"""The eval stage: measure a run's model and write eval/results.json, eval/samples.jsonl and report/.

    run_stage(settings, run_dir)                      # `murmur build`: the run's final model
    evaluate("runs/demo", settings.eval)              # `murmur eval RUN`
    evaluate("export/", settings.eval, data_dir="runs/demo/data", out_dir="runs/demo-export")

The final model is what `murmur.source.load_model` picks for the folder (the latest SFT checkpoint, else the
latest pretraining one, else the exported model/). With checkpoints="all", bits per byte is also measured
for every saved checkpoint, on a smaller fixed sample of posts. When the data folder's run has a post index
(RUN/index), the retrieval it grounds answers in is scored too: recall@1/@10 of held-out replies' parents.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from murmur.accel import resolve_device
from murmur.errors import MurmurError
from murmur.files import write_json_atomic
from murmur.settings.eval import EvalSettings
from murmur.settings.index import IndexSettings

STAGES = ("pretrain", "sft")


def is_run_folder(path: Path) -> bool:
    """A Murmur run folder: holds any stage output of the contract's run layout."""
    return any((path / name).is_dir() for name in ("data", "tokenizer", "tokens", *STAGES))


def list_checkpoints(run_dir: Path) -> list[dict]:
    """Every complete checkpoint of the run, pretraining first, each by step: name, stage, step, tokens, path."""
    from murmur.train.checkpoint import META_FILE, read_meta

    found = []
    for stage in STAGES:
        for step_dir in sorted((run_dir / stage / "checkpoints").glob("step_*")):
            if not (step_dir / META_FILE).is_file():
                continue  # a step being written (or abandoned) is never listed
            meta = read_meta(step_dir)
            found.append({"name": f"{stage}/{step_dir.name}", "stage": stage, "step": meta.get("step"),
                          "tokens": meta.get("tokens", meta.get("tokens_seen")), "path": str(step_dir)})
    return found


def _load(src: Path, device: torch.device):
    """(model, tokenizer, description) of the model at `src`, with errors that say what is missing."""
    from murmur.model import count_params
    from murmur.source import load_model
    from murmur.tokenizer import ChatTokenizer

    if is_run_folder(src) and not (src / "model").is_dir() and not any(
            (src / stage / "checkpoints" / "latest").is_file() for stage in STAGES):
        raise MurmurError(f"run folder {src} has no checkpoints (pretrain/checkpoints/latest, sft/checkpoints/latest) "
                          "and no exported model/; train it first (`murmur train`)")
    loaded = load_model(src, device=device)
    if loaded.tokenizer_dir is None:
        raise MurmurError(f"{src} has no tokenizer (tokenizer.json beside the weights, or a tokenizer folder named "
                          "in the checkpoint); export the model with its tokenizer or evaluate the run folder")
    info: dict[str, Any] = {"path": str(loaded.path), "origin": loaded.origin,
                            "params": count_params(loaded.settings)}
    meta_file = Path(loaded.path) / "murmur.json"
    if loaded.origin == "checkpoint":
        from murmur.train.checkpoint import read_meta

        step_dir = loaded.step_dir
        meta = read_meta(step_dir)
        info.update(path=str(step_dir), stage=meta.get("stage"), step=meta.get("step"),
                    tokens=meta.get("tokens", meta.get("tokens_seen")))
    elif meta_file.is_file():
        info.update({k: v for k, v in json.loads(meta_file.read_text()).items() if k in ("stage", "step", "tokens")})
    return loaded.model.eval(), ChatTokenizer.load(loaded.tokenizer_dir), info


def parent_retrieval(data_dir: Path, settings: IndexSettings | None) -> dict | None:
    """Recall of held-out replies' parents from the post index beside the data folder, None without an index
    (`murmur.index.parent_recall`)."""
    from murmur.index import open_index, parent_recall
    from murmur.index.location import POINTER, index_dir_of

    if not (index_dir_of(data_dir) / POINTER).is_file():
        return None
    with open_index(data_dir, settings) as index:
        return parent_recall(index, data_dir, settings)


def evaluate(src: str | Path, settings: EvalSettings, data_dir: str | Path | None = None,
             out_dir: str | Path | None = None, lm_eval_tasks: list[str] | None = None,
             lm_eval_include: str | Path | None = None, lm_eval_limit: int | None = None,
             progress=None, index_settings: IndexSettings | None = None, retrieval: dict | None = None) -> dict:
    """Evaluate the model at `src` on held-out data and write OUT/eval/ and OUT/report/ (OUT = out_dir or src);
    `index_settings` rank the post index's retrieval when the run has one. `retrieval`: the index's parent
    recall already measured on this data folder (it does not depend on the model), reused instead of
    querying the index again."""
    from murmur.eval.bpb import bits_per_byte, read_split_posts
    from murmur.eval.privacy import run_canaries, scan_for_pii
    from murmur.eval.ranking import run_ranking
    from murmur.eval.samples import generate_samples, write_jsonl
    from murmur.source import is_model_source

    progress = progress or say
    src = Path(src)
    if not is_model_source(src):
        raise MurmurError(f"{src} does not exist; pass a run folder or a model directory")
    data_dir = Path(data_dir) if data_dir else src / "data"
    out_dir = Path(out_dir) if out_dir else src
    if not (data_dir / "posts.parquet").is_file():
        raise MurmurError(f"no held-out data at {data_dir} (posts.parquet); evaluate a run folder, or pass "
                          "--data RUN/data for a model directory")
    device = torch.device(resolve_device(settings.device))
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # Before the model loads: an index that cannot be opened (a server down) fails in seconds, not minutes.
    if retrieval is None:
        retrieval = parent_retrieval(data_dir, index_settings)
    timings["retrieval"] = time.perf_counter() - started
    model, tokenizer, info = _load(src, device)
    progress(f"eval: {info['path']} ({info['params']:,} parameters) on {device}")

    # Read every split first so that an empty one fails before minutes of scoring.
    texts = {split: read_split_posts(data_dir, split, settings.bpb_max_posts, settings.seed)
             for split in settings.bpb_splits}
    results: dict[str, Any] = {"name": out_dir.resolve().name, "created_at": datetime.now(UTC).isoformat(
        timespec="seconds"), "model": info, "data": str(data_dir), "settings": settings.model_dump(mode="json")}
    if retrieval is not None:
        results["retrieval"] = retrieval
        progress(f"eval: parent retrieval from the index, {retrieval['examples']} {retrieval['split']} replies: "
                 + ", ".join(f"{k} {_share(v)}" for k, v in retrieval.items() if k.startswith("recall@")))

    mark = time.perf_counter()
    progress("eval: bits per byte on " + ", ".join(f"{len(t)} {split}" for split, t in texts.items()) + " posts")
    results["bpb"] = {split: bits_per_byte(model, tokenizer, t, settings.batch_size).to_dict()
                      for split, t in texts.items()}
    timings["bpb"] = time.perf_counter() - mark
    progress("eval: bits per byte " + ", ".join(f"{s} {v['bpb']:.3f}" for s, v in results["bpb"].items()))

    if settings.checkpoints == "all" and is_run_folder(src):
        mark = time.perf_counter()
        rows = []
        for checkpoint in list_checkpoints(src):
            cp_model, _, _ = _load(Path(checkpoint["path"]), device)
            for split, t in texts.items():
                checkpoint[f"bpb_{split}"] = bits_per_byte(cp_model, tokenizer, t[:settings.bpb_checkpoint_posts],
                                                           settings.batch_size).bpb
            rows.append(checkpoint)
            progress(f"eval: {checkpoint['name']} bpb " + ", ".join(
                f"{s} {checkpoint[f'bpb_{s}']:.3f}" for s in texts))
        results["checkpoints"] = rows
        timings["checkpoints"] = time.perf_counter() - mark

    if settings.ranking_examples > 0:
        mark = time.perf_counter()
        progress(f"eval: reply ranking of up to {settings.ranking_examples} {settings.ranking_split} contexts, "
                 f"{settings.distractors + 1} candidates each")
        results["ranking"] = run_ranking(model, tokenizer, data_dir, settings, progress=progress)
        timings["ranking"] = time.perf_counter() - mark
        r = results["ranking"]
        progress(f"eval: reply ranking hits@1 ll {r['ll']['hits@1']:.3f} ± {r['ll']['se']['hits@1']:.3f}, pmi "
                 f"{r['pmi']['hits@1']:.3f} ± {r['pmi']['se']['hits@1']:.3f} (chance {r['chance']['hits@1']:.3f}; "
                 f"± one standard error over {r['examples']} contexts)")

    mark = time.perf_counter()
    progress(f"eval: {len(settings.prompts) * len(settings.sample_seeds)} samples")
    samples = generate_samples(model, tokenizer, settings.prompts, settings.sample_seeds, settings.max_new_tokens,
                               settings.temperature, settings.top_p)
    write_jsonl(out_dir / "eval" / "samples.jsonl", samples)
    results["samples"] = samples
    timings["samples"] = time.perf_counter() - mark

    mark = time.perf_counter()
    progress("eval: privacy probes (canaries, personal data in the samples)")
    results["privacy"] = {"canaries": run_canaries(model, tokenizer, data_dir, settings.canary_candidates,
                                                   settings.seed),
                          "pii_scan": scan_for_pii([s["reply"] for s in samples])}
    timings["privacy"] = time.perf_counter() - mark

    if retrieval is not None:  # the run has a post index: does the model use what retrieval gives it?
        from murmur.eval.grounded import run_probe

        mark = time.perf_counter()
        results["grounded"] = grounded = run_probe(model, tokenizer, data_dir, settings.seed)
        timings["grounded"] = time.perf_counter() - mark
        progress(f"eval: grounded answers to {grounded['questions']} planted facts: retrieval on "
                 f"{_share(grounded['share_on'])}, off {_share(grounded['share_off'])}")

    if lm_eval_tasks:
        try:
            from murmur.eval.lm_eval_adapter import MurmurLM, run_lm_eval
        except ImportError as err:
            raise MurmurError(f"--lm-eval needs EleutherAI's lm-eval ({err}); install it with "
                              "`pip install 'murmur[eval]'`") from None

        mark = time.perf_counter()
        lm = MurmurLM(model=model, tokenizer=tokenizer, batch_size=settings.batch_size)
        results["lm_eval"] = run_lm_eval(lm, lm_eval_tasks, include_path=lm_eval_include, limit=lm_eval_limit)
        timings["lm_eval"] = time.perf_counter() - mark

    timings["total"] = time.perf_counter() - started
    results["timings"] = timings
    write_json_atomic(out_dir / "eval" / "results.json", results)
    return results


def say(line: str) -> None:
    """A progress line, flushed: a build's output is often a pipe or a file (`make demo | tee`)."""
    print(line, flush=True)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def read_results(path: str | Path) -> dict | None:
    """A run's eval/results.json, or None when it was never evaluated."""
    file = Path(path) / "eval" / "results.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def run_stage(settings, run_dir: str | Path) -> dict:
    """The `murmur build` entry point: evaluate the run's final model, write eval/ and report/."""
    from murmur.eval.report import write_report

    results = evaluate(run_dir, settings.eval, index_settings=settings.index)
    page = write_report(run_dir, results)
    summary = {f"bpb_{split}": v["bpb"] for split, v in results["bpb"].items()}
    if results.get("ranking"):
        summary["ranking_pmi_hits@1"] = results["ranking"]["pmi"]["hits@1"]
    if results.get("retrieval"):
        summary["retrieval_recall@10"] = results["retrieval"]["recall@10"]
    summary["report"] = str(page)
    return summary
