"""The model card (README.md) of an exported model folder, as the Hugging Face Hub reads it.

Written with `huggingface_hub.ModelCard`: YAML metadata (licence, base model, library, tags) and the facts a
reader of a model trained on people's posts needs: where the data came from and how much of it survived
curation (data/stats.json), which deletions were honoured, what the evaluation measured (eval/results.json),
what the model is for and what it must not be trusted with. Only numbers the run wrote are shown; a missing
file is said to be missing, never guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from murmur.files import write_text_atomic

# The Hub's licence field takes an SPDX-like id; "other" says the terms are in the card's text.
DEFAULT_LICENSE = "other"

INTENDED_USE = """\
A chatbot that answers in the voice of the community whose posts it was trained on: for that community's
own service (a reply assistant, a playful bot), for research on the community's language, and as a
reproducible example of Murmur's pipeline."""

LIMITATIONS = """\
- It imitates posts; it does not know facts. Its answers may be wrong, out of date or made up, in the
  confident tone of the posts it learnt from.
- It can repeat text it saw in training. The evaluation's canary test measures how much (see the table);
  personal data the curation did not catch can come back.
- It carries the biases, slang and hostility of its training posts.
- It must not be used to make decisions about people, nor to impersonate a real author."""


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | ---: |"]
    lines += [f"| {name} | {_number(value)} |" for name, value in rows]
    return "\n".join(lines)


def data_section(run_dir: Path | None) -> str:
    """Sources, the curation funnel and the deletions honoured, from data/stats.json."""
    stats = _read_json(run_dir / "data" / "stats.json") if run_dir else None
    if stats is None:
        return "No curation record (data/stats.json) came with this model: its training data is not described here."
    # Only the file name of each source: the folder it was read from says nothing to a reader and may be private.
    sources = [f"`{label.split(':', 1)[0]}:{Path(label.split(':', 1)[-1]).name}`"
               for label in stats.get("sources", []) if isinstance(label, str)]
    rows = [("posts read", stats.get("in")), ("posts kept", stats.get("kept")),
            ("quarantined (unusable records)", stats.get("quarantined")),
            ("duplicates removed", stats.get("duplicates")), ("removed for a deletion", stats.get("deleted")),
            ("conversations built", stats.get("conversations"))]
    splits = stats.get("splits") if isinstance(stats.get("splits"), dict) else {}
    rows += [(f"posts in {name}", count) for name, count in splits.items()]
    dropped = stats.get("dropped") if isinstance(stats.get("dropped"), dict) else {}
    rows += [(f"dropped: {reason}", count) for reason, count in sorted(dropped.items())]
    table = _table([row for row in rows if row[1] is not None], ("curation", "count"))
    return f"Sources: {', '.join(sources) or 'not recorded'}.\n\nCounts after curation:\n\n{table}"


def deletions_section(run_dir: Path | None) -> str:
    """How many deletion events the run honoured (the ids themselves stay private)."""
    if run_dir is None or not (run_dir / "data").is_dir():
        return "No curation record came with this model, so the deletions it honoured cannot be listed."
    from murmur.data.compliance import recorded_deletion_events, recorded_deletions

    events = recorded_deletion_events(run_dir / "data")
    deletions = recorded_deletions(run_dir / "data")
    stats = _read_json(run_dir / "data" / "stats.json") or {}
    return (f"Every deletion list given to the build was applied before tokenization and is re-applied by every "
            f"rebuild: {len(events):,} deletion events, leaving {len(deletions.posts):,} posts and "
            f"{len(deletions.accounts):,} accounts deleted; {_number(stats.get('deleted', 0))} posts were removed "
            "for them (copies of deleted texts included). `murmur data audit` checks that none of them remains in "
            "the run's data or token shards; a deletion that arrives later is honoured by `murmur data purge` "
            "and a rebuild of this model.")


