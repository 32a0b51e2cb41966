"""A purge leaves the data stage's outputs as a rebuild with the same deletion list would: the thread cut where
the deleted post stood (a reply to it starts a thread of its own), turns merged and speakers named as the build
does. Only the split differs by design: a cut thread stays in the split it was in, so no validation text moves
into training."""

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import thread_tweets, tweet

from murmur.data import pipeline
from murmur.data.compliance import purge
from murmur.data.records import SPLITS
from murmur.settings.data import DataSettings

ROOT, BOB_1, BOB_2, ALICE_2, CAROL = (str(1_000_000_000_000_000_000 + i) for i in range(1, 6))
LATE = (tweet(1_000_000_000_000_000_006, "Chili again? Then I am bringing the cornbread myself", author="dan",
              reply_to=1_000_000_000_000_000_004, conv=1_000_000_000_000_000_001, created="2024-01-01T10:05:00.000Z"),
        tweet(1_000_000_000_000_000_007, "Deal, and I will make extra for the neighbours", author="alice",
              reply_to=1_000_000_000_000_000_006, conv=1_000_000_000_000_000_001, created="2024-01-01T10:06:00.000Z"),
        tweet(1_000_000_000_000_000_008, "Chili and cornbread it is, see you all on Sunday", author="erin",
              reply_to=1_000_000_000_000_000_004, conv=1_000_000_000_000_000_001, created="2024-01-01T10:07:00.000Z"))
DAN = str(1_000_000_000_000_000_006)


def build(tmp_path: Path, out: Path, deleted: str | None) -> None:
    source = tmp_path / "posts.jsonl"
    source.write_text("".join(json.dumps(t) + "\n" for t in thread_tweets() + list(LATE)))
    deletions = None
    if deleted:
        deletions = tmp_path / f"delete-{deleted}.txt"
        deletions.write_text(f"post:{deleted}\n")
    settings = DataSettings(sources=[f"x-api:{source}"], workers=1, max_paths_per_tree=8,
                            deletions=str(deletions) if deletions else None)
    pipeline.run(settings, out, progress=False)


def outputs(out: Path) -> tuple[dict, list]:
    posts = {p["id"]: (p["root_id"], p["in_reply_to_id"], p["conversation_id"])
             for p in pq.read_table(out / "posts.parquet").to_pylist()}
    conversations = sorted((c["id"], c["root_id"], tuple(c["post_ids"]),
                            tuple((t["speaker"], t["text"], tuple(t["post_ids"])) for t in c["turns"]))
                           for c in pq.read_table(out / "conversations.parquet").to_pylist())
    return posts, conversations


# root: every piece gets a new root and new speaker names; merged-turn: a merged turn is split, and the two
# paths through the tree leave the same piece; middle: the replies below start a thread of their own; branch:
# the piece above the cut goes on through another reply, so it is no conversation of its own.
@pytest.mark.parametrize("deleted", [ROOT, BOB_2, ALICE_2, DAN], ids=["root", "merged-turn", "middle", "branch"])
def test_purge_leaves_what_a_rebuild_would(tmp_path, deleted):
    rebuilt = tmp_path / "rebuilt"
    build(tmp_path, rebuilt, deleted)
    purged = tmp_path / "purged"
    build(tmp_path, purged, None)
    before = outputs(purged)[1]
    late = tmp_path / "late.txt"
    late.write_text(f"post:{deleted}\n")
    summary = purge(purged, late)

    assert outputs(purged) == outputs(rebuilt)
    assert summary["conversations_cut"] == sum(deleted in c[2] for c in before)
    stats = json.loads((purged / "stats.json").read_text())
    assert set(stats["splits"]) == set(SPLITS) and sum(stats["splits"].values()) == stats["kept"]
