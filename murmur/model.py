"""The decoder-only transformer, weight-compatible with Hugging Face Llama, Mistral, Qwen2 and Qwen3.

Parameter names match Hugging Face's (without the leading `model.`), so import and export are
renames at most. The module knows nothing of parallelism, checkpoints or serving: those wrap it
from outside. The inference engine reuses `forward` unchanged through `positions` and a `KVCache`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from murmur.settings.model import ModelSettings


class KVCache(Protocol):
    """Storage for attention keys and values across calls (implemented by the inference engine)."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store this call's keys/values (B, n_kv_heads, T, head_dim) for `layer`.

        Returns the keys and values to attend to (B, n_kv_heads, S, head_dim) and a boolean mask
        (B, 1, T, S), True where a query may attend to a key; None means plain causal attention.
        """


class DenseKVCache:
    """A preallocated contiguous cache for a batch of sequences that advance together.

    The simplest correct cache: used by `generate` and tests. The serving engine has its own
    slot-based cache with per-sequence lengths.
    """

    def __init__(self, settings: ModelSettings, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, settings.kv_heads, max_len, settings.attention_head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(settings.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(settings.n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        start, steps = self.length, k.shape[2]
        end = start + steps
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this call needs {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if layer == len(self.k) - 1:
            self.length = end
        # Query i (absolute position start+i) sees keys 0..start+i.
        mask = torch.ones(steps, end, dtype=torch.bool, device=k.device).tril(diagonal=start)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask[None, None]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One fused kernel instead of five element-wise ops; the weight is applied after the cast, as in HF.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_frequencies(settings: ModelSettings) -> Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3 or linear scaling applied."""
    head_dim = settings.attention_head_dim
    inv_freq = 1.0 / (settings.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaling = settings.rope_scaling
    if scaling is None:
        return inv_freq.float()
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).float()
    # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend in between.
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) by angles given as cos/sin of shape (B, 1, T, D), half-split layout (HF's)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention, with optional QK-norm."""

    def __init__(self, settings: ModelSettings, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = settings.n_heads, settings.kv_heads
        self.head_dim = settings.attention_head_dim
        bias = settings.attn_bias
        self.q_proj = nn.Linear(settings.dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(settings.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(settings.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, settings.dim, bias=False)
        if settings.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, settings.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, settings.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_heads != self.n_kv_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v, mask = cache.update(self.layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, settings: ModelSettings):
        super().__init__()
        hidden = settings.hidden_dim
        self.gate_proj = nn.Linear(settings.dim, hidden, bias=False)
        self.up_proj = nn.Linear(settings.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, settings.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, settings: ModelSettings, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(settings.dim, settings.norm_eps)
        self.self_attn = Attention(settings, layer)
        self.post_attention_layernorm = RMSNorm(settings.dim, settings.norm_eps)
        self.mlp = MLP(settings)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The language model: token ids in, next-token logits out."""

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        self.embed_tokens = nn.Embedding(settings.vocab_size, settings.dim)
        self.layers = nn.ModuleList(Block(settings, i) for i in range(settings.n_layers))
        self.norm = RMSNorm(settings.dim, settings.norm_eps)
        self.lm_head = nn.Linear(settings.dim, settings.vocab_size, bias=False)
        if settings.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Not saved with the weights: derived from the settings, rebuilt by init_rope().
        self.register_buffer("inv_freq", rope_frequencies(settings), persistent=False)
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    def blocks(self) -> list[Block]:
        """The blocks in order. `layers` is a ModuleList, or a ModuleDict keyed by layer index when the model
        was cut into parts that keep the blocks' names (e.g. the stages of a pipeline)."""
        return list(self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers)

    def init_rope(self) -> None:
        """Recompute the rotary frequencies (after the model was materialised from the meta device)."""
        self.inv_freq = rope_frequencies(self.settings).to(self.inv_freq.device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for matrices; residual outputs scaled by 1/sqrt(2 * n_layers) (GPT-2);
        norms at one, biases at zero. Callable again after `to_empty()` on a sharded meta model."""
        # A part of the model (see `forward`) may lack the embedding, the final norm or the head.
        embed, head = self.embed_tokens, self.lm_head
        if self.settings.tie_embeddings and embed is not None and head is not None and head.weight is not embed.weight:
            head.weight = embed.weight  # to_empty() unties shared parameters
        std = self.settings.init_std
        residual_std = std / math.sqrt(2 * self.settings.n_layers)
        if embed is not None:
            nn.init.normal_(embed.weight, std=std)
        for block in self.blocks():
            attn, mlp = block.self_attn, block.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for lin in (attn.o_proj, mlp.down_proj):
                nn.init.normal_(lin.weight, std=residual_std)
            for norm in (block.input_layernorm, block.post_attention_layernorm, attn.q_norm, attn.k_norm):
                if norm is not None:
                    norm.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()
        if head is not None and not self.settings.tie_embeddings:
            nn.init.normal_(head.weight, std=std)
        self.init_rope()

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of shape (B, 1, T, head_dim) for absolute positions (B, T)."""
        angles = positions[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        positions: absolute positions (B, T); default 0..T-1, or continuing after the cache.
        cache: keys/values from earlier calls; this call's are appended.
        return_hidden: return the final normed hidden states instead of logits (for chunked losses).

        A part of the model whose `embed_tokens` is None takes hidden states (B, T, dim) instead of ids,
        and one whose `norm` and `lm_head` are None returns its blocks' hidden states.
        """
        x = tokens if self.embed_tokens is None else self.embed_tokens(tokens)
        B, T = x.shape[:2]
        if positions is None:
            start = getattr(cache, "length", 0) if cache is not None else 0
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = self.rope(positions, x.dtype)
        for block in self.blocks():
            x = block(x, cos, sin, cache)
        if self.norm is not None:
            x = self.norm(x)
        return x if return_hidden or self.lm_head is None else self.lm_head(x)


def count_params(settings: ModelSettings, embeddings: bool = True) -> int:
    """Number of parameters of the model these settings describe, without building it.

    embeddings=False leaves out the input embedding table (and the output head when it is tied),
    which is the N of the 6N FLOPs-per-token rule.
    """
    d, hd = settings.dim, settings.attention_head_dim
    q, kv = settings.n_heads * hd, settings.kv_heads * hd
    attn = d * q + 2 * d * kv + q * d
    if settings.attn_bias:
        attn += q + 2 * kv
    if settings.qk_norm:
        attn += 2 * hd
    mlp = 3 * d * settings.hidden_dim
    per_layer = attn + mlp + 2 * d
    total = settings.n_layers * per_layer + d
    head = settings.vocab_size * d
    if embeddings:
        total += head if settings.tie_embeddings else 2 * head
    elif not settings.tie_embeddings:
        total += head  # the untied output head is a matmul every token pays for
    return total


def flops_per_token(settings: ModelSettings, seq_len: int | None = None, training: bool = True) -> float:
    """Model FLOPs per token: 6N (2N forward + 4N backward) plus attention scores (PaLM appendix B).

    N counts the matmul weights (the output head included, the embedding lookup not).
    Attention adds 12 * n_layers * n_heads * head_dim * seq_len for a training token
    (QK^T and AV, forward and backward, without discounting the causal half, as PaLM and nanochat).
    training=False gives the forward-only cost, a third of it.
    """
    seq_len = seq_len or settings.max_seq_len
    n = count_params(settings, embeddings=False)
    if settings.tie_embeddings:
        n += settings.vocab_size * settings.dim  # tied head is still a matmul
    attention = 12 * settings.n_layers * settings.n_heads * settings.attention_head_dim * seq_len
    total = 6 * n + attention
    return total if training else total / 3


@torch.no_grad()
def generate_greedy(model: Transformer, tokens: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation with a dense cache: the reference decoder for tests and quick checks."""
    device = model.embed_tokens.weight.device
    cache = DenseKVCache(model.settings, 1, len(tokens) + max_new_tokens, device=device,
                         dtype=model.embed_tokens.weight.dtype)
    logits = model(torch.tensor([tokens], device=device), cache=cache)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)
    return out
