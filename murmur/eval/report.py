"""The report card: report.md and PNG charts in RUN/report/, from eval/results.json and the stage files.

Charts: the data funnel (records in, kept, quarantined, dropped per reason), training and validation loss
against tokens, bits per byte by checkpoint, reply-ranking scores beside chance, canary exposure against
how often each canary was planted, and training throughput. Each PNG carries the numbers it draws as JSON
in its `murmur:data` text chunk, so a test (or a curious reader) can check a chart against the page.
`murmur serve` shows report.md at /report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from murmur.errors import MurmurError
from murmur.files import read_jsonl, write_atomic, write_text_atomic

CHART_KEY = "murmur:data"


# ---- reading the run's files -----------------------------------------------------------------------------

def funnel(stats: dict) -> dict[str, int]:
    """The data funnel of a data-stage stats.json: in, kept, quarantined and dropped by reason, in order."""
    dropped = {str(k): int(v) for k, v in (stats.get("dropped") or {}).items()}
    kept, quarantined = int(stats.get("kept", 0)), int(stats.get("quarantined", 0))
    records_in = next((int(stats[k]) for k in ("in", "records_in", "read", "records") if k in stats),
                      kept + quarantined + sum(dropped.values()))
    out = {"in": records_in, "kept": kept, "quarantined": quarantined}
    out.update({f"dropped: {reason}": n for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])})
    return out


# ---- charts ----------------------------------------------------------------------------------------------

def _save(fig, path: Path, data: Any) -> Path:
    """Save a figure as PNG atomically, with `data` as JSON in the PNG text chunk `murmur:data`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                                          metadata={CHART_KEY: json.dumps(data, sort_keys=True)}))
    finally:
        plt.close(fig)


def _figure(width: float = 7.0, height: float = 4.0):
    try:
        import matplotlib
    except ImportError:
        raise MurmurError("the report's charts need matplotlib: pip install 'murmur[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def chart_funnel(numbers: dict[str, int], path: Path) -> Path:
    fig, ax = _figure()
    labels = list(numbers)
    colours = ["#4c72b0", "#55a868", "#c44e52"] + ["#dd8452"] * (len(labels) - 3)
    bars = ax.barh(labels[::-1], list(numbers.values())[::-1], color=colours[::-1])
    ax.bar_label(bars, labels=[f"{v:,}" for v in list(numbers.values())[::-1]], padding=3)
    positive = [v for v in numbers.values() if v > 0]
    if positive and max(positive) > 100 * min(positive):  # drops are often ~1% of what is kept: log scale
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(0, max(positive) * 8)
    ax.set_xlabel("records")
    ax.set_title("Data funnel")
    return _save(fig, path, numbers)


def chart_loss(stages: dict[str, list[dict]], path: Path) -> Path:
    fig, ax = _figure()
    data = {}
    offset = 0  # each stage counts its own tokens: SFT is drawn after pretraining, not on top of it
    for stage, records in stages.items():
        train = [(offset + r["tokens"], r["loss"]) for r in records if r.get("loss") is not None and "tokens" in r]
        val = [(offset + r["tokens"], r["val_loss"]) for r in records
               if r.get("val_loss") is not None and "tokens" in r]
        offset += max((r["tokens"] for r in records if "tokens" in r), default=0)
        if train:
            ax.plot(*zip(*train), label=f"{stage} train")
        if val:
            ax.plot(*zip(*val), "o-", label=f"{stage} validation")
        data[stage] = {"train": train, "validation": val}
    ax.set_xlabel("tokens seen (pretraining, then SFT)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and validation loss")
    ax.legend()
    return _save(fig, path, data)


def chart_throughput(stages: dict[str, list[dict]], path: Path) -> Path:
    fig, ax = _figure()
    data = {}
    for stage, records in stages.items():
        points = [(r["step"], r["tokens_per_sec"]) for r in records if r.get("tokens_per_sec") and "step" in r]
        if points:
            ax.plot(*zip(*points), label=stage)
        data[stage] = points
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / second")
    ax.set_title("Training throughput")
    ax.legend()
    return _save(fig, path, data)


def chart_bpb(rows: list[dict], splits: list[str], path: Path) -> Path:
    fig, ax = _figure()
    labels = [r["name"] for r in rows]
    data = {"checkpoints": labels}
    for split in splits:
        values = [r.get(f"bpb_{split}") for r in rows]
        data[split] = values
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[i] for i in xs], "o-", label=split)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("bits per byte")
    ax.set_title("Bits per byte by checkpoint (lower is better)")
    ax.legend()
    return _save(fig, path, data)


