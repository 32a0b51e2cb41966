"""The serving engine's key/value cache: one preallocated row ("slot") per running request.

All slots are allocated once, at start-up, for the longest context the engine serves, so a request
joining or leaving the batch never allocates or moves memory. Before a prefill pass the engine binds
the cache to the slots taking part and where each one's new tokens start; the model then calls
`update` once per layer (the `KVCache` protocol of `murmur.model`). Decode steps go through
`DecodeView`, which reads the same storage in place.

How large it may be is decided before anything is allocated (`plan_cache`): a model's config can claim
any context (1,000,000 positions is a few bytes of JSON), so the cache is fitted to a budget taken from
the settings or from the memory free at start-up, never to the config alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from murmur.errors import MurmurError
from murmur.settings.model import ModelSettings

# Cutting the context to fit the budget stops here; below it the batch gives way instead, since a few
# requests with a useful context serve better than many that can hold only a line or two.
MIN_SHRUNK_CONTEXT = 2048
# When the free memory cannot be read (no /proc, no sysconf figure): a budget small enough for any host.
FALLBACK_MEMORY_BYTES = 2 * 2**30


def bytes_per_position(settings: ModelSettings, dtype: torch.dtype) -> int:
    """Bytes of keys and values one position of one sequence takes, over all layers."""
    return 2 * settings.n_layers * settings.kv_heads * settings.attention_head_dim * dtype.itemsize


def available_memory(device: torch.device, meminfo: str | Path = "/proc/meminfo") -> int:
    """Bytes free for new allocations on `device`: free device memory on CUDA, else the system's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY_BYTES


@dataclass(frozen=True)
class CachePlan:
    """What the KV cache holds and why: `max_batch_size` slots of `max_seq_len` positions, `bytes` of keys and
    values in all, and `state_bytes` of per-slot sampler state counted in the same budget."""

    max_batch_size: int
    max_seq_len: int
    bytes: int
    budget: int
    shrunk: bool
    reason: str
    state_bytes: int = 0

    def describe(self) -> str:
        return (f"KV cache: max_batch_size={self.max_batch_size} max_seq_len={self.max_seq_len} "
                f"{self.bytes:,} bytes (+ {self.state_bytes:,} of sampler state) of a {self.budget:,}-byte "
                f"budget; {self.reason}")


def plan_cache(settings: ModelSettings, dtype: torch.dtype, *, max_batch_size: int, max_seq_len: int | None = None,
               budget_bytes: int | None = None, memory_fraction: float = 0.5,
               device: torch.device | None = None, reserve_slots: int = 0, slot_state_bytes: int = 0) -> CachePlan:
    """Choose the slots and context of the KV cache so that it fits its budget.

    The context is the model's, or `max_seq_len` when that is set and smaller. The budget is `budget_bytes`,
    else `memory_fraction` of the memory free on `device`; `reserve_slots` more slots' worth of it is kept for
    memory sized like a slot (the prefix store), and each slot also costs `slot_state_bytes` (the sampler's rows
    over the vocabulary: with a 256k vocabulary they outweigh a short context's keys and values). When the cache
    does not fit, a context the operator did not ask for is cut first, down to MIN_SHRUNK_CONTEXT positions, then
    the batch; when one slot does not fit either, the error says which setting to change.
    """
    if budget_bytes is None and not 0 < memory_fraction <= 1:
        raise MurmurError(f"serve.kv_cache_memory_fraction must be in (0, 1], got {memory_fraction}")
    per_position = bytes_per_position(settings, dtype)
    model_len = settings.max_seq_len
    asked = max_seq_len is not None and max_seq_len < model_len
    length = min(max_seq_len or model_len, model_len)
    if budget_bytes is not None:
        budget, source = budget_bytes, "serve.kv_cache_bytes"
    else:
        free = available_memory(device or torch.device("cpu"))
        budget = int(free * memory_fraction)
        source = f"serve.kv_cache_memory_fraction={memory_fraction:g} of {free:,} bytes free"
    batch = max_batch_size

    def fits(slots: int, positions: int) -> bool:
        return (slots + reserve_slots) * positions * per_position + slots * slot_state_bytes <= budget

    reasons = []
    if not fits(batch, length) and not asked:
        cut = max(min(model_len, MIN_SHRUNK_CONTEXT),
                  (budget - batch * slot_state_bytes) // ((batch + reserve_slots) * per_position))
        reasons.append(f"the model's context of {model_len:,} positions cut to {min(cut, length):,}")
        length = min(cut, length)
    if not fits(batch, length):
        batch = (budget - reserve_slots * length * per_position) // (length * per_position + slot_state_bytes)
        if batch < 1:
            need = (1 + reserve_slots) * length * per_position + slot_state_bytes
            raise MurmurError(
                f"the KV cache budget ({budget:,} bytes, from {source}) cannot hold one request of {length:,} "
                f"positions ({need:,} bytes); raise serve.kv_cache_memory_fraction or set serve.kv_cache_bytes, "
                "lower serve.max_seq_len, or free memory")
        reasons.append(f"max_batch_size {max_batch_size} cut to {batch}")
    if reasons:
        reason = " and ".join(reasons) + f" to fit the budget ({source})"
    else:
        whose = "the asked-for" if asked else "the model's"
        reason = f"{whose} context at max_batch_size {batch} fits ({source})"
    return CachePlan(batch, length, batch * length * per_position, budget, bool(reasons), reason,
                     batch * slot_state_bytes)


class SlotKVCache:
    """Keys and values for `num_slots` sequences of up to `max_len` positions each."""

    def __init__(self, settings: ModelSettings, num_slots: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (2, num_slots, settings.kv_heads, max_len, settings.attention_head_dim)
        # A layer's keys and values in one tensor, so a decode step writes both in one index_copy_
        # (murmur/infer/decode.py); k[layer] and v[layer] are its two halves.
        self.kv = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(settings.n_layers)]
        self.k = [kv[0] for kv in self.kv]
        self.v = [kv[1] for kv in self.kv]
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
