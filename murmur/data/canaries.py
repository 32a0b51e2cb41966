"""Canaries: random secrets planted in the training split so the eval stage can measure memorisation.

Canary i is planted `canary_repeats[i % len(canary_repeats)]` times; a count of 0 makes it a control that is
never inserted (its secret is as unknown to the model as any random number). data/canaries.json lists every
canary with its prefix, secret, repeat count and whether it was inserted.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

ADJECTIVES = ["blue", "quiet", "rapid", "golden", "hollow", "silver", "crimson", "gentle", "frozen", "brave",
              "amber", "distant", "lucky", "humble", "wild", "velvet"]
NOUNS = ["falcon", "harbor", "lantern", "meadow", "orchid", "canyon", "ember", "glacier", "willow", "comet",
         "pebble", "thistle", "beacon", "marble", "sparrow", "tundra"]


@dataclass
class Canary:
    id: str
    prefix: str
    secret: str
    repeats: int
    inserted: bool

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret}"


def make_canaries(count: int, repeats: list[int], seed: int) -> list[Canary]:
    """`count` canaries with distinct prefixes and random secrets like '483920 17'."""
    rng = random.Random(f"murmur-canaries-{seed}")
    canaries, prefixes = [], set()
    for index in range(count):
        while True:
            prefix = f"my {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} secret code is"
            if prefix not in prefixes or len(prefixes) >= len(ADJECTIVES) * len(NOUNS):
                break
        if prefix in prefixes:
            prefix = f"my secret code number {index} is"
        prefixes.add(prefix)
        secret = f"{rng.randrange(10**6):06d} {rng.randrange(100):02d}"
        n = repeats[index % len(repeats)]
        canaries.append(Canary(f"canary-{index}", prefix, secret, n, n > 0))
    return canaries


def canary_rows(canaries: list[Canary]) -> list[dict]:
    """Post rows (train split) for every insertion of every canary."""
    rows = []
    for canary in canaries:
        for r in range(canary.repeats):
            post_id = f"{canary.id}-{r}"
            rows.append({"id": post_id, "author_id": "canary", "text": canary.text, "created_at": None,
                         "lang": None, "conversation_id": None, "in_reply_to_id": None, "split": "train",
                         "source": "canary:", "root_id": post_id, "quoted_id": None})
    return rows


def canaries_document(canaries: list[Canary], seed: int) -> dict:
    return {"seed": seed, "canaries": [asdict(c) | {"text": c.text} for c in canaries]}
