"""The serving engine's key/value cache: one preallocated row ("slot") per running request.

All slots are allocated once, at start-up, for the longest context the engine serves, so a request
joining or leaving the batch never allocates or moves memory. Before a prefill pass the engine binds
the cache to the slots taking part and where each one's new tokens start; the model then calls
`update` once per layer (the `KVCache` protocol of `murmur.model`). Decode steps go through
`DecodeView`, which reads the same storage in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

from murmur.settings.model import ModelSettings


class SlotKVCache:
    """Keys and values for `num_slots` sequences of up to `max_len` positions each."""

    def __init__(self, settings: ModelSettings, num_slots: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (num_slots, settings.kv_heads, max_len, settings.attention_head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(settings.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(settings.n_layers)]
        self.max_len, self.device = max_len, device
        self._slots: Tensor | None = None
        self._rows: list[tuple[int, int]] = []  # (slot, start) per row, as Python ints: no device sync per layer
        self._contiguous: int | None = None
        self._end = 0
        self._mask: Tensor | None = None

    def bind(self, slots: list[int], starts: list[int], steps: int) -> Tensor:
        """Prepare a forward pass of `steps` new tokens for each of `slots`, written from `starts`.

        Returns the absolute positions (B, steps) to pass to the model.
        """
        self._slots = torch.tensor(slots, device=self.device)
        self._rows = list(zip(slots, starts))
        # Rows 0..B-1 in order are a view of the cache; any other set of slots needs a gather.
        self._contiguous = len(slots) if slots == list(range(len(slots))) else None
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(steps, device=self.device)[None]
        self._end = max(starts) + steps
        if self._end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this pass needs {self._end}")
        if len(slots) == 1 and starts[0] == 0:
            self._mask = None  # a fresh prefill: plain causal attention, the fastest kernel
        else:
            keys = torch.arange(self._end, device=self.device)
            # Query at position p sees keys 0..p of its own row; stale keys beyond are masked.
            self._mask = (keys[None, None, :] <= positions[:, :, None])[:, None]
        return positions

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        steps = k.shape[2]
        k_cache, v_cache = self.k[layer], self.v[layer]
        for row, (slot, start) in enumerate(self._rows):
            k_cache[slot, :, start:start + steps] = k[row]
            v_cache[slot, :, start:start + steps] = v[row]
        if self._contiguous is not None:
            n = self._contiguous
            return k_cache[:n, :, :self._end], v_cache[:n, :, :self._end], self._mask
        return (k_cache.index_select(0, self._slots)[:, :, :self._end],
                v_cache.index_select(0, self._slots)[:, :, :self._end], self._mask)

    def copy_in(self, slot: int, keys: list[Tensor], values: list[Tensor]) -> None:
        """Load saved keys/values (per layer, (kv_heads, L, head_dim)) into positions 0..L-1 of `slot`."""
        for layer, (k, v) in enumerate(zip(keys, values)):
            length = k.shape[1]
            self.k[layer][slot, :, :length] = k
            self.v[layer][slot, :, :length] = v

    def copy_out(self, slot: int, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """Keys/values of positions 0..length-1 of `slot`, per layer (copies)."""
        return ([k[slot, :, :length].clone() for k in self.k], [v[slot, :, :length].clone() for v in self.v])


class DecodeView:
    """The `KVCache` protocol over a SlotKVCache's storage for one decode step of slots 0..B-1, one token each.

    Row i of the batch is slot i, so the keys and values are read in place (a view, no gather). Written in
    tensor operations only, with no Python branching on values, so `torch.compile` captures a whole
    decode step as one graph whose shapes vary only in B and the attended length L.
    positions (B,): where each row's new token goes; mask (B, 1, 1, L): the positions each row attends to.
    """

    def __init__(self, cache: SlotKVCache, positions: Tensor, mask: Tensor):
        self.cache, self.positions, self.mask = cache, positions, mask
        self.rows = torch.arange(positions.shape[0], device=positions.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache[self.rows, :, self.positions] = k[:, :, 0]
        v_cache[self.rows, :, self.positions] = v[:, :, 0]
        batch, length = self.positions.shape[0], self.mask.shape[-1]
        return k_cache[:batch, :, :length], v_cache[:batch, :, :length], self.mask
