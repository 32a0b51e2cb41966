"""Train/validation/test assignment by a hash of the thread root, so no conversation straddles splits."""

from __future__ import annotations

import hashlib


def split_of(root_id: str, validation: float, test: float, seed: int = 0) -> str:
    """The split of every post and conversation under `root_id`: deterministic, independent of order."""
    digest = hashlib.blake2b(f"{seed}:{root_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64
    if u < validation:
        return "validation"
    if u < validation + test:
        return "test"
    return "train"
