"""A Llama-style shape for a parameter count, when the user gives a size rather than a preset.

The rule follows the Llama 3 family (8B, 70B, 405B): head_dim 128, 8 key-value heads, SwiGLU width
3.5 x dim rounded to 256, an untied 128,256-token vocabulary, and about 128 model dims per layer
(4096/32, 8192/80, 16384/126). Parameters are counted by murmur.model.count_params.
"""

from __future__ import annotations

import math

from murmur.errors import MurmurError
from murmur.settings.model import ModelSettings

HEAD_DIM = 128
DIMS_PER_LAYER = 128
LLAMA3_VOCAB = 128_256


def llama_shape(dim: int, n_layers: int, vocab_size: int, max_seq_len: int) -> ModelSettings:
    """Llama 3's proportions at width `dim` (a multiple of 128) and depth `n_layers`."""
    n_heads = dim // HEAD_DIM
    ffn = 256 * round(3.5 * dim / 256)
    return ModelSettings(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                         n_kv_heads=min(8, n_heads) if n_heads % min(8, n_heads) == 0 else n_heads,
                         ffn_dim=ffn, max_seq_len=max_seq_len, rope_theta=500000.0, tie_embeddings=False)


def shape_for_params(params: float, vocab_size: int = LLAMA3_VOCAB, max_seq_len: int = 8192) -> ModelSettings:
    """The Llama-style shape whose parameter count is closest to `params`, at about 128 dims per layer."""
    from murmur.model import count_params

    if params < 1e6:
        raise MurmurError(f"--params {params:g} is too small for a transformer; give at least 1M (e.g. 124M, 8B)")
    options: list[tuple[float, float, ModelSettings]] = []  # (relative error, aspect distance, shape)
    dim = HEAD_DIM
    while dim <= 65536:
        one = count_params(llama_shape(dim, 1, vocab_size, max_seq_len))
        two = count_params(llama_shape(dim, 2, vocab_size, max_seq_len))
        per_layer, fixed = two - one, 2 * one - two
        layers = round((params - fixed) / per_layer)
        if layers >= 1:
            shape = llama_shape(dim, layers, vocab_size, max_seq_len)
            error = abs(count_params(shape) - params) / params
            options.append((error, abs(math.log2(dim / layers / DIMS_PER_LAYER)), shape))
        dim += HEAD_DIM if dim < 1024 else 1024  # 8 | n_heads from 1024 on, so tp up to 8 divides
    if not options:
        raise MurmurError(f"no Llama-style shape has about {params:.3g} parameters; pass the shape flags instead")
    # Within 2% of the count, the most Llama-like proportions; else the closest count.
    close = [o for o in options if o[0] <= 0.02]
    return min(close, key=lambda o: o[1])[2] if close else min(options, key=lambda o: o[0])[2]