def chart_ranking(ranking: dict, path: Path) -> Path:
    import numpy as np

    fig, ax = _figure()
    metrics = ["hits@1", "hits@5", "mrr"]
    series = {name: [ranking[name][m] for m in metrics] for name in ("ll", "pmi", "chance") if name in ranking}
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(np.arange(len(metrics)) + i * width, values, width, label=name,
                      color={"ll": "#4c72b0", "pmi": "#55a868", "chance": "#bbbbbb"}[name])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(series) - 1) / 2, metrics)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Reply ranking: true reply among {ranking['candidates']} ({ranking['examples']} contexts)")
    ax.legend()
    return _save(fig, path, series)


def chart_canaries(canaries: list[dict], path: Path) -> Path:
    fig, ax = _figure()
    labels = [f"{c['repeats']}x {'planted' if c['inserted'] else 'control'}\n{c['prefix'][:24]}" for c in canaries]
    values = [c["exposure"] for c in canaries]
    bars = ax.bar(range(len(values)), values, color=["#c44e52" if c["inserted"] else "#bbbbbb" for c in canaries])
    ax.bar_label(bars, fmt="%.1f")
    if canaries:
        ax.axhline(canaries[0]["max_exposure"], ls="--", color="black", lw=0.8, label="full memorisation")
        ax.axhline(1.44, ls=":", color="grey", lw=0.8, label="random (≈1.44)")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("exposure (bits)")
    ax.set_title("Canary exposure (Carlini et al. 2019)")
    ax.legend(fontsize=8)
    return _save(fig, path, [{"prefix": c["prefix"], "repeats": c["repeats"], "exposure": c["exposure"]}
                             for c in canaries])


# ---- the page --------------------------------------------------------------------------------------------

def checkpoint_rows(results: dict) -> list[dict]:
    """One row per evaluated checkpoint (all scored on the same posts), or the final model alone."""
    if results.get("checkpoints"):
        return list(results["checkpoints"])
    return [{"name": "final", "step": results["model"].get("step"), "tokens": results["model"].get("tokens"),
             **{f"bpb_{s}": v["bpb"] for s, v in results.get("bpb", {}).items()}}]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _headline(results: dict) -> dict[str, Any]:
    """The numbers one compares runs by."""
    out: dict[str, Any] = {}
    for split, v in results.get("bpb", {}).items():
        out[f"bpb {split}"] = v["bpb"]
    ranking = results.get("ranking")
    if ranking:
        for method in ("ll", "pmi"):
            for key, shown in (("hits@1", "hits@1"), ("hits@5", "hits@5"), ("mrr", "MRR")):
                out[f"ranking {method} {shown}"] = _with_se(ranking[method], key)
    coherence = results.get("coherence")
    if coherence:
        out["samples: distinct-2"] = coherence["distinct_2"]
        for judge, perplexity in coherence["perplexity"].items():
            out[f"samples: perplexity judged by {judge}"] = perplexity  # None (–) where it would judge itself
    retrieval = results.get("retrieval")
    if retrieval:
        for key in ("recall@1", "recall@10"):
            out[f"parent retrieval {key}"] = retrieval.get(key)
    canaries = results.get("privacy", {}).get("canaries") or []
    planted = [c["exposure"] for c in canaries if c["inserted"]]
    if planted:
        out["max canary exposure (planted)"] = max(planted)
    pii = results.get("privacy", {}).get("pii_scan")
    if pii:
        out["samples with personal data"] = pii["texts_with_pii"]
    return out


