"""Tiny corpora and recipes for the training tests (no downloads, no tokenizer: token ids directly)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from murmur.config import settings_from_dict
from murmur.shards import write_shards

VOCAB = 64
SEQ = 16


def _sequence_docs(rng, n: int) -> list[list[int]]:
    """Arithmetic progressions mod the vocabulary: learnable in a few steps by a tiny model."""
    docs = []
    for _ in range(n):
        start, stride, length = rng.integers(3, VOCAB), rng.integers(1, 4), rng.integers(12, 40)
        docs.append([int(3 + (start + stride * i) % (VOCAB - 3)) for i in range(length)])
    return docs


def write_pretrain_tokens(tokens_dir: Path, n_train: int = 200, validation_tokens: int | None = None) -> None:
    """Pretraining shards; validation_tokens makes the validation split exactly that long (e.g. one window)."""
    rng = np.random.default_rng(0)
    write_shards(tokens_dir, _sequence_docs(rng, n_train), vocab_size=VOCAB, split="train", boundary_id=0)
    val = _sequence_docs(rng, 20)
    if validation_tokens is not None:
        flat = [t for d in val for t in d][:validation_tokens]
        val = [flat]
    write_shards(tokens_dir, val, vocab_size=VOCAB, split="validation")


REPLIES = ([10, 11, 12, 13], [20, 21, 22], [30, 31])


def _conversations(rng, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """user: 1 + random ids + 2; assistant: one of three canned replies, then 2. Masked on the reply."""
    docs, masks = [], []
    for _ in range(n):
        prompt = [int(x) for x in rng.integers(3, VOCAB - 1, size=rng.integers(3, 7))]
        reply = REPLIES[int(rng.integers(len(REPLIES)))]
        ids = [1] + prompt + [2] + reply + [2]
        mask = [0] * (len(prompt) + 2) + [1] * (len(reply) + 1)
        docs.append(ids)
        masks.append(mask)
    return docs, masks


def write_sft_tokens(tokens_dir: Path, n_train: int = 300, n_val: int = 40) -> None:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("validation", n_val)):
        docs, masks = _conversations(rng, n)
        write_shards(tokens_dir, docs, masks=masks, vocab_size=VOCAB, kind="sft", split=split, boundary_id=0)


def recipe(run_dir: Path, **train) -> dict:
    """A recipe dict for a tiny model; `train` keys go to both [train] and [sft] unless prefixed sft_."""
    base = dict(seq_len=SEQ, micro_batch_size=4, steps=8, log_interval=1, eval_interval=4, eval_batches=4,
                checkpoint_interval=4, warmup_steps=2, lr=3e-3)
    base.update({k: v for k, v in train.items() if not k.startswith("sft_")})
    sft = {**base, **{k[4:]: v for k, v in train.items() if k.startswith("sft_")}}
    return {"run": {"dir": str(run_dir)},
            "model": dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32),
            "train": base, "sft": sft}


def settings_for(run_dir: Path, **train):
    return settings_from_dict(recipe(run_dir, **train))


def link_tokens(run_dir: Path, tokens_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "tokens").symlink_to(tokens_dir.resolve())


def read_losses(stage_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (the last record of a step wins: resumed runs append)."""
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def read_val(stage_dir: Path) -> dict[int, float]:
    out = {}
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("val_loss") is not None:
            out[rec["step"]] = rec["val_loss"]
    return out


def in_one_thread(fn):
    """fn() with one torch and OpenMP thread, as a killed child process runs it (crash tests compare bit-exactly)."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env
