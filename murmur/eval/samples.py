"""Samples: the model's replies to a fixed set of prompts at fixed seeds, so checkpoints read side by side.

Generation goes through the inference engine (murmur.infer), the same code that serves the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from murmur.files import write_text_atomic


def generate_samples(model, tokenizer, prompts: list[str], seeds: list[int], max_new_tokens: int = 48,
                     temperature: float = 0.8, top_p: float = 0.95) -> list[dict]:
    """One reply per (seed, prompt); each prompt is a user message answered as the assistant."""
    from murmur.infer.engine import Engine
    from murmur.infer.sampling import SamplingParams

    jobs = [(seed, prompt) for seed in seeds for prompt in prompts]
    if not jobs:
        return []
    engine = Engine(model, tokenizer, max_batch_size=min(16, len(jobs)))
    chats = [[{"role": "user", "content": prompt}] for _, prompt in jobs]
    # A long prompt leaves less of the context for the reply: cap each reply to the room left.
    room = [engine.max_seq_len - len(engine.encode_prompt(chat)[0]) for chat in chats]
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                             max_tokens=max(1, min(max_new_tokens, left)))
              for (seed, _), left in zip(jobs, room)]
    completions = engine.generate(chats, params)
    return [{"prompt": prompt, "seed": seed, "reply": c.text, "finish_reason": c.finish_reason,
             "tokens": c.completion_tokens} for (seed, prompt), c in zip(jobs, completions)]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Write records one JSON object a line, atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