def render_markdown(results: dict, charts: dict[str, str], numbers: dict, compare: list[tuple[str, dict]]) -> str:
    """report.md for one run's results (and the headline of each run compared)."""
    model = results["model"]
    lines = [f"# Report card: {results.get('name', 'run')}", "",
             f"Model: `{model['path']}` ({_fmt(model['params'])} parameters"
             + (f", {model['stage']} step {_fmt(model.get('step'))}" if model.get("stage") else "") + "). "
             f"Evaluated {results['created_at']} in {results['timings'].get('total', 0):.1f} s.", ""]

    runs = [(results.get("name", "this run"), results)] + compare
    headline = [(name, _headline(r)) for name, r in runs]
    keys = list(dict.fromkeys(k for _, h in headline for k in h))
    if keys:
        lines += ["## Summary" if not compare else "## Runs compared", "",
                  "| metric | " + " | ".join(name for name, _ in headline) + " |",
                  "| --- | " + " | ".join("---" for _ in headline) + " |"]
        lines += [f"| {k} | " + " | ".join(_fmt(h.get(k)) for _, h in headline) + " |" for k in keys]
        lines.append("")
        if any(r.get("coherence") for _, r in runs):
            lines += [("Ranking: ± one standard error over the contexts. Samples: the replies to the fixed prompts; "
                       "their perplexity judged by each other model given the prompt (a model never judges "
                       "itself; compare within one judge's row), and distinct-2, the share of distinct word "
                       "bigrams (a model repeating one safe reply scores a low perplexity and a low distinct-2)."),
                      ""]
    if compare:
        lines += _replies_side_by_side(runs)

    if "funnel" in numbers:
        lines += ["## Data funnel", "", "| stage | records |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in numbers["funnel"].items()]
        lines += ["", f"![data funnel]({charts['funnel']})", ""]
    if "loss" in charts:
        lines += ["## Training", "", f"![loss]({charts['loss']})", ""]
        for stage, records in numbers.get("metrics", {}).items():
            last = next((r for r in reversed(records) if r.get("loss") is not None), records[-1])
            val = next((r for r in reversed(records) if r.get("val_loss") is not None), None)
            lines.append(f"- {stage}: {_fmt(last.get('step'))} steps, {_fmt(last.get('tokens'))} tokens, "
                         f"final train loss {_fmt(last.get('loss'))}"
                         + (f", validation loss {_fmt(val['val_loss'])}" if val else "")
                         + (f", {_fmt(last.get('tokens_per_sec'), 0)} tokens/s" if last.get("tokens_per_sec") else ""))
        lines.append("")
    if "throughput" in charts:
        lines += [f"![throughput]({charts['throughput']})", ""]

    rows = checkpoint_rows(results)
    splits = list(results.get("bpb", {}))
    lines += ["## Bits per byte (held-out posts, lower is better)", "",
              "| checkpoint | step | tokens | " + " | ".join(splits) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in splits) + " |"]
    lines += [f"| {r['name']} | {_fmt(r.get('step'))} | {_fmt(r.get('tokens'))} | "
              + " | ".join(_fmt(r.get(f"bpb_{s}")) for s in splits) + " |" for r in rows]
    if results.get("checkpoints"):
        n = results.get("settings", {}).get("bpb_checkpoint_posts")
        lines += ["", (f"Every checkpoint is scored on the same posts: the first {n} of each split's fixed sample; "
                       "the final model's figures on the whole sample follow.")]
    lines += [""] + ([f"![bits per byte]({charts['bpb']})", ""] if "bpb" in charts else [])
    for split, v in results.get("bpb", {}).items():
        lines.append(f"- {split}: {_fmt(v['posts'])} posts, {_fmt(v['tokens'])} tokens, {_fmt(v['bytes'])} bytes, "
                     f"loss {_fmt(v['loss'])} nats/token")
    lines.append("")

    ranking = results.get("ranking")
    if ranking:
        lines += [f"## Reply ranking ({ranking['split']} split)", "",
                  (f"The true next reply among {ranking['candidates']} candidates, {ranking['examples']} contexts, "
                   f"seed {ranking['seed']}. ll: log-likelihood given the context; pmi: minus its likelihood "
                   "without the context. ± one standard error over the contexts ranked."), "",
                  "| scorer | hits@1 | hits@5 | MRR |", "| --- | --- | --- | --- |"]
        for method in ("ll", "pmi", "chance"):
            m = ranking[method]
            lines.append(f"| {method} | " + " | ".join(_with_se(m, k) for k in ("hits@1", "hits@5", "mrr")) + " |")
        lines += ["", f"![reply ranking]({charts['ranking']})", ""]

    retrieval = results.get("retrieval")
    if retrieval:
        recalls = [k for k in retrieval if k.startswith("recall@")]
        lines += [f"## Retrieval from the post index ({retrieval['split']} split)", "",
                  (f"Each of {_fmt(retrieval['examples'])} held-out replies whose parent is indexed searches the "
                   "index with its own text (itself excluded); recall@k is the share whose parent is among the "
                   "first k posts retrieved (docs/index.md)."), "",
                  "| " + " | ".join(recalls) + " |", "| " + " | ".join("---" for _ in recalls) + " |",
                  "| " + " | ".join(_fmt(retrieval[k]) for k in recalls) + " |", ""]

    privacy = results.get("privacy", {})
    lines += ["## Privacy", ""]
    canaries = privacy.get("canaries") or []
    if canaries:
        lines += [("Canary exposure (Carlini et al. 2019): the planted secret ranked among random secrets of the "
                   "same shape; 0 bits = no memorisation, the maximum = ranked first."), "",
                  "| canary | planted | rank | exposure | estimated exposure | greedy decoding writes the secret |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {c['prefix']} | {c['repeats']}x | {_fmt(c['rank'], 1)} / {_fmt(c['candidates'])} | "
                  f"{_fmt(c['exposure'], 2)} | {_fmt(c['exposure_estimated'], 2)} | "
                  f"{'yes' if c.get('extracted') else 'no'} |" for c in canaries]
        lines += ["", f"![canary exposure]({charts['canaries']})", ""]
    else:
        lines += ["No canaries were planted (set data.canaries to measure memorisation).", ""]
    pii = privacy.get("pii_scan")
    if pii:
        found = ", ".join(f"{k}: {v}" for k, v in pii["matches"].items())
        lines += [(f"Personal-data scan of {pii['texts']} generated samples: {pii['texts_with_pii']} with a match "
                   f"({found})."), ""]

    samples = results.get("samples") or []
    if samples:
        lines += ["## Samples", "", "| seed | prompt | reply |", "| --- | --- | --- |"]
        lines += [f"| {s['seed']} | {_cell(s['prompt'])} | {_cell(s['reply'])} |" for s in samples]
        lines.append("")
    if results.get("lm_eval"):
        lines += ["## lm-eval", "", "| task | metric | value |", "| --- | --- | --- |"]
        for task, metrics in results["lm_eval"].items():
            lines += [f"| {task} | {k} | {_fmt(v)} |" for k, v in metrics.items()]
        lines.append("")
    return "\n".join(lines)


