"""Log-probabilities of token sequences under a model, batched: the one engine every metric uses.

Two shapes of work:
- `sequence_logprobs`: many independent sequences (posts for bits per byte, lm-eval requests),
  sorted by length and right-padded, since a causal model never looks at the padding after a token.
- `continuation_logprobs`: many continuations of one shared prefix (the 20 candidate replies of one
  context, the random secrets of one canary). The prefix runs once; its keys and values are shared
  by every continuation through `SharedPrefixCache`, so a context is paid for once, not 20 times.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from murmur.model import DenseKVCache, Transformer


def model_device(model: Transformer) -> torch.device:
    """The device the model's weights live on."""
    return model.embed_tokens.weight.device


def _gather_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) at each position, computed in float32 (B, T, V) x (B, T) -> (B, T)."""
    # Flattened rows: cross_entropy over a transposed (B, V, T) view is several times slower on CPU.
    batch, steps, vocab = logits.shape
    return -F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none").view(batch, steps)


def sequence_logprobs(model: Transformer, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                      batch_size: int = 32) -> list[np.ndarray]:
    """For each sequence, log p(token i | tokens < i) for every i >= score_from (score_from >= 1).

    Each sequence must fit the model's context (max_seq_len). Returns float64 arrays in input order.
    """
    return [lp for lp, _ in scored_sequences(model, sequences, score_from, batch_size)]


@torch.no_grad()
def scored_sequences(model: Transformer, sequences: Sequence[Sequence[int]], score_from: Sequence[int],
                     batch_size: int = 32) -> list[tuple[np.ndarray, bool]]:
    """`sequence_logprobs` plus, per sequence, whether every scored token was the model's top choice
    (what lm-eval calls is_greedy)."""
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[tuple[np.ndarray, bool] | None] = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
        batch = batch.to(device)
        logits = model(batch[:, :-1])
        logp = _gather_logprobs(logits, batch[:, 1:]).double().cpu().numpy()
        top = (logits.argmax(-1) == batch[:, 1:]).cpu().numpy()
        for row, i in enumerate(idx):
            first = score_from[i]
            if first < 1:
                raise ValueError("score_from must be at least 1: the first token has nothing to be predicted from")
            span = slice(first - 1, len(sequences[i]) - 1)
            out[i] = (logp[row, span], bool(top[row, span].all()))
    return out  # type: ignore[return-value]


class SharedPrefixCache:
    """A KV cache whose first positions (one prefix) are shared by a whole batch of continuations.

    Implements `murmur.model.KVCache`: keys/values of the prefix are broadcast over the batch
    (no copy), the continuation attends to all of the prefix and causally to itself.
    """

    def __init__(self, prefix: DenseKVCache):
        self.k = [k[:, :, :prefix.length] for k in prefix.k]
        self.v = [v[:, :, :prefix.length] for v in prefix.v]
        self.length = prefix.length  # continuation positions start right after the prefix

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        batch, steps = k.shape[0], k.shape[2]
        keys = torch.cat((self.k[layer].expand(batch, -1, -1, -1), k), dim=2)
        values = torch.cat((self.v[layer].expand(batch, -1, -1, -1), v), dim=2)
        mask = torch.ones(steps, self.length + steps, dtype=torch.bool, device=k.device).tril(self.length)
        return keys, values, mask[None, None]


@torch.no_grad()
def continuation_logprobs(model: Transformer, prefix: Sequence[int], continuations: Sequence[Sequence[int]],
                          batch_size: int = 32) -> list[np.ndarray]:
    """For each continuation c, log p(c_j | prefix, c_<j) for every j. The prefix must be non-empty.

    prefix + the longest continuation must fit the model's context.
    """
    if not prefix:
        raise ValueError("continuation_logprobs needs a non-empty prefix (start with <|endoftext|>)")
    device = model_device(model)
    dtype = model.embed_tokens.weight.dtype
    dense = DenseKVCache(model.settings, 1, len(prefix), device=device, dtype=dtype)
    prefix_logits = model(torch.tensor([list(prefix)], device=device), cache=dense)[0, -1].float()
    first_logp = torch.log_softmax(prefix_logits, dim=-1).double().cpu().numpy()
    shared = SharedPrefixCache(dense)
    out: list[np.ndarray] = [np.zeros(0)] * len(continuations)
    for chunk in _length_chunks(continuations, batch_size):
        width = max(len(continuations[i]) for i in chunk)
        if width == 0:
            continue
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, :len(continuations[i])] = torch.tensor(list(continuations[i]), dtype=torch.long)
        batch = batch.to(device)
        rest = _gather_logprobs(model(batch[:, :-1], cache=shared), batch[:, 1:]).double().cpu().numpy() \
            if width > 1 else np.zeros((len(chunk), 0))
        for row, i in enumerate(chunk):
            cont = continuations[i]
            if cont:
                out[i] = np.concatenate(([first_logp[cont[0]]], rest[row, :len(cont) - 1]))
    return out


def _length_chunks(sequences: Sequence[Sequence[int]], batch_size: int, max_padding: float = 0.25
                   ) -> list[list[int]]:
    """Indices of `sequences` grouped by length into batches of at most `batch_size`, a new batch starting
    when padding would exceed `max_padding` of the batch: candidate replies vary a lot in length, and a
    padded token costs as much as a real one."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    chunks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        width = len(sequences[i])  # the longest so far: the order is ascending
        if current and (len(current) >= batch_size or (len(current) + 1) * width > (1 + max_padding) * (
                real + width) + 4):
            chunks.append(current)
            current, real = [], 0
        current.append(i)
        real += width
    if current:
        chunks.append(current)
    return chunks
