"""`murmur export SRC --out DIR`: write a Hugging Face directory, or with `--format gguf` a GGUF file and an
Ollama Modelfile, from a Murmur checkpoint, a Hugging Face directory or a GGUF."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a Hugging Face model directory (config.json, safetensors, "
                              "tokenizer) or a GGUF for llama.cpp / Ollama", description=__doc__)
    p.add_argument("src", help="a Murmur run folder or checkpoint, a Hugging Face model directory, or a GGUF "
                   "(gguf:PATH or a short name such as smollm2-135m-instruct)")
    p.add_argument("--out", required=True, help="the directory to write (replaced atomically)")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a Hugging Face directory (default); gguf: DIR/model-QUANT.gguf and DIR/Modelfile")
    p.add_argument("--quant", choices=["f32", "f16", "q8_0"], default=None,
                   help="GGUF weight type (default f16; norms stay f32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="Hugging Face format: store weights in this dtype (default: as loaded, float32)")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="Hugging Face format: split weights into shards of this size")
    p.add_argument("--adapter", action="store_true",
                   help="LoRA runs: write only the adapters as a PEFT folder (adapter_config.json, "
                   "adapter_model.safetensors) instead of the model with the adapters merged in")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from murmur.errors import MurmurError
    from murmur.export import export_adapter, export_gguf, export_hf

    if args.adapter:
        if args.format != "hf" or args.dtype is not None or args.quant is not None:
            raise MurmurError("--adapter writes a PEFT folder (float32 adapters); leave out --format, --dtype "
                              "and --quant")
        print(f"exported the LoRA adapters of {args.src} -> {export_adapter(args.src, args.out)}")
        return 0
    if args.format == "gguf":
        if args.dtype is not None:
            raise MurmurError("--dtype is for --format hf; a GGUF's weight type is --quant f32|f16|q8_0")
        out = export_gguf(args.src, args.out, quant=args.quant or "f16")
        print(f"exported {args.src} -> {out} (and {out.parent / 'Modelfile'}: ollama create NAME -f "
              f"{out.parent / 'Modelfile'})")
        return 0
    if args.quant is not None:
        raise MurmurError("--quant is for --format gguf; a Hugging Face export takes --dtype")
    if args.max_shard_gb <= 0:
        raise MurmurError("--max-shard-gb must be positive")
    out = export_hf(args.src, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"exported {args.src} -> {out}")
    return 0
