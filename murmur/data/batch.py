"""The per-batch step every executor runs: clean, filter, and fingerprint the posts of one batch.

It needs nothing but the batch and the settings, so batches run in any process, on any machine, in any
order; the result is a table of the surviving posts with the hashes the global step (dedup, deletions,
threads) works on, plus counts of everything dropped or quarantined.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa

from murmur.data.clean import Cleaner
from murmur.data.dedup import MinHasher, hash_normalised, normalised
from murmur.data.filters import PostFilter
from murmur.data.records import Post, Quarantined
from murmur.settings.data import DataSettings

NO_TIME = np.iinfo(np.int64).max  # posts without a time sort after all others ("earliest" means known-earliest)

SURVIVOR_SCHEMA = pa.schema([
    ("id", pa.string()), ("author_id", pa.string()), ("text", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("lang", pa.string()), ("conversation_id", pa.string()),
    ("in_reply_to_id", pa.string()), ("quoted_id", pa.string()), ("source", pa.string()), ("line", pa.int64()),
    # Hashes for the global step.
    ("id_hash", pa.uint64()), ("parent_hash", pa.uint64()), ("author_hash", pa.uint64()), ("exact", pa.uint64()),
    ("dedupable", pa.bool_()), ("time", pa.int64()),
])


def band_column(band: int) -> str:
    """LSH band keys are one column each, so the global step can read them a few bands at a time."""
    return f"band_{band:02d}"


def survivor_schema(bands: int) -> pa.Schema:
    return pa.schema(list(SURVIVOR_SCHEMA) + [(band_column(b), pa.uint64()) for b in range(bands)])


@dataclass
class BatchResult:
    """What one batch produced."""

    index: int
    n_in: int
    table: pa.Table
    dropped: Counter = field(default_factory=Counter)
    dropped_authors: Counter = field(default_factory=Counter)
    in_by_source: Counter = field(default_factory=Counter)
    quarantine: list[dict] = field(default_factory=list)
    # Where each surviving post and each quarantined record was in the batch (the Ray executor orders by it).
    kept_positions: list[int] = field(default_factory=list)
    quarantine_positions: list[int] = field(default_factory=list)


def id_hash(value: str | None) -> int:
    """A 64-bit hash of an id (0 is reserved for 'none')."""
    if not value:
        return 0
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little") or 1


class BatchProcessor:
    """Holds the compiled cleaner, filters and MinHash permutations; one per process."""

    _cache: ClassVar[dict[str, BatchProcessor]] = {}

    def __init__(self, settings: DataSettings):
        self.settings = settings
        self.cleaner = Cleaner(settings)
        self.filter = PostFilter(settings)
        self.hasher = MinHasher(settings.shingle_chars, settings.minhash_bands, settings.minhash_rows, settings.seed)

    @classmethod
    def for_settings(cls, settings_json: str) -> BatchProcessor:
        if settings_json not in cls._cache:
            cls._cache[settings_json] = cls(DataSettings.model_validate_json(settings_json))
        return cls._cache[settings_json]

    def process(self, index: int, items: list[Post | Quarantined]) -> BatchResult:
        """Clean, filter and fingerprint one batch."""
        s = self.settings
        schema = survivor_schema(s.minhash_bands)
        result = BatchResult(index=index, n_in=len(items), table=schema.empty_table())
        kept: list[Post] = []
        texts: list[str] = []
        for position, item in enumerate(items):
            result.in_by_source[item.source] += 1
            if isinstance(item, Quarantined):
                result.quarantine.append(item.row(s.quarantine_snippet_chars))
                result.quarantine_positions.append(position)
                continue
            cleaned = self.cleaner.clean(item)
            reason = self.filter.reason(item, cleaned)
            if reason:
                result.dropped[reason] += 1
                result.dropped_authors[item.author_id] += 1
                continue
            item.text = cleaned.text
            kept.append(item)
            result.kept_positions.append(position)
            texts.append(cleaned.text)
        if not kept:
            return result
        norms = [normalised(t) for t in texts]  # once per post: both the length test and the exact hash use it
        dedupable = np.array([len(n) >= s.dedup_min_chars for n in norms], dtype=bool)
        bands = np.zeros((len(kept), s.minhash_bands), dtype=np.uint64)
        if s.near_dedup and dedupable.any():
            chosen = np.flatnonzero(dedupable)
            bands[chosen] = self.hasher.band_keys([texts[i] for i in chosen])
        columns = {
            "id": [p.id for p in kept], "author_id": [p.author_id for p in kept], "text": texts,
            "created_at": [p.created_at for p in kept], "lang": [p.lang for p in kept],
            "conversation_id": [p.conversation_id for p in kept], "in_reply_to_id": [p.in_reply_to_id for p in kept],
            "quoted_id": [p.quoted_id for p in kept], "source": [p.source for p in kept],
            "line": [p.line for p in kept],
            "id_hash": [id_hash(p.id) for p in kept],
            "parent_hash": [id_hash(_parent(p)) for p in kept],
            "author_hash": [id_hash(p.author_id) for p in kept],
            "exact": [hash_normalised(n) for n in norms],
            "dedupable": dedupable,
            "time": [int(p.created_at.timestamp() * 1_000_000) if p.created_at else NO_TIME for p in kept],
        }
        arrays = [pa.array(columns[f.name], type=f.type) for f in SURVIVOR_SCHEMA]
        arrays += [pa.array(bands[:, b], type=pa.uint64()) for b in range(s.minhash_bands)]
        result.table = pa.Table.from_arrays(arrays, schema=schema)
        return result


def _parent(post: Post) -> str | None:
    """The post replied to; failing that the conversation's root (generic sources may only name the thread)."""
    if post.in_reply_to_id:
        return post.in_reply_to_id
    if post.conversation_id and post.conversation_id != post.id:
        return post.conversation_id
    return None


def process_batch(index: int, items: list[Post | Quarantined], settings_json: str) -> BatchResult:
    """Entry point for executors: the batch's result, computed with this process's cached processor."""
    return BatchProcessor.for_settings(settings_json).process(index, items)
