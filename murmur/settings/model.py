"""The shape of the transformer, and the named presets from a CPU toy to Llama 3 405B."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from murmur.settings.base import Section


class RopeScaling(Section):
    """Rotary-embedding frequency scaling. `llama3` is Llama 3.1's piecewise scaling; `linear` divides positions."""

    type: Literal["llama3", "linear"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_seq_len: int = Field(8192, gt=0)


class ModelSettings(Section):
    """A decoder-only transformer, weight-compatible with Hugging Face Llama / Mistral / Qwen2 / Qwen3."""

    preset: str | None = None
    base: str | None = Field(None, description="finetune this model instead of pretraining: a local Hugging Face "
                             "directory or hf:ORG/NAME (its shape and tokenizer are used)")
    vocab_size: int = Field(8192, gt=0)
    dim: int = Field(256, gt=0)
    n_layers: int = Field(6, gt=0)
    n_heads: int = Field(8, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    head_dim: int | None = Field(None, gt=0)
    ffn_dim: int | None = Field(None, gt=0)
    max_seq_len: int = Field(512, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    qk_norm: bool = False
    attn_bias: bool = False
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        # A preset supplies every field the user did not set; explicit keys win.
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in MODEL_PRESETS:
                raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}")
            return {**MODEL_PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelSettings":
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), or set head_dim")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.attention_head_dim % 2:
            raise ValueError(f"head_dim ({self.attention_head_dim}) must be even for rotary embeddings")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: explicit, or 8/3 of dim rounded up to a multiple of 256 (Llama's rule)."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        width = int(8 * self.dim / 3)
        return 256 * ((width + 255) // 256)


_LLAMA3_SCALING_8K = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_seq_len": 8192}

# Shapes of the presets. 1b, 8b, 70b and 405b are the published Llama 3.1 / 3.2 shapes.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-cpu": dict(vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=768,
                     max_seq_len=256, rope_theta=10000.0, tie_embeddings=True),
    "124m": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12, ffn_dim=2048,
                 max_seq_len=1024, rope_theta=10000.0, tie_embeddings=True),
    "1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
               max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True,
               rope_scaling={**_LLAMA3_SCALING_8K, "factor": 32.0}),
    "8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
               max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False, rope_scaling=_LLAMA3_SCALING_8K),
    "70b": dict(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False, rope_scaling=_LLAMA3_SCALING_8K),
    "405b": dict(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248,
                 max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False, rope_scaling=_LLAMA3_SCALING_8K),
}
