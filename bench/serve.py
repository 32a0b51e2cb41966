"""Serving speed: Murmur's engine against Hugging Face `transformers` generate, and batching gains.

    .venv/bin/python bench/serve.py [--preset tiny-cpu] [--new-tokens 128] [--repeats 5] [--streams 8]

One run builds a random model of the preset's shape with a tokenizer, exports it as a Hugging Face
directory, and loads that same directory into both `transformers` and Murmur. It prints:

1. single-stream greedy decode tokens/s, Murmur vs `generate` (target: Murmur >= 2x), after checking
   that both produce the same tokens;
2. aggregate tokens/s with N concurrent sampled streams vs 1 stream, on Murmur (target: >= 4x at 8);
3. time to first token and inter-token latency (median, p99) seen by N concurrent streaming HTTP
   clients of `murmur serve`'s app on loopback.

(1) and (2) run for the eager engine and for the engine with its decode step compiled
(`murmur serve --compile`); (3) for the compiled one (--no-compile: eager only, no compile time).

Medians over --repeats runs; Murmur and the reference alternate so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import string
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def build_model_dir(preset: str, root: Path) -> Path:
    """A random model of `preset`'s shape with a tokenizer of its vocabulary size, exported for transformers."""
    from murmur.hf import save_hf_model
    from murmur.model import Transformer
    from murmur.settings.model import ModelSettings
    from murmur.tokenizer import train_tokenizer

    settings = ModelSettings(preset=preset)
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(20000)]
    texts = [" ".join(rng.choices(words, k=40)) for _ in range(3000)]
    tokenizer = train_tokenizer(texts, settings.vocab_size, root / "tokenizer")
    settings = settings.model_copy(update={"vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = Transformer(settings)
    return save_hf_model(model, root / "model", tokenizer_dir=root / "tokenizer")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def single_stream(engine, hf_model, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    from murmur.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    ids = torch.tensor([prompt])
    hf_kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                 "attention_mask": torch.ones_like(ids), "pad_token_id": 0}
    with torch.inference_mode():
        ours = engine.generate([prompt], params)[0].token_ids
        theirs = hf_model.generate(ids, **hf_kwargs)[0, len(prompt):].tolist()
    same = ours == theirs
    murmur_s, hf_s = [], []
    for _ in range(repeats):
        murmur_s.append(timed(lambda: engine.generate([prompt], params)))
        with torch.inference_mode():
            hf_s.append(timed(lambda: hf_model.generate(ids, **hf_kwargs)))
    m, h = new_tokens / statistics.median(murmur_s), new_tokens / statistics.median(hf_s)
    return {"murmur_tok_s": m, "hf_tok_s": h, "ratio": m / h, "same_tokens": same}


def batching_gain(engine, prompt: list[int], new_tokens: int, streams: int, repeats: int) -> dict:
    from murmur.infer.sampling import SamplingParams

    def run(n: int) -> float:
        params = [SamplingParams(temperature=1.0, top_p=0.95, seed=i, max_tokens=new_tokens, ignore_eos=True)
                  for i in range(n)]
        return n * new_tokens / timed(lambda: engine.generate([prompt] * n, params))

    one, many = [], []
    for _ in range(repeats):
        one.append(run(1))
        many.append(run(streams))
    a, b = statistics.median(one), statistics.median(many)
    return {"one_tok_s": a, "many_tok_s": b, "ratio": b / a}


def http_latency(engine, streams: int, new_tokens: int, rounds: int) -> dict:
    """TTFT and inter-token gaps seen by `streams` concurrent streaming clients, over `rounds` rounds."""
    import json

    import httpx
    import uvicorn

    from murmur.serve.app import create_app

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from serve_fixtures import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine, model_name="bench"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    ttft, gaps = [], []
    lock = threading.Lock()
    # One client for all threads: building a client per request (TLS context and all) would be timed too.
    http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=2 * streams))

    def client(seed: int) -> None:
        body = {"model": "bench", "messages": [{"role": "user", "content": f"tell me a story {seed}"}],
                "stream": True, "max_tokens": new_tokens, "seed": seed, "ignore_eos": True}
        start = time.perf_counter()
        times = []
        with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        times.append(time.perf_counter())
        with lock:
            ttft.append(times[0] - start)
            gaps.extend(b - a for a, b in itertools.pairwise(times))

    for r in range(rounds):
        threads = [threading.Thread(target=client, args=(r * streams + i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    http.close()
    server.should_exit = True
    thread.join()
    return {"ttft_median_ms": 1000 * statistics.median(ttft), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_median_ms": 1000 * statistics.median(gaps), "itl_p99_ms": 1000 * percentile(gaps, 99),
            "samples": len(ttft)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true", help="measure the eager engine only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (1 is steadiest on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from murmur.infer.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(args.preset, Path(tmp))
        engines = {"eager": Engine.from_source(model_dir, device=args.device, dtype=torch.float32,
                                               max_batch_size=max(args.streams, 1))}
        if not args.no_compile:
            engine = Engine.from_source(model_dir, device=args.device, dtype=torch.float32,
                                        max_batch_size=max(args.streams, 1), compile=True)
            compile_s = timed(engine.warmup)
            engines["compiled"] = engine
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hf_model.to(args.device)
        engine = engines["eager"]
        prompt = engine.tokenizer.encode("once upon a time " * 40)[:args.prompt_tokens]
        print(f"model: {args.preset}, {sum(p.numel() for p in engine.model.parameters()):,} parameters, "
              f"{torch.get_num_threads()} threads, device {args.device}, prompt {len(prompt)} tokens, "
              f"{args.new_tokens} new tokens, median of {args.repeats}")
        if "compiled" in engines:
            print(f"compiled engine: warm-up (compilation) took {compile_s:.1f} s")
        for name, engine in engines.items():
            single = single_stream(engine, hf_model, prompt, args.new_tokens, args.repeats)
            print(f"(1) [{name}] single stream greedy decode: murmur {single['murmur_tok_s']:.0f} tok/s, "
                  f"transformers generate {single['hf_tok_s']:.0f} tok/s, ratio {single['ratio']:.2f}x "
                  f"(target >= 2x); same tokens: {single['same_tokens']}")
        for name, engine in engines.items():
            gain = batching_gain(engine, prompt, args.new_tokens, args.streams, args.repeats)
            print(f"(2) [{name}] aggregate throughput: {args.streams} streams {gain['many_tok_s']:.0f} tok/s vs "
                  f"1 stream {gain['one_tok_s']:.0f} tok/s, ratio {gain['ratio']:.2f}x (target >= 4x)")
        name, engine = list(engines.items())[-1]
        latency = http_latency(engine, args.streams, min(args.new_tokens, 64), rounds=max(2, args.repeats // 2))
        print(f"(3) [{name}] HTTP streaming, {args.streams} concurrent clients ({latency['samples']} requests): "
              f"TTFT median {latency['ttft_median_ms']:.1f} ms, p99 {latency['ttft_p99_ms']:.1f} ms; "
              f"inter-token median {latency['itl_median_ms']:.1f} ms, p99 {latency['itl_p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