def eval_section(run_dir: Path | None) -> str:
    """The headline numbers of eval/results.json."""
    results = _read_json(run_dir / "eval" / "results.json") if run_dir else None
    if results is None:
        return ("Not evaluated yet: this folder was exported before `murmur eval` ran. Export again after the "
                "evaluation to add its numbers here.")
    rows: list[tuple[str, Any]] = []
    for split, value in (results.get("bpb") or {}).items():
        if isinstance(value, dict) and "bpb" in value:
            rows.append((f"bits per byte, {split} (lower is better)", value["bpb"]))
    ranking = results.get("ranking") or {}
    for method in ("ll", "pmi"):
        if isinstance(ranking.get(method), dict):
            rows.append((f"reply ranking hits@1 ({method})", ranking[method].get("hits@1")))
            rows.append((f"reply ranking MRR ({method})", ranking[method].get("mrr")))
    canaries = (results.get("privacy") or {}).get("canaries") or []
    planted = [c.get("exposure") for c in canaries if isinstance(c, dict) and c.get("inserted")]
    planted = [e for e in planted if isinstance(e, (int, float))]
    if planted:
        rows.append(("max canary exposure, bits (memorisation of planted secrets)", max(planted)))
    pii = (results.get("privacy") or {}).get("pii_scan") or {}
    if "texts_with_pii" in pii:
        rows.append(("sampled replies with personal data", pii["texts_with_pii"]))
    for task, metrics in (results.get("lm_eval") or {}).items():
        for name, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                rows.append((f"lm-eval {task} {name}", value))
    rows = [row for row in rows if row[1] is not None]
    return _table(rows, ("metric", "value")) if rows else "The evaluation recorded no numbers."


def model_section(settings, run_dir: Path | None) -> str:
    if settings is None:
        return "A decoder-only transformer exported by Murmur."
    model = settings.model
    shape = ", ".join(f"{name} {getattr(model, name)}" for name in ("dim", "n_layers", "n_heads", "n_kv_heads",
                                                                    "vocab_size", "max_seq_len")
                      if getattr(model, name, None) is not None)
    origin = (f"finetuned from `{model.base}`" if model.base
              else f"pretrained from scratch (preset `{model.preset}`)" if model.preset else "pretrained from scratch")
    chat = (", then chat-finetuned on conversations rebuilt from reply threads"
            if run_dir is not None and (run_dir / "sft").is_dir() else "")
    return (f"A decoder-only transformer ({shape}), {origin} by the Murmur run `{settings.run.name}`{chat}. It "
            "loads in `transformers` (`AutoModelForCausalLM.from_pretrained`) and vLLM, with its chat template "
            "in the tokenizer files.")


def is_hub_id(name: str | None) -> bool:
    """`owner/name` as the Hub spells a repository (a local path is not a base model the Hub can link)."""
    if not name or name.startswith((".", "/", "~")) or Path(name).exists():
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def run_folder_of(src: str | Path) -> Path | None:
    """The run folder a model source belongs to (the run itself, or a stage or step folder in it), else None."""
    path = Path(str(src))
    for candidate in (path, *path.parents[:3]):
        if (candidate / "data" / "stats.json").is_file() or (candidate / "pretrain").is_dir():
            return candidate
    return None


def build_model_card(run_dir: Path | None = None, settings=None, license: str = DEFAULT_LICENSE):
    """The `huggingface_hub.ModelCard` of a model exported from `run_dir` built with `settings`."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir) if run_dir is not None else None
    base = getattr(getattr(settings, "model", None), "base", None)
    data = ModelCardData(license=license, library_name="transformers", pipeline_tag="text-generation",
                         tags=["murmur", "chat", "social-media"],
                         base_model=base if is_hub_id(base) else None)
    name = settings.run.name if settings is not None else (run_dir.name if run_dir else "model")
    licence_text = ("The licence is not set (`other`): the weights derive from the posts of the people in the "
                    "training data, so the terms of the network and of its users decide how the model may be "
                    "shared. Set it before publishing." if license == DEFAULT_LICENSE
                    else f"`{license}`; the terms of the network the posts came from apply as well.")
    body = "\n\n".join([
        f"# {name}",
        "## Model\n\n" + model_section(settings, run_dir),
        "## Training data\n\n" + data_section(run_dir),
        "## Deletions honoured\n\n" + deletions_section(run_dir),
        "## Evaluation\n\n" + eval_section(run_dir),
        "## Intended use\n\n" + INTENDED_USE,
        "## Limitations\n\n" + LIMITATIONS,
        "## Licence\n\n" + licence_text,
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_model_card(model_dir: str | Path, run_dir: str | Path | None = None, settings=None,
                     license: str = DEFAULT_LICENSE) -> Path:
    """model_dir/README.md for the model exported from `run_dir`, written atomically."""
    card = build_model_card(run_dir, settings, license)
    return write_text_atomic(Path(model_dir) / "README.md", str(card))
