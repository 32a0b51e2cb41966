"""Training throughput: `murmur train` (the whole loop) against a bare PyTorch loop, same model and batches.

    .venv/bin/python bench/train_step.py [--preset tiny-cpu] [--seq 128] [--batch 16] [--steps 40] [--repeats 3]

Murmur runs `run_stage` on token shards written here (loader, schedule, clipping, metrics, the
checkpoint at the end); its speed is the tokens/s it logs per interval, which excludes the start-up,
evaluations and checkpoint writes, as a user sees it on the console. The bare loop is what one writes
by hand: the same Transformer and initial weights, AdamW (foreach) with the same hyper-parameters,
the same batches already in memory, cross-entropy, backward, clip_grad_norm_, step, zero_grad,
timed over the same intervals. Runs alternate, and which goes first swaps every repeat, so load
drifts hit both alike. Prints the median
tokens/s of each and the ratio of medians (target: Murmur >= 0.95 of the bare loop).
"""

from __future__ import annotations

import sys

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from murmur.config import settings_from_dict
from murmur.model import Transformer
from murmur.settings.model import ModelSettings
from murmur.shards import TokenLoader, write_shards
from murmur.train.trainer import run_stage


def make_tokens(folder: Path, vocab: int, tokens: int) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, vocab, size=500).tolist() for _ in range(tokens // 500 + 1)]
    write_shards(folder, docs, vocab_size=vocab, split="train", boundary_id=0)


def recipe(run_dir: Path, args) -> dict:
    return {"run": {"dir": str(run_dir)}, "model": {"preset": args.preset},
            "train": {"seq_len": args.seq, "micro_batch_size": args.batch, "steps": args.steps,
                      "log_interval": args.interval, "eval_interval": 10**6, "checkpoint_interval": 10**6,
                      "warmup_steps": 5, "lr": 3e-3}}


def murmur_rates(work: Path, tokens: Path, args, repeat: int) -> list[float]:
    run = work / f"murmur{repeat}"
    run.mkdir()
    (run / "tokens").symlink_to(tokens)
    with contextlib.redirect_stdout(io.StringIO()):
        run_stage(settings_from_dict(recipe(run, args)), run, "pretrain")
    records = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_sec"] for r in records if "loss" in r][1:]  # the first interval warms up


def bare_rates(tokens: Path, args) -> list[float]:
    settings = settings_from_dict({"model": {"preset": args.preset}})
    model_settings: ModelSettings = settings.model
    torch.manual_seed(0)
    model = Transformer(model_settings)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-3, betas=(0.9, 0.95), foreach=True)
    loader = iter(TokenLoader(tokens, "pretrain", "train", seq_len=args.seq, batch_size=args.batch))
    batches = [next(loader) for _ in range(args.steps)]
    rates, t0 = [], time.perf_counter()
    for step, batch in enumerate(batches, 1):
        logits = model(batch["inputs"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.interval == 0:
            loss.item()  # as a hand-written loop prints its loss
            now = time.perf_counter()
            rates.append(args.interval * args.seq * args.batch / (now - t0))
            t0 = now
    return rates[1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.steps < 2 * args.interval:
        parser.error("--steps must cover at least two --interval lengths (the first one is warm-up)")
    vocab = settings_from_dict({"model": {"preset": args.preset}}).model.vocab_size
    print(f"preset {args.preset}, {args.batch} x {args.seq} tokens per step, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (alternating)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokens = work / "tokens"
        make_tokens(tokens, vocab, args.steps * args.seq * args.batch + 10_000)
        murmur, bare, ratios = [], [], []
        for repeat in range(args.repeats):
            # Swap which runs first each repeat, so a load trend does not favour one side.
            if repeat % 2 == 0:
                m = statistics.median(murmur_rates(work, tokens, args, repeat))
                b = statistics.median(bare_rates(tokens, args))
            else:
                b = statistics.median(bare_rates(tokens, args))
                m = statistics.median(murmur_rates(work, tokens, args, repeat))
            murmur.append(m)
            bare.append(b)
            ratios.append(m / b)
            print(f"repeat {repeat + 1}: murmur {m:,.0f} tok/s, bare {b:,.0f} tok/s, ratio {m / b:.3f}",
                  file=sys.stderr)
    print(f"murmur train: {statistics.median(murmur):,.0f} tokens/s (median of {args.repeats})")
    print(f"bare loop:    {statistics.median(bare):,.0f} tokens/s (median of {args.repeats})")
    print(f"ratio:        {statistics.median(ratios):.3f} (median of per-repeat ratios; target >= 0.95)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
