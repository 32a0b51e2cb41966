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
    from murmur.hf import save_hf_model
    from murmur.source import load_model

    if args.max_shard_gb <= 0:
        raise MurmurError("--max-shard-gb must be positive")
    loaded = load_model(args.src)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    special = _special_token_ids(loaded.tokenizer_dir)
    out = save_hf_model(loaded.model, args.out, tokenizer_dir=loaded.tokenizer_dir, special_tokens=special,
                        max_shard_bytes=int(args.max_shard_gb * 2**30), dtype=dtype)
    print(f"exported {loaded.path} -> {out}")
    return 0


def _special_token_ids(tokenizer_dir) -> dict[str, int]:
    """bos/eos/pad ids for config.json, read from tokenizer_config.json when there is one."""
    import json
    from pathlib import Path

    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        return {}
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    vocab = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text()).get("added_tokens", [])
    ids = {t["content"]: t["id"] for t in vocab}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token in ids:
            out[f"{key}_id"] = ids[token]
    return out
