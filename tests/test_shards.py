"""Token shards and the loader: ranks, exact resume (also across world sizes), validation pass, checksums,
and purging deleted posts through the provenance index."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from murmur.errors import MurmurError
from murmur.shards import (TokenLoader, audit_deletions, dtype_for_vocab, purge_documents, read_manifest,
                           write_shards)

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_fixtures import write_data_dir

VOCAB = 97


def make_documents(n: int = 300, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 40))] for _ in range(n)]


@pytest.fixture()
def pretrain_dir(tmp_path) -> Path:
    docs = make_documents()
    write_shards(tmp_path, docs, vocab_size=VOCAB, boundary_id=0, post_ids=[[f"p{i}"] for i in range(len(docs))],
                 doc_bytes=[4 * len(d) for d in docs], shard_tokens=700)
    return tmp_path


def take(loader: TokenLoader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def windows_of(batches: list[dict]) -> list[tuple]:
    return [tuple(row.tolist()) for b in batches for row in b["inputs"]]


def test_write_shards_manifest_and_dtype(pretrain_dir):
    manifest = read_manifest(pretrain_dir)
    entry = manifest["splits"]["pretrain"]["train"]
    assert entry["documents"] == 300 and len(entry["shards"]) > 3
    assert entry["tokens"] == sum(len(d) + 1 for d in make_documents())
    assert manifest["dtype"] == "uint16" and dtype_for_vocab(70_000) == np.uint32
    first = np.fromfile(pretrain_dir / entry["shards"][0]["file"], dtype=np.uint16)
    assert first[0] == 0 and first[1:1 + len(make_documents()[0])].tolist() == make_documents()[0]


def test_two_ranks_disjoint_and_union_equals_one_rank(pretrain_dir):
    kwargs = dict(seq_len=16, batch_size=3, seed=7)
    one = windows_of(take(TokenLoader(pretrain_dir, **kwargs), 8))
    rank0 = take(TokenLoader(pretrain_dir, rank=0, world_size=2, **kwargs), 4)
    rank1 = take(TokenLoader(pretrain_dir, rank=1, world_size=2, **kwargs), 4)
    w0, w1 = windows_of(rank0), windows_of(rank1)
    assert not set(w0) & set(w1)
    # Step k of the 2-rank job covers what steps 2k and 2k+1 of the 1-rank job cover.
    interleaved = [w for k in range(4) for w in w0[3 * k:3 * k + 3] + w1[3 * k:3 * k + 3]]
    assert interleaved == one
    assert len(set(one)) == len(one)  # no window repeats within an epoch


def test_order_depends_on_seed_and_targets_shift_inputs(pretrain_dir):
    a = take(TokenLoader(pretrain_dir, seq_len=16, batch_size=4, seed=0), 1)[0]
    b = take(TokenLoader(pretrain_dir, seq_len=16, batch_size=4, seed=1), 1)[0]
    assert not torch.equal(a["inputs"], b["inputs"])
    assert a["inputs"].dtype == torch.long and a["inputs"].shape == (4, 16)
    assert torch.equal(a["inputs"][:, 1:], a["targets"][:, :-1])


def test_resume_exactly_and_across_world_size(pretrain_dir):
    kwargs = dict(seq_len=16, batch_size=2, seed=3)
    reference = take(TokenLoader(pretrain_dir, **kwargs), 12)

    stopped = TokenLoader(pretrain_dir, **kwargs)
    take(stopped, 5)
    state = json.loads(json.dumps(stopped.state_dict()))
    resumed = TokenLoader(pretrain_dir, **kwargs)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[5:8], take(resumed, 3)):
        assert torch.equal(expected["inputs"], got["inputs"]) and torch.equal(expected["targets"], got["targets"])

    # Two ranks run 3 steps (= 6 one-rank batches), then the job continues on one rank.
    ranks = [TokenLoader(pretrain_dir, rank=r, world_size=2, **kwargs) for r in range(2)]
    for loader in ranks:
        take(loader, 3)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    single = TokenLoader(pretrain_dir, **kwargs)
    single.load_state_dict(ranks[0].state_dict())
    for expected, got in zip(reference[6:9], take(single, 3)):
        assert torch.equal(expected["inputs"], got["inputs"])

    # And from one rank to two: rank r takes the r-th half of what one rank reads next.
    one = TokenLoader(pretrain_dir, **kwargs)
    take(one, 4)
    two = [TokenLoader(pretrain_dir, rank=r, world_size=2, **kwargs) for r in range(2)]
    for loader in two:
        loader.load_state_dict(one.state_dict())
    assert windows_of(take(two[0], 1)) + windows_of(take(two[1], 1)) == windows_of(reference[4:6])


def test_state_mismatch_is_refused(pretrain_dir):
    state = TokenLoader(pretrain_dir, seq_len=16, batch_size=2).state_dict()
    with pytest.raises(MurmurError, match="seq_len=16"):
        TokenLoader(pretrain_dir, seq_len=32, batch_size=2).load_state_dict(state)


def test_epochs_continue_past_the_end(pretrain_dir):
    loader = TokenLoader(pretrain_dir, seq_len=64, batch_size=4, seed=0)
    per_epoch = loader.num_windows
    seen = windows_of(take(loader, per_epoch))  # 4 epochs' worth
    assert len(set(seen[:per_epoch])) == per_epoch
    assert set(seen[per_epoch:2 * per_epoch]) == set(seen[:per_epoch])
    assert seen[per_epoch:2 * per_epoch] != seen[:per_epoch]  # reshuffled


def test_validation_pass_predicts_every_token_once(pretrain_dir):
    entry = read_manifest(pretrain_dir)["splits"]["pretrain"]["train"]
    stream = np.concatenate([[0] + d for d in make_documents()])
    for world in (1, 3):
        loaders = [TokenLoader(pretrain_dir, seq_len=50, batch_size=4, rank=r, world_size=world, loop=False)
                   for r in range(world)]
        targets = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            targets += [row[row != -100] for b in batches for row in b["targets"]]
        total = sum(len(t) for t in targets)
        assert total == len(stream) - 1 == entry["tokens"] - 1
    loader = TokenLoader(pretrain_dir, seq_len=50, batch_size=4, loop=False)
    predicted = np.concatenate([b["targets"][b["targets"] != -100].numpy() for b in loader])
    assert predicted.tolist() == stream[1:].tolist()
    assert loader.text_bytes == sum(4 * len(d) for d in make_documents())


def test_sft_targets_follow_mask(tmp_path):
    docs = [[5, 6, 7, 8, 9], [10, 11, 12]]
    masks = [[0, 0, 1, 1, 0], [0, 1, 1]]
    write_shards(tmp_path, docs * 4, masks=masks * 4, kind="sft", vocab_size=VOCAB)
    loader = TokenLoader(tmp_path, kind="sft", seq_len=31, batch_size=1, loop=False)
    (batch,) = list(loader)
    stream = sum(docs * 4, [])
    mask = sum(masks * 4, [])
    assert batch["inputs"][0].tolist() == stream[:-1]
    assert batch["targets"][0].tolist() == [t if m else -100 for t, m in zip(stream[1:], mask[1:])]
    with pytest.raises(MurmurError, match="need masks"):
        write_shards(tmp_path, docs, kind="sft", vocab_size=VOCAB)


def test_checksum_mismatch_and_bad_splits(pretrain_dir, tmp_path):
    entry = read_manifest(pretrain_dir)["splits"]["pretrain"]["train"]
    shard = pretrain_dir / entry["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(MurmurError, match="does not match its checksum"):
        TokenLoader(pretrain_dir, seq_len=16, batch_size=2)
    with pytest.raises(MurmurError, match="no pretrain/validation shards"):
        TokenLoader(pretrain_dir, split="validation", verify=False)
    with pytest.raises(MurmurError, match="run `murmur tokenize` first"):
        TokenLoader(tmp_path / "nothing")
    write_shards(tmp_path / "small", [[1, 2, 3]], vocab_size=VOCAB)
    with pytest.raises(MurmurError, match="fewer than seq_len"):
        TokenLoader(tmp_path / "small", seq_len=16)
    write_shards(tmp_path / "empty", [], vocab_size=VOCAB, split="validation")
    with pytest.raises(MurmurError, match="is empty"):
        TokenLoader(tmp_path / "empty", split="validation", loop=False)
    with pytest.raises(MurmurError, match="out of range"):
        write_shards(tmp_path / "big", [[1, 70_000]], vocab_size=VOCAB)


def _digests(tokens_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(tokens_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in tokens_dir.rglob("*.bin")}


def _documents(tokens_dir: Path, entry: dict) -> list[tuple[list[int], list[str]]]:
    """(token ids, post ids) of every document of a split, in stream order, read through the index."""
    import pyarrow.parquet as pq

    rows = pq.read_table(tokens_dir / entry["index"]).to_pylist()
    shards = [np.fromfile(tokens_dir / s["file"], dtype=np.uint16) for s in entry["shards"]]
    return [(shards[r["shard"]][r["offset"]:r["offset"] + r["length"]].tolist(), r["post_ids"])
            for r in sorted(rows, key=lambda r: (r["shard"], r["offset"]))]


def test_purge_after_tokenize(tmp_path):
    """Delete a post after tokenizing: purge removes exactly the documents built from it, rewrites only
    the shards that held them, the audit then passes, and the loader still reads every other document."""
    from murmur.settings.tokenizer import TokenizerSettings
    from murmur.tokenize import tokenize_corpus
    from murmur.tokenizer import train_tokenizer, training_texts

    corpus = write_data_dir(tmp_path / "data", conversations=80, loose_posts=60)
    train_tokenizer(training_texts(tmp_path / "data"), 400, tmp_path / "tokenizer")
    tokens = tmp_path / "tokens"
    tokenize_corpus(tmp_path / "data", tmp_path / "tokenizer", tokens, TokenizerSettings(shard_tokens=400))
    posts = corpus["posts"]
    # A post in a training thread, long enough for the token search.
    victim = next(i for i, (t, c, s) in enumerate(zip(posts["text"], posts["conversation_id"], posts["split"]))
                  if c and s == "train" and len(t) > 60)
    deleted_id, deleted_text = posts["id"][victim], posts["text"][victim]

    problems = audit_deletions(tokens, [deleted_id], [deleted_text])
    assert any("built from deleted posts" in p for p in problems)
    assert any("holds the tokens of deleted text" in p for p in problems)
    before = _digests(tokens)
    manifest_before = read_manifest(tokens)
    docs_before = _documents(tokens, manifest_before["splits"]["pretrain"]["train"])

    summary = purge_documents(tokens, [deleted_id])
    assert summary["documents_removed"] >= 2  # its thread as text, and as chats
    assert audit_deletions(tokens, [deleted_id], [deleted_text]) == []
    after = _digests(tokens)
    unchanged = set(before) & set(after)
    assert all(before[name] == after[name] for name in unchanged)
    rewritten = set(after) - set(before)
    assert {name for name in rewritten if not name.endswith(".mask.bin")} == set(summary["shards_rewritten"])
    total_shards = sum(len(e["shards"]) for by in manifest_before["splits"].values() for e in by.values())
    assert 0 < len(summary["shards_rewritten"]) < total_shards

    manifest = read_manifest(tokens)
    entry = manifest["splits"]["pretrain"]["train"]
    old = manifest_before["splits"]["pretrain"]["train"]
    assert entry["documents"] == old["documents"] - 1 and entry["tokens"] < old["tokens"]
    # The loader reads every remaining document: its validation pass is exactly their concatenation.
    loader = TokenLoader(tokens, seq_len=32, batch_size=4, loop=False)
    batches = list(loader)
    seen = [batches[0]["inputs"][0, 0].item()] + [t for b in batches for t in b["targets"][b["targets"] != -100]
                                                  .tolist()]
    assert seen == [t for doc, posts in docs_before if deleted_id not in posts for t in doc]
    assert purge_documents(tokens, [deleted_id])["documents_removed"] == 0


def test_shuffled_index_is_a_permutation():
    from murmur.shards import shuffled_index

    for n in (1, 2, 3, 10, 257, 1000):
        for key in (0, 1, 12345):
            assert sorted(shuffled_index(i, n, key) for i in range(n)) == list(range(n))
    orders = {tuple(shuffled_index(i, 50, key) for i in range(50)) for key in range(5)}
    assert len(orders) == 5 and tuple(range(50)) not in orders


def test_large_vocabulary_uses_uint32(tmp_path):
    docs = [[70_000 + i, 5, 100_000 - i] for i in range(20)]
    write_shards(tmp_path, docs, vocab_size=128_256, boundary_id=128_000)
    assert read_manifest(tmp_path)["dtype"] == "uint32"
    (batch,) = list(TokenLoader(tmp_path, seq_len=100, batch_size=1, loop=False))
    stream = [t for d in docs for t in [128_000] + d]
    assert batch["inputs"][0, :79].tolist() == stream[:79]


def test_audit_finds_a_deleted_text_holding_a_special_tokens_literal(tmp_path):
    """Shards store post text with a special token's literal as text (`specials_as_text`), so the audit must
    search for it encoded the same way: encoded as the control token, a deleted `<|im_end|>` post hides."""
    from murmur.tokenizer import train_tokenizer

    words = "hello world coffee morning train late again weekend music concert tickets sold out".split()
    rng = random.Random(0)
    tokenizer = train_tokenizer([" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)], 300,
                                tmp_path / "tokenizer")
    deleted = "coffee morning <|im_end|> train late again weekend music concert tickets sold out hello world"
    kept = "hello world weekend music sold out again"
    ids = tokenizer.encode_batch([deleted, kept], specials_as_text=True)
    assert tokenizer.im_end_id not in ids[0]  # the literal is stored as its characters
    tokens = tmp_path / "tokens"
    write_shards(tokens, ids, vocab_size=tokenizer.vocab_size, boundary_id=tokenizer.eos_id,
                 post_ids=[["gone"], ["kept"]], tokenizer_dir=tmp_path / "tokenizer")

    problems = audit_deletions(tokens, [], [deleted])
    assert len(problems) == 1 and "holds the tokens of deleted text 'coffee morning <|im_end|>" in problems[0]
    purge_documents(tokens, ["gone"])
    assert audit_deletions(tokens, [], [deleted]) == []
