"""Constrained decoding's cost: tokens/s with and without a JSON-schema grammar on Murmur's engine.

    .venv/bin/python bench/structured.py [--preset tiny-cpu] [--tokens 64] [--repeats 3]

A random model of the preset's shape (its vocabulary trained on random words) decodes 1 and 8 sampled
streams, free and constrained by a schema (llguidance, as the server does), and prints tokens/s and the
ratio constrained / free (target >= 0.8). It also times the two grammar libraries' per-token work alone
(mask + advance) on the same vocabulary: llguidance, and xgrammar when it is installed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time

import torch

SCHEMA = {"type": "object", "properties": {
    "words": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 40},
    "mood": {"enum": ["happy", "sad"]}}, "required": ["words", "mood"], "additionalProperties": False}


def build(preset: str):
    from murmur.model import Transformer
    from murmur.settings.model import ModelSettings
    from murmur.tokenizer import train_tokenizer

    settings = ModelSettings(preset=preset)
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(20000)]
    tokenizer = train_tokenizer([" ".join(rng.choices(words, k=40)) for _ in range(3000)], settings.vocab_size)
    torch.manual_seed(0)
    model = Transformer(settings.model_copy(update={"vocab_size": tokenizer.vocab_size})).eval()
    return model, tokenizer


def tokens_per_s(engine, streams: int, tokens: int, grammar, repeats: int) -> float:
    from murmur.infer.sampling import SamplingParams

    rates = []
    for r in range(repeats):
        params = [SamplingParams(seed=r * 100 + i, max_tokens=tokens, ignore_eos=grammar is None, grammar=grammar)
                  for i in range(streams)]
        start = time.perf_counter()
        done = engine.generate(["give me JSON"] * streams, params)
        rates.append(sum(c.completion_tokens for c in done) / (time.perf_counter() - start))
    return statistics.median(rates)


def mask_cost_us(tokenizer, vocab: int, steps: int = 200) -> dict[str, float]:
    """Microseconds per token of mask + advance, each library alone, following one random walk in its grammar."""
    import json

    import numpy as np

    from murmur.infer.grammar import GrammarCompiler, allowed_tokens

    out = {}
    rng = np.random.default_rng(0)
    grammar = GrammarCompiler(tokenizer, vocab).json_schema(SCHEMA)
    state, spent, n = grammar.start(), 0.0, 0
    for _ in range(steps):
        start = time.perf_counter()
        allowed = allowed_tokens([state], vocab)[0].numpy()
        token = int(rng.choice(np.flatnonzero(allowed)))
        if state.finished or token in tokenizer.stop_ids:
            break
        state.accept(token)
        spent, n = spent + time.perf_counter() - start, n + 1
    out["llguidance"] = spent / max(n, 1) * 1e6
    try:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return out
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer, eos_token="<|endoftext|>")
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=sorted(tokenizer.stop_ids))
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA),
                                                                              any_whitespace=False))
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    spent, n = 0.0, 0
    for _ in range(steps):
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[0, :vocab]
        token = int(rng.choice(np.flatnonzero(bits)))
        if matcher.is_terminated() or token in tokenizer.stop_ids:
            break
        matcher.accept_token(token)
        spent, n = spent + time.perf_counter() - start, n + 1
    out["xgrammar"] = spent / max(n, 1) * 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from murmur.infer.engine import Engine

    model, tokenizer = build(args.preset)
    engine = Engine(model, tokenizer, max_batch_size=8)
    grammar = engine.grammars.json_schema(SCHEMA)
    print(f"preset {args.preset}: vocab {model.settings.vocab_size}, {args.tokens} tokens per stream")
    for streams in (1, 8):
        free = tokens_per_s(engine, streams, args.tokens, None, args.repeats)
        constrained = tokens_per_s(engine, streams, args.tokens, grammar, args.repeats)
        print(f"{streams} stream(s): free {free:8.1f} tok/s  constrained {constrained:8.1f} tok/s  "
              f"ratio {constrained / free:.2f} (target >= 0.8)")
    for library, cost in mask_cost_us(tokenizer, model.settings.vocab_size).items():
        print(f"{library}: {cost:7.1f} us per token (mask + advance)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
