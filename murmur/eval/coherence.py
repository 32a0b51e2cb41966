"""Coherence of a model's samples: their perplexity under other models, with distinct-2 beside it.

Likelihood figures barely separate a fluent model from a babbling one on short chit-chat, so the report card
also reads the replies the models wrote to the fixed prompts (eval/samples.jsonl). Two figures per model:

- perplexity of its replies under a judge, given the prompt (each judge renders the prompt with its own chat
  template and tokenizer). A model never judges itself: a model finds its own samples likely by
  construction. With several models side by side, every model judges every other one, so each column of the
  matrix is one judge and rows compare within a column; the judge with the most parameters is the one the
  summary quotes (`primary_judge`), or the others for its own row.
- distinct-2: distinct word bigrams over all bigrams of its replies. A judge rates a reply that repeats one
  safe phrase as very likely; distinct-2 shows that repetition, so a repetitive model cannot win on
  perplexity alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from murmur.eval.scoring import continuation_logprobs


@dataclass
class Judge:
    """A model that scores other models' replies: its name as the card prints it, the model, its tokenizer."""

    name: str
    model: Any
    tokenizer: Any


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct word n-grams over all word n-grams of `texts` (lowercased, split on whitespace); None when
    the texts hold no n-gram."""
    grams = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def judged_perplexity(judge: Judge, samples: Sequence[dict]) -> dict[str, Any]:
    """Perplexity per judge token of the samples' replies (each given its prompt as a user turn), and what it
    counted. Empty replies are skipped; a reply too long for the judge's context is cut to fit."""
    import torch

    tok, model = judge.tokenizer, judge.model
    by_prompt: dict[str, list[str]] = {}
    for sample in samples:
        if sample["reply"].strip():
            by_prompt.setdefault(sample["prompt"], []).append(sample["reply"])
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for prompt, replies in by_prompt.items():
            prefix = tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
            room = model.settings.max_seq_len - len(prefix)
            if room < 1:
                continue
            ids = [tok.encode(reply, specials_as_text=True)[:room] for reply in replies]
            for logps in continuation_logprobs(model, prefix, ids):
                nats -= float(logps.sum())
                tokens += len(logps)
    return {"judge": judge.name, "perplexity": math.exp(nats / tokens) if tokens else None, "tokens": tokens,
            "replies": sum(len(r) for r in by_prompt.values())}


def coherence_matrix(samples: dict[str, Sequence[dict]], judges: dict[str, Judge]) -> dict[str, Any]:
    """For each model (name -> its samples): distinct-2 of its replies and their perplexity under every judge
    but itself (a judge is named as the model it is). `primary_judge`: the judge the summary quotes."""
    rows = {}
    for name, model_samples in samples.items():
        perplexity = {judge_name: (None if judge_name == name else judged_perplexity(judge, model_samples))
                      for judge_name, judge in judges.items()}
        rows[name] = {"distinct_2": distinct_n([s["reply"] for s in model_samples]),
                      "perplexity": {j: (r["perplexity"] if r else None) for j, r in perplexity.items()},
                      "judged_tokens": {j: (r["tokens"] if r else 0) for j, r in perplexity.items()}}
    primary = max(judges, key=lambda j: _params(judges[j].model)) if judges else None
    for name, row in rows.items():
        # The quoted figure: the primary judge's, or for the primary judge's own samples the next biggest's.
        ranked = sorted((j for j in judges if j != name), key=lambda j: -_params(judges[j].model))
        row["judge"] = ranked[0] if ranked else None
        row["judged_perplexity"] = row["perplexity"][ranked[0]] if ranked else None
    return {"primary_judge": primary, "judges": list(judges), "models": rows}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())