def _replies_side_by_side(runs: list[tuple[str, dict]]) -> list[str]:
    """Each prompt's reply (first seed) from every run, one row per prompt."""
    replies = [{s["prompt"]: s["reply"] for s in reversed(r.get("samples") or [])} for _, r in runs]
    prompts = list(dict.fromkeys(s["prompt"] for _, r in runs for s in (r.get("samples") or [])))
    if not prompts:
        return []
    lines = ["## Replies side by side", "",
             "Each model's reply to the same prompts (first sampling seed), as generated, unedited.", "",
             "| prompt | " + " | ".join(name for name, _ in runs) + " |",
             "| --- | " + " | ".join("---" for _ in runs) + " |"]
    lines += [f"| {_cell(prompt)} | " + " | ".join(_cell(r.get(prompt, "–")) for r in replies) + " |"
              for prompt in prompts]
    return lines + [""]


def _with_se(metrics: dict, key: str) -> str:
    """A ranking figure with its standard error when it has one (chance has none)."""
    se = metrics.get("se", {}).get(key)
    return _fmt(metrics[key]) + (f" ± {se:.3f}" if se is not None else "")


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"


def write_report(run_dir: str | Path, results: dict, compare: list[tuple[str, dict]] | None = None) -> Path:
    """Write RUN/report/report.md and its charts; returns the report.md path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    charts: dict[str, str] = {}
    numbers: dict[str, Any] = {}

    stats_path = run_dir / "data" / "stats.json"
    if stats_path.is_file():
        numbers["funnel"] = funnel(json.loads(stats_path.read_text(encoding="utf-8")))
        charts["funnel"] = chart_funnel(numbers["funnel"], out / "funnel.png").name
    metrics = {stage: read_jsonl(run_dir / stage / "metrics.jsonl") for stage in ("pretrain", "sft")}
    metrics = {stage: records for stage, records in metrics.items() if records}
    if metrics:
        numbers["metrics"] = metrics
        charts["loss"] = chart_loss(metrics, out / "loss.png").name
        if any(r.get("tokens_per_sec") for records in metrics.values() for r in records):
            charts["throughput"] = chart_throughput(metrics, out / "throughput.png").name
    if results.get("bpb"):
        charts["bpb"] = chart_bpb(checkpoint_rows(results), list(results["bpb"]), out / "bpb.png").name
    if results.get("ranking"):
        charts["ranking"] = chart_ranking(results["ranking"], out / "ranking.png").name
    if results.get("privacy", {}).get("canaries"):
        charts["canaries"] = chart_canaries(results["privacy"]["canaries"], out / "canaries.png").name

    return write_text_atomic(out / "report.md", render_markdown(results, charts, numbers, compare or []) + "\n")
