"""How a Llama is laid out in GGUF: metadata keys for its shape, tensor names, and llama.cpp's q/k row order.

Both directions live here, so import and export cannot disagree: `settings_from_metadata` /
`metadata_from_settings`, `murmur_name` / `gguf_name`, `unpermute_qk` / `permute_qk`.

llama.cpp rotates adjacent pairs of a head's dimensions; Hugging Face (and Murmur) rotate the first half
against the second. llama.cpp's converter reorders the rows of the q and k projections to match
(`permute` in convert_hf_to_gguf.py); `unpermute_qk` restores Murmur's order.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from murmur.errors import MurmurError
from murmur.settings.model import ModelSettings, RopeScaling

ARCHITECTURE = "llama"

TOP_LEVEL = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}
IN_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling, as per-frequency divisors
_BLOCK_NAME = re.compile(r"blk\.(\d{1,6})\.([a-z_]+)\.weight")
_MURMUR_BLOCK = {value: key for key, value in IN_BLOCK.items()}
_LARGEST = 2**31 - 1

# The Llama 3.1 scaling constants llama.cpp's converter bakes into rope_freqs; only the factor differs between
# releases (8 for 3.1, 32 for 3.2). The importer checks the tensor against what these give.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}


def murmur_name(name: str) -> str | None:
    """Murmur's parameter name for a GGUF tensor name, or None when it is not one of a Llama's weights."""
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    match = _BLOCK_NAME.fullmatch(name)
    if match and match.group(2) in IN_BLOCK:
        return f"layers.{int(match.group(1))}.{IN_BLOCK[match.group(2)]}.weight"
    return None


def gguf_name(name: str) -> str:
    """The GGUF tensor name for one of Murmur's parameter names."""
    for gguf, murmur in TOP_LEVEL.items():
        if name == murmur:
            return gguf
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_MURMUR_BLOCK[rest.removesuffix('.weight')]}.weight"


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Murmur's q or k rows (half-split rotary layout) in llama.cpp's order (interleaved pairs)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `permute_qk`: llama.cpp's q or k rows back in Murmur's order."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def expected_shapes(settings: ModelSettings) -> dict[str, tuple[int, ...]]:
    """The shape of every GGUF tensor of a Llama with these settings, computed without building the model."""
    d, hd, f, v = settings.dim, settings.attention_head_dim, settings.hidden_dim, settings.vocab_size
    q, kv = settings.n_heads * hd, settings.kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    if not settings.tie_embeddings:
        shapes["output.weight"] = (v, d)
    per_block = {"attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
                 "ffn_norm": (d,), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    for layer in range(settings.n_layers):
        shapes.update({f"blk.{layer}.{part}.weight": shape for part, shape in per_block.items()})
    return shapes


def _number(metadata: dict[str, Any], key: str, source: str, default: Any = None, integer: bool = True) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise MurmurError(f"{source}: metadata {key} is missing; it is needed to rebuild the model")
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or not 0 < value <= _LARGEST:
        raise MurmurError(f"{source}: metadata {key} is {value!r:.60}; expected a positive "
                          f"{'integer' if integer else 'number'} up to {_LARGEST}")
    return value


def settings_from_metadata(metadata: dict[str, Any], tensor_names: set[str], source: str) -> ModelSettings:
    """ModelSettings of the Llama a GGUF describes (rope scaling from rope_freqs is added by the loader)."""
    arch = metadata.get("general.architecture")
    if arch != ARCHITECTURE:
        raise MurmurError(f"{source}: architecture {arch!r:.60} is not supported; Murmur imports GGUF models of "
                          f"the {ARCHITECTURE!r} architecture (Llama, SmolLM, Mistral 7B, TinyLlama and kin)")
    key = f"{arch}."
    n_heads = _number(metadata, key + "attention.head_count", source)
    dim = _number(metadata, key + "embedding_length", source)
    head_dim = _number(metadata, key + "attention.key_length", source, default=dim // n_heads or 1)
    if _number(metadata, key + "attention.value_length", source, default=head_dim) != head_dim:
        raise MurmurError(f"{source}: attention.value_length differs from key_length; Murmur's attention needs "
                          "them equal")
    if _number(metadata, key + "rope.dimension_count", source, default=head_dim) != head_dim:
        raise MurmurError(f"{source}: rope.dimension_count is not the head size ({head_dim}); partial rotary "
                          "embeddings are not supported")
    scaling = None
    kind = metadata.get(key + "rope.scaling.type", "none")
    if kind == "linear":
        scaling = RopeScaling(type="linear", factor=_number(metadata, key + "rope.scaling.factor", source,
                                                            integer=False))
    elif kind != "none":
        raise MurmurError(f"{source}: rope scaling type {kind!r:.40} is not supported; supported: none, linear, "
                          "and Llama 3.1's (rope_freqs)")
    layers = {int(m.group(1)) for m in map(_BLOCK_NAME.fullmatch, tensor_names) if m}
    n_layers = _number(metadata, key + "block_count", source)
    if layers != set(range(n_layers)):
        raise MurmurError(f"{source}: metadata says block_count={n_layers}, the tensors hold {len(layers)} blocks")
    vocab = metadata.get(key + "vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ()) or None
    try:
        return ModelSettings(
            vocab_size=_number({"vocab": vocab}, "vocab", source), dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=_number(metadata, key + "attention.head_count_kv", source, default=n_heads),
            head_dim=head_dim,
            ffn_dim=_number(metadata, key + "feed_forward_length", source),
            max_seq_len=_number(metadata, key + "context_length", source, default=2048),
            rope_theta=_number(metadata, key + "rope.freq_base", source, default=10000.0, integer=False),
            rope_scaling=scaling,
            norm_eps=_number(metadata, key + "attention.layer_norm_rms_epsilon", source, default=1e-5,
                             integer=False),
            tie_embeddings="output.weight" not in tensor_names)
    except ValueError as err:
        raise MurmurError(f"{source}: inconsistent shape: {err}") from None


def llama3_scaling(divisors: torch.Tensor, settings: ModelSettings, source: str) -> RopeScaling:
    """The Llama 3.1 rope scaling whose per-frequency divisors are `divisors` (llama.cpp's rope_freqs)."""
    from murmur.model import rope_frequencies

    factor = float(divisors.max())
    scaling = RopeScaling(type="llama3", factor=factor, **_LLAMA3_DEFAULTS)
    plain = rope_frequencies(settings.model_copy(update={"rope_scaling": None}))
    wanted = plain / divisors.float()
    got = rope_frequencies(settings.model_copy(update={"rope_scaling": scaling}))
    if divisors.shape != plain.shape or not torch.allclose(got, wanted, rtol=1e-4, atol=0):
        raise MurmurError(f"{source}: rope_freqs holds rope scaling divisors that are not Llama 3.1's "
                          "(low 1, high 4, original context 8192); this scaling is not supported")
    return scaling


def llama3_divisors(settings: ModelSettings) -> torch.Tensor:
    """llama.cpp's rope_freqs for a Llama 3.1-scaled model: the plain frequencies over the scaled ones."""
    from murmur.model import rope_frequencies

    plain = rope_frequencies(settings.model_copy(update={"rope_scaling": None}))
    return (plain / rope_frequencies(settings)).float()


def metadata_from_settings(settings: ModelSettings) -> dict[str, Any]:
    """The llama.* keys for a model's shape, as llama.cpp's converter writes them (values as Python numbers)."""
    if settings.qk_norm or settings.attn_bias:
        raise MurmurError("this model has " + ("QK-norm (Qwen3)" if settings.qk_norm else "q/k/v biases (Qwen2)")
                          + "; Murmur's GGUF export writes the llama architecture only. Export a Hugging Face "
                          "directory and convert it with llama.cpp's convert_hf_to_gguf.py")
    key = f"{ARCHITECTURE}."
    out: dict[str, Any] = {
        key + "context_length": settings.max_seq_len, key + "embedding_length": settings.dim,
        key + "block_count": settings.n_layers, key + "feed_forward_length": settings.hidden_dim,
        key + "attention.head_count": settings.n_heads, key + "attention.head_count_kv": settings.kv_heads,
        key + "rope.freq_base": float(settings.rope_theta),
        key + "attention.layer_norm_rms_epsilon": float(settings.norm_eps),
        key + "rope.dimension_count": settings.attention_head_dim, key + "vocab_size": settings.vocab_size,
    }
    if settings.attention_head_dim * settings.n_heads != settings.dim:
        out[key + "attention.key_length"] = out[key + "attention.value_length"] = settings.attention_head_dim
    if settings.rope_scaling is not None and settings.rope_scaling.type == "linear":
        out[key + "rope.scaling.type"] = "linear"
        out[key + "rope.scaling.factor"] = float(settings.rope_scaling.factor)
    return out
