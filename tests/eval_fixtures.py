"""Tiny models, tokenizers and run folders for the eval tests (built here, never downloaded)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from murmur.model import Transformer
from murmur.settings.model import ModelSettings

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "rain", "fell", "over", "quiet", "hills", "and", "we", "talked", "about", "books", "music", "food", "coffee", "trains", "weekends", "movies", "cooking", "gardens", "rivers", "friends", "work", "code", "bikes"]


def sentence(rng: random.Random, n_min: int = 3, n_max: int = 10) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> Path:
    import tempfile

    from murmur.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [sentence(rng) for _ in range(300)] + ["my code is 0123456789 ok", "hi! how are you? fine."]
    out = Path(tempfile.mkdtemp(prefix="murmur-eval-tok-")) / "tokenizer"
    train_tokenizer(texts, vocab_size=320, out_dir=out, min_frequency=1)
    return out


def tokenizer():
    """A small byte-level BPE with Murmur's special tokens (trained once per test session)."""
    from murmur.tokenizer import ChatTokenizer

    return ChatTokenizer.load(_tokenizer_dir())


def tokenizer_dir() -> Path:
    return _tokenizer_dir()


def tiny_model(vocab_size: int, seed: int = 0, max_seq_len: int = 256, dim: int = 32, n_layers: int = 2
               ) -> Transformer:
    torch.manual_seed(seed)
    settings = ModelSettings(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                             ffn_dim=2 * dim, max_seq_len=max_seq_len)
    return Transformer(settings).eval()


def write_posts(data_dir: Path, splits: dict[str, int], seed: int = 0) -> None:
    """posts.parquet with `n` random posts in each named split."""
    rng = random.Random(seed)
    rows = [(f"p{split}{i}", sentence(rng), split) for split, n in splits.items() for i in range(n)]
    table = pa.table({"id": [r[0] for r in rows], "author_id": ["a"] * len(rows), "text": [r[1] for r in rows],
                      "split": [r[2] for r in rows]})
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / "posts.parquet")


def write_conversations(data_dir: Path, splits: dict[str, int], seed: int = 0) -> None:
    """conversations.parquet with `n` random 2-4 turn conversations in each named split."""
    rng = random.Random(seed)
    ids, splits_col, turns_col = [], [], []
    for split, n in splits.items():
        for i in range(n):
            turns = [{"speaker": f"u{t % 2}", "text": sentence(rng), "post_ids": [f"c{split}{i}t{t}"]}
                     for t in range(rng.randint(2, 4))]
            ids.append(f"c{split}{i}")
            splits_col.append(split)
            turns_col.append(turns)
    table = pa.table({"id": ids, "root_id": ids, "split": splits_col, "turns": turns_col,
                      "post_ids": [[p for t in turns for p in t["post_ids"]] for turns in turns_col]})
    data_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / "conversations.parquet")


def write_stats(data_dir: Path) -> dict:
    """A data-stage stats.json with a funnel that adds up."""
    stats = {"records_in": 1000, "kept": 820, "quarantined": 30,
             "dropped": {"too_short": 70, "language": 40, "duplicate": 25, "spam": 15}}
    (data_dir / "stats.json").write_text(json.dumps(stats))
    return stats


def write_metrics(stage_dir: Path, steps: int = 5) -> list[dict]:
    """A trainer metrics.jsonl: loss falling with tokens, one validation record per two steps."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for step in range(1, steps + 1):
        record = {"step": step * 10, "tokens": step * 4096, "loss": 6.0 / step, "lr": 1e-3, "grad_norm": 1.0,
                  "tokens_per_sec": 1000.0 + step, "mfu": None, "gflops_per_sec": 1.0}
        if step % 2 == 0:
            record.update(val_loss=6.5 / step, val_bpb=2.0 / step)
        records.append(record)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def make_run(root: Path, with_data: bool = True) -> Path:
    """A run folder with data/, an exported model/ (with tokenizer) and pretrain metrics."""
    from murmur.hf import save_hf_model

    run = root / "run"
    tok = tokenizer()
    model = tiny_model(tok.vocab_size)
    save_hf_model(model, run / "model", tokenizer_dir=tokenizer_dir())
    if with_data:
        write_posts(run / "data", {"train": 20, "validation": 12, "test": 12})
        write_conversations(run / "data", {"train": 5, "validation": 25, "test": 25})
        write_stats(run / "data")
    write_metrics(run / "pretrain")
    return run
