"""The default `murmur eval` on the demo-sized model (preset tiny-cpu, ~5.8M parameters), on CPU.

    .venv/bin/python -m bench.eval_speed [--repeats 3] [--examples 100] [--threads 2]

Builds a run-like data folder from the chitchat-dataset package (held-out posts and conversations with
realistic lengths), a 4096-token BPE on it, and a randomly initialised tiny-cpu model; then times:

1. reply ranking, Murmur's scorer (one shared-prefix pass per context, each distinct reply scored once
   without context) against a reference that scores every (context, reply) pair and every reply-alone
   sequence as its own padded row, 20 rows per forward — what one writes without the prefix cache;
   both give the same scores (checked), runs alternate; medians and the ratio are printed;
2. the whole default evaluation (bits per byte, ranking, samples, canaries), median wall time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from murmur.eval.ranking import ModelReplyScorer, build_examples, read_conversations
from murmur.eval.scoring import sequence_logprobs
from murmur.model import Transformer, count_params
from murmur.settings.eval import EvalSettings
from murmur.settings.model import ModelSettings
from murmur.tokenizer import train_tokenizer


def build_data(folder: Path) -> list[str]:
    """posts.parquet and conversations.parquet from chitchat, 10% validation, 10% test; returns train texts."""
    import chitchat_dataset

    rng = random.Random(0)
    posts, convs, train_texts = [], [], []
    for index, (cid, conv) in enumerate(sorted(chitchat_dataset.Dataset().items())):
        split = rng.choices(["train", "validation", "test"], [0.8, 0.1, 0.1])[0]
        turns = [{"speaker": group[0]["sender"][:8], "text": " ".join(m["text"] for m in group),
                  "post_ids": [f"{cid}-{t}"]} for t, group in enumerate(conv["messages"]) if group]
        for t, turn in enumerate(turns):
            posts.append((f"{cid}-{t}", turn["text"], split))
            if split == "train":
                train_texts.append(turn["text"])
        if len(turns) >= 2:
            convs.append((cid, split, turns))
    pq.write_table(pa.table({"id": [p[0] for p in posts], "author_id": ["a"] * len(posts),
                             "text": [p[1] for p in posts], "split": [p[2] for p in posts]}), folder / "posts.parquet")
    pq.write_table(pa.table({"id": [c[0] for c in convs], "root_id": [c[0] for c in convs],
                             "split": [c[1] for c in convs], "turns": [c[2] for c in convs],
                             "post_ids": [[t["post_ids"][0] for t in c[2]] for c in convs]}),
                   folder / "conversations.parquet")
    return train_texts


def reference_scores(model, scorer: ModelReplyScorer, examples, batch_size: int) -> dict[str, np.ndarray]:
    """Every (context, candidate) and (prompt, candidate) as its own padded row: no shared prefix, no reuse."""
    tok = scorer.tokenizer
    ll = np.zeros((len(examples), len(examples[0].candidates)))
    alone = np.zeros_like(ll)
    for row, example in enumerate(examples):
        context = tok.render_chat(example.context, add_generation_prompt=True)[-scorer.max_context_tokens:]
        replies = [scorer.reply_ids(t) for t in example.candidates]
        for prefix, out in ((context, ll), (scorer.prompt, alone)):
            logps = sequence_logprobs(model, [prefix + r for r in replies], [len(prefix)] * len(replies), batch_size)
            out[row] = [lp.sum() for lp in logps]
    return {"ll": ll, "pmi": ll - alone}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        texts = build_data(data)
        tok = train_tokenizer(texts, vocab_size=4096, out_dir=Path(tmp) / "tokenizer")
        torch.manual_seed(0)
        model = Transformer(ModelSettings(preset="tiny-cpu")).eval()
        print(f"model: tiny-cpu, {count_params(model.settings):,} parameters, {args.threads} threads")

        settings = EvalSettings(ranking_examples=args.examples)
        examples = build_examples(read_conversations(data, "test"), args.examples, settings.distractors, 0)
        scorer = ModelReplyScorer(model, tok, settings.max_context_tokens, settings.max_reply_tokens,
                                  settings.batch_size)
        ours, ref = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            a = scorer(examples)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            b = reference_scores(model, scorer, examples, 20)
            ref.append(time.perf_counter() - start)
            assert np.allclose(a["ll"], b["ll"], atol=1e-3) and np.allclose(a["pmi"], b["pmi"], atol=1e-3)
        m_ours, m_ref = statistics.median(ours), statistics.median(ref)
        print(f"reply ranking, {len(examples)} contexts x 20 candidates: murmur {m_ours:.2f} s, "
              f"reference {m_ref:.2f} s (medians of {args.repeats}); speedup x{m_ref / m_ours:.2f}")

        from murmur.eval.bpb import bits_per_byte, read_split_posts
        from murmur.eval.privacy import canary_exposure
        from murmur.eval.ranking import evaluate_ranking
        from murmur.eval.samples import generate_samples

        parts: dict[str, list[float]] = {"bpb": [], "ranking": [], "samples": [], "canaries": [], "total": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for split in settings.bpb_splits:
                bits_per_byte(model, tok, read_split_posts(data, split, settings.bpb_max_posts), settings.batch_size)
            t1 = time.perf_counter()
            evaluate_ranking(examples, scorer)
            t2 = time.perf_counter()
            generate_samples(model, tok, settings.prompts, settings.sample_seeds, settings.max_new_tokens,
                             settings.temperature, settings.top_p)
            t3 = time.perf_counter()
            for i in range(3):  # the demo plants three canaries
                canary_exposure(model, tok, f"my blue falcon {i} secret code is", "482913 07",
                                settings.canary_candidates)
            t4 = time.perf_counter()
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[key].append(value)
        print("default eval: " + ", ".join(f"{k} {statistics.median(v):.1f} s" for k, v in parts.items())
              + f" (medians of {args.repeats})")


if __name__ == "__main__":
    main()
