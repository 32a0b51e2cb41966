"""Model FLOPs utilisation of `murmur train` on GPUs: the 1b preset in bf16 with torch.compile.

    python bench/gpu_mfu.py [--preset 1b] [--steps 300] [--seq 2048] [--batch 8] [--no-compile] [--ac]
    torchrun --nproc-per-node 8 bench/gpu_mfu.py --out /tmp/mfu     # FSDP2 over 8 GPUs

Trains on random tokens (the speed does not depend on what the tokens say) through the real trainer:
loader, FSDP2 when several GPUs, fused AdamW, clipping, logging. MFU = achieved model FLOP/s per GPU
(6N + attention, from murmur.model.flops_per_token) / the GPU's dense bf16 peak from
murmur/train/metrics.py; an unknown GPU gets achieved TFLOP/s only. Prints the median over the
intervals after the first 20% of steps (compilation and warm-up excluded). Needs CUDA: without it, it
says so and exits with status 1.
"""

from __future__ import annotations

import os
import sys

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--interval", type=int, default=10, help="steps per logged interval")
    parser.add_argument("--no-compile", action="store_true", help="eager mode instead of torch.compile")
    parser.add_argument("--ac", action="store_true", help="full activation checkpointing (for larger batches)")
    parser.add_argument("--out", default=None, help="keep the run folder here (default: a temporary folder)")
    args = parser.parse_args()

    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("gpu_mfu: no CUDA device is visible (torch.cuda.is_available() is False); this benchmark measures "
              "GPU utilisation and needs an NVIDIA GPU with a CUDA build of PyTorch", file=sys.stderr)
        return 1

    from murmur.config import settings_from_dict
    from murmur.shards import write_shards
    from murmur.train.metrics import peak_flops
    from murmur.train.trainer import run_stage

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.out is None:
        print("gpu_mfu: under torchrun pass --out DIR, a folder every process sees", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.out or tmp)
        tokens = run / "tokens"
        recipe = {
            "run": {"dir": str(run)}, "model": {"preset": args.preset},
            "train": {"device": "cuda", "dtype": "bfloat16", "compile": not args.no_compile,
                      "activation_checkpointing": "full" if args.ac else "none", "seq_len": args.seq,
                      "micro_batch_size": args.batch, "steps": args.steps, "log_interval": args.interval,
                      "eval_interval": 10**9, "checkpoint_interval": 10**9, "warmup_steps": 10, "lr": 3e-4,
                      "keep_checkpoints": 1},
        }
        settings = settings_from_dict(recipe)
        if rank == 0 and not (tokens / "manifest.json").is_file():
            # Enough random tokens for several distinct batches per rank; the loader loops over them.
            rng = np.random.default_rng(0)
            need = args.seq * args.batch * world * 8 + 1
            docs = (rng.integers(1, settings.model.vocab_size, size=4096, dtype=np.int64) for _ in
                    range(need // 4096 + 1))
            write_shards(tokens, docs, vocab_size=settings.model.vocab_size, split="train", boundary_id=0)
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group("cpu:gloo,cuda:nccl",
                                    device_id=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
            dist.barrier()
        run_stage(settings, run, "pretrain", overwrite=True)
        if rank != 0:
            return 0
        records = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r.get("loss") is not None]
        steady = [r for r in train if r["step"] > args.steps // 5] or train[-1:]
        peak, name = peak_flops(torch.device("cuda", 0))
        tps = statistics.median(r["tokens_per_sec"] for r in steady)
        tflops = statistics.median(r["gflops_per_sec"] for r in steady) / 1e3
        print(f"gpu:        {name} × {world}")
        print(f"model:      {args.preset}, seq {args.seq}, {args.batch} seqs/GPU, bf16, "
              f"compile {not args.no_compile}, activation checkpointing {args.ac}")
        print(f"throughput: {tps:,.0f} tokens/s ({tps / world:,.0f} per GPU), {tflops:.1f} TFLOP/s per GPU")
        print(f"memory:     {max(r.get('memory_gb', 0) for r in train):.1f} GiB peak allocated")
        if peak is None:
            print(f"MFU:        unknown: '{name}' is not in the peak FLOP/s table in murmur/train/metrics.py")
        else:
            print(f"MFU:        {100 * tflops * 1e12 / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 dense peak "
                  f"(median over steps {steady[0]['step']}-{steady[-1]['step']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
