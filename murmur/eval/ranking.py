"""Reply ranking: can the model tell the true next reply of a held-out conversation from 19 others?

For each sampled context the candidates are the true reply plus `distractors` replies drawn from other
conversations of the same split (fixed seed, so runs compare). Two scores per candidate:
- ll:  log p(reply | context), summed over the reply's tokens and its end-of-turn token;
- pmi: ll minus log p(reply | no context). Small models otherwise prefer short, generic replies;
  PMI asks how much the context raised the reply's probability.
Reported: hits@1, hits@5 and mean reciprocal rank of the true reply, with chance beside them and each
figure's standard error over the contexts (`se`): a sample of contexts, not all of them, is ranked by
default, and the error says how far another sample could move the figure.
Ties are scored at their expected value under a random order, so a scorer that cannot tell the
candidates apart gets exactly chance.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from murmur.errors import MurmurError
from murmur.eval.scoring import continuation_logprobs

Message = dict[str, str]


@dataclass
class RankingExample:
    """One context, its candidate replies, and which one is true."""

    context: list[Message]
    candidates: list[str]
    true_index: int


def read_conversations(data_dir: str | Path, split: str) -> list[list[dict]]:
    """The turns (speaker, text) of every conversation of `split` in `data_dir/conversations.parquet`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(data_dir) / "conversations.parquet"
    if not path.is_file():
        raise MurmurError(f"{path} not found; run `murmur data` first or pass --data DIR")
    table = pq.read_table(path, columns=["id", "split", "turns"])
    table = table.filter(pc.equal(table["split"], split))
    return [[{"speaker": t["speaker"], "text": t["text"]} for t in turns] for turns in table["turns"].to_pylist()]


def context_messages(turns: list[dict], reply_at: int) -> list[Message]:
    """The turns before `reply_at` as chat messages: the replier's own turns are the assistant's."""
    replier = turns[reply_at]["speaker"]
    return [{"role": "assistant" if t["speaker"] == replier else "user", "content": t["text"]}
            for t in turns[:reply_at]]


def build_examples(conversations: list[list[dict]], n_examples: int, distractors: int, seed: int
                   ) -> list[RankingExample]:
    """Up to `n_examples` ranking examples, one per conversation, chosen and shuffled with `seed`."""
    rng = random.Random(seed)
    usable = [(i, turns) for i, turns in enumerate(conversations)
              if len(turns) >= 2 and all(t["text"] for t in turns[1:])]
    pool = sorted({(i, t["text"]) for i, turns in usable for t in turns[1:]})
    distinct = {text for _, text in pool}
    if len(usable) < 2 or len(distinct) < distractors + 1:
        raise MurmurError(
            f"reply ranking needs conversations with at least {distractors + 1} distinct replies in its split, found "
            f"{len(distinct)} replies in {len(usable)} conversations; lower eval.distractors, choose another "
            "eval.ranking_split, or set eval.ranking_examples=0 to skip it")
    rng.shuffle(usable)
    examples = []
    for conv_index, turns in usable[:n_examples]:
        reply_at = rng.randrange(1, len(turns))
        true_reply = turns[reply_at]["text"]
        others = sorted({text for other, text in pool if other != conv_index and text != true_reply})
        if len(others) < distractors:  # this conversation holds most replies: draw from all of them
            others = sorted(distinct - {true_reply})
        chosen = rng.sample(others, distractors)
        true_index = rng.randrange(distractors + 1)
        candidates = chosen[:true_index] + [true_reply] + chosen[true_index:]
        examples.append(RankingExample(context_messages(turns, reply_at), candidates, true_index))
    return examples


