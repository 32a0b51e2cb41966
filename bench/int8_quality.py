"""What int8 weights cost in quality: bits per byte of SmolLM2-135M-Instruct on chitchat messages (not in CI).

    .venv/bin/python bench/int8_quality.py [--messages 400] [--seed 0]

A random sample of the demo corpus's messages, each scored as plain text after the end-of-text token (every
token of the message is predicted; bits over the message's UTF-8 bytes), by the same model three ways: float32; int8 as Murmur serves it with its own CPU kernels (int8 weights, each
row's activations rounded to int16; prompts of 32 tokens or more dequantize to the model's dtype); and int8
with PyTorch's kernels only (int8pack with bfloat16 activations at one row, int8 activations through
`_int_mm` for 2-31 rows). Each message is one forward pass, as a prompt is prefilled, so messages under 32
tokens (most of them) take the decode-sized products. Prints bits per byte and the change against float32.
"""

from __future__ import annotations

import argparse
import json
import math
import random

import torch

SOURCE = "smollm2-135m-instruct"


def sample_messages(count: int, seed: int) -> list[str]:
    from murmur.data.sources import chitchat_path

    corpus = json.loads(chitchat_path().read_text())
    texts = [message["text"] for conversation in corpus.values() for turn in conversation["messages"]
             for message in turn if message.get("text", "").strip()]
    return random.Random(seed).sample(texts, count)


def bits_per_byte(model, tokenizer, texts: list[str]) -> tuple[float, int, int]:
    nats, total_bytes, tokens = 0.0, 0, 0
    with torch.inference_mode():
        for text in texts:
            ids = [tokenizer.eos_id, *tokenizer.encode(text)]
            logits = model(torch.tensor([ids[:-1]]))[0].float()
            nats += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            total_bytes += len(text.encode())
            tokens += len(ids) - 1
    return nats / math.log(2) / total_bytes, total_bytes, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from murmur.infer import cpu_kernels
    from murmur.infer.quantize import quantize_model
    from murmur.source import load_model, local_model_dir
    from murmur.tokenizer import ChatTokenizer

    torch.set_num_threads(1)
    src = local_model_dir(SOURCE)
    tokenizer = ChatTokenizer.load(src)
    texts = sample_messages(args.messages, args.seed)
    results = {}
    for label, quantize, own_kernels in (("float32", "none", True), ("int8, Murmur's kernels", "int8", True),
                                         ("int8, PyTorch's kernels", "int8", False)):
        cpu_kernels.set_enabled(own_kernels)
        model = load_model(src, device=torch.device("cpu"), dtype=torch.float32).model.eval()
        summary = quantize_model(model, quantize)
        results[label], total_bytes, tokens = bits_per_byte(model, tokenizer, texts)
        print(f"{label:<26} bits per byte {results[label]:.5f}  ({summary.describe()})", flush=True)
    cpu_kernels.set_enabled(True)
    print(f"{args.messages} messages (seed {args.seed}), {total_bytes:,} bytes, {tokens:,} tokens")
    base = results["float32"]
    for label, value in results.items():
        print(f"  {label:<26} {value:.5f}  {100 * (value - base) / base:+.3f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
