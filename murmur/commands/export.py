"""`murmur export SRC --out DIR`: write a Hugging Face directory from a Murmur checkpoint or HF directory."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a Hugging Face model directory (config.json, safetensors, "
                              "tokenizer)", description=__doc__)
    p.add_argument("src", help="a Murmur run folder or checkpoint, or a Hugging Face model directory")
    p.add_argument("--out", required=True, help="the directory to write (replaced atomically)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="store weights in this dtype (default: as loaded, float32)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="split weights into shards of this size")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from murmur.errors import MurmurError
    from murmur.hf import save_hf_model, special_token_ids
    from murmur.source import load_model

    if args.max_shard_gb <= 0:
        raise MurmurError("--max-shard-gb must be positive")
    loaded = load_model(args.src)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    special = special_token_ids(loaded.tokenizer_dir)
    out = save_hf_model(loaded.model, args.out, tokenizer_dir=loaded.tokenizer_dir, special_tokens=special,
                        max_shard_bytes=int(args.max_shard_gb * 2**30), dtype=dtype)
    print(f"exported {loaded.path} -> {out}")
    return 0