def rank_metrics(scores: np.ndarray, true_index: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """hits@k and mean reciprocal rank of the true candidate (row-wise, higher score is better).

    A tie is broken at random in expectation: with g candidates strictly better and e tied (the true
    one included), the true rank is uniform on g+1..g+e.
    """
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.arange(len(scores))
    true = scores[rows, true_index][:, None]
    better = (scores > true).sum(axis=1)
    tied = (scores == true).sum(axis=1)
    per_context = {f"hits@{k}": np.clip((k - better) / tied, 0.0, 1.0) for k in ks}
    per_context["mrr"] = np.array([np.mean(1.0 / np.arange(g + 1, g + e + 1)) for g, e in zip(better, tied)])
    out: dict = {name: float(np.mean(values)) for name, values in per_context.items()}
    out["se"] = {name: standard_error(values) for name, values in per_context.items()}
    return out


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of per-context values (sample standard deviation / sqrt(n)); 0 for one."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def chance_metrics(n_candidates: int, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """What a scorer that guesses gets: hits@k = k/n, MRR = (1 + 1/2 + ... + 1/n) / n."""
    out = {f"hits@{k}": min(k, n_candidates) / n_candidates for k in ks}
    out["mrr"] = float(np.sum(1.0 / np.arange(1, n_candidates + 1)) / n_candidates)
    return out


def evaluate_ranking(examples: list[RankingExample],
                     scorer: Callable[[list[RankingExample]], dict[str, np.ndarray]]) -> dict:
    """Metrics of each scoring method `scorer` returns ({method: scores of shape (examples, candidates)})."""
    if not examples:
        raise MurmurError("no ranking examples to evaluate")
    true_index = np.array([e.true_index for e in examples])
    n_candidates = len(examples[0].candidates)
    result = {"examples": len(examples), "candidates": n_candidates, "chance": chance_metrics(n_candidates)}
    for method, scores in scorer(examples).items():
        result[method] = rank_metrics(scores, true_index)
    return result


class ModelReplyScorer:
    """Scores candidate replies with a Murmur model: log-likelihood given the context, and PMI."""

    def __init__(self, model, tokenizer, max_context_tokens: int = 96, max_reply_tokens: int = 48,
                 batch_size: int = 32, progress: Callable[[str], None] | None = None, clock=time.monotonic):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.progress, self.clock = progress, clock  # a line about every tenth of the contexts
        self.max_reply_tokens = max_reply_tokens
        limit = model.settings.max_seq_len - (max_reply_tokens + 1)
        if limit < 4:
            raise MurmurError(f"the model's context ({model.settings.max_seq_len} tokens) cannot hold a reply of "
                              f"eval.max_reply_tokens={max_reply_tokens}; lower it")
        self.max_context_tokens = min(max_context_tokens, limit)
        self.prompt = tokenizer.render_chat([], add_generation_prompt=True)  # "<|im_start|>assistant\n"
        self.turn_end = self._turn_end_ids()

    def _turn_end_ids(self) -> list[int]:
        """The ids that close an assistant turn (up to and including the first stop id, e.g. <|im_end|>)."""
        closed = self.tokenizer.render_chat([{"role": "assistant", "content": ""}])
        tail = closed[len(self.prompt):]
        stops = set(self.tokenizer.stop_ids)
        for i, token in enumerate(tail):
            if token in stops:
                return tail[:i + 1]
        return [self.tokenizer.eos_id]

    def reply_ids(self, text: str) -> list[int]:
        """A candidate reply as scored: its tokens (cut to max_reply_tokens) and the end of the turn."""
        return self.tokenizer.encode(text)[:self.max_reply_tokens] + self.turn_end

    def __call__(self, examples: list[RankingExample]) -> dict[str, np.ndarray]:
        started = self.clock()
        replies = {text: self.reply_ids(text) for e in examples for text in e.candidates}
        # Without context every example shares the same prefix: score each distinct reply once.
        texts = sorted(replies)
        alone = continuation_logprobs(self.model, self.prompt, [replies[t] for t in texts], self.batch_size)
        unconditional = {t: float(lp.sum()) for t, lp in zip(texts, alone)}
        self._say(f"eval: reply ranking: {len(texts)} distinct replies scored without context "
                  f"({self.clock() - started:.0f} s)")
        ll = np.zeros((len(examples), len(examples[0].candidates)))
        every = max(1, len(examples) // 10)
        for row, example in enumerate(examples):
            if row and row % every == 0:
                elapsed = self.clock() - started
                self._say(f"eval: reply ranking: {row}/{len(examples)} contexts ({elapsed:.0f} s)")
            context = self.tokenizer.render_chat(example.context, add_generation_prompt=True)
            context = context[-self.max_context_tokens:]
            logps = continuation_logprobs(self.model, context, [replies[t] for t in example.candidates],
                                          self.batch_size)
            ll[row] = [lp.sum() for lp in logps]
        pmi = ll - np.array([[unconditional[t] for t in e.candidates] for e in examples])
        return {"ll": ll, "pmi": pmi}

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)


def run_ranking(model, tokenizer, data_dir: str | Path, settings, progress: Callable[[str], None] | None = None
                ) -> dict:
    """Reply ranking of the model on `settings.ranking_split` (an `EvalSettings`)."""
    conversations = read_conversations(data_dir, settings.ranking_split)
    if not conversations:
        raise MurmurError(f"{Path(data_dir) / 'conversations.parquet'} has no conversations in the "
                          f"'{settings.ranking_split}' split; set eval.ranking_split, or eval.ranking_examples=0 "
                          "to skip reply ranking")
    examples = build_examples(conversations, settings.ranking_examples, settings.distractors, settings.seed)
    scorer = ModelReplyScorer(model, tokenizer, settings.max_context_tokens, settings.max_reply_tokens,
                              settings.batch_size, progress=progress)
    return {"split": settings.ranking_split, "seed": settings.seed, **evaluate_ranking(examples, scorer)}
