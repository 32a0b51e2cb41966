"""`murmur model info SRC`: shape, parameter count and FLOPs per token of a model."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("model", help="inspect a model", description=__doc__)
    sub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    info = sub.add_parser("info", help="shape, parameters and FLOPs per token of a model or preset")
    info.add_argument("src", help="a Hugging Face model directory, a Murmur run/checkpoint, a GGUF (gguf:PATH or a "
                      "short name such as smollm2-135m-instruct), or preset:NAME")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    import json

    from murmur.errors import MurmurError
    from murmur.model import count_params, flops_per_token
    from murmur.settings.model import MODEL_PRESETS, ModelSettings

    stored: dict[str, int] = {}
    if args.src.startswith("preset:"):
        name = args.src.removeprefix("preset:")
        if name not in MODEL_PRESETS:
            raise MurmurError(f"unknown preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}")
        settings, where = ModelSettings(preset=name), f"preset {name}"
    else:
        from murmur.source import resolve_source

        source = resolve_source(args.src)  # the settings alone: no weight is read
        settings, where = source.settings, f"{source.path} ({source.origin})"
        if source.kind == "gguf":
            stored = _gguf_storage(source.path)
    info = {
        "source": where,
        "settings": settings.model_dump(mode="json"),
        "parameters": count_params(settings),
        "non_embedding_parameters": count_params(settings, embeddings=False),
        "train_flops_per_token": flops_per_token(settings),
    }
    if stored:
        info["stored_as"] = stored
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    s = settings
    print(f"{where}")
    print(f"  shape        dim {s.dim}, {s.n_layers} layers, {s.n_heads} heads ({s.kv_heads} kv, head_dim "
          f"{s.attention_head_dim}), ffn {s.hidden_dim}, vocab {s.vocab_size}, context {s.max_seq_len}")
    print(f"  features     rope theta {s.rope_theta:g}{', ' + s.rope_scaling.type + ' scaling' if s.rope_scaling else ''}"
          f"{', qk-norm' if s.qk_norm else ''}{', qkv bias' if s.attn_bias else ''}, "
          f"{'tied' if s.tie_embeddings else 'untied'} embeddings")
    print(f"  parameters   {info['parameters']:,} ({info['non_embedding_parameters']:,} without embeddings)")
    print(f"  FLOPs/token  {info['train_flops_per_token']:.3e} (training, at context {s.max_seq_len})")
    if stored:
        print(f"  stored as    {', '.join(f'{n} {kind}' for kind, n in stored.items())} tensors (GGUF; loaded "
              "as float32)")
    return 0


def _gguf_storage(path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF holds, most common first."""
    from collections import Counter

    from murmur.gguf.reader import GGUFFile

    return dict(Counter(info.type_name for info in GGUFFile(path).tensors.values()).most_common())
