"""The tokenize stage: documents and provenance, chat rendering of threads, JSONL sources with weights,
the reuse of post encodings, skipping unchanged inputs, and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from murmur.errors import MurmurError
from murmur.settings.tokenizer import TokenizerSettings
from murmur.shards import TokenLoader, read_manifest
from murmur.tokenize import PieceEncoder, copies, parse_chat_source, thread_chats, tokenize_corpus
from murmur.tokenizer import ChatTokenizer, train_tokenizer, training_texts

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_fixtures import write_data_dir


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    write_data_dir(root / "data", conversations=60, loose_posts=40)
    train_tokenizer(training_texts(root / "data"), 400, root / "tokenizer")
    return root


def turns(*pairs):
    return [{"speaker": s, "text": t, "post_ids": []} for s, t in pairs]


def test_thread_chats_train_every_reply_once():
    thread = turns(("A", "hi"), ("A", "anyone?"), ("B", "yes"), ("A", "great"), ("C", "me too"), ("B", "ok"))
    both = thread_chats(thread, "both")
    assert both == [
        [{"role": "user", "content": "hi\nanyone?"}, {"role": "assistant", "content": "yes"},
         {"role": "user", "content": "great\nme too"}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "great"}],
        [{"role": "user", "content": "hi\nanyone?\nyes\ngreat"}, {"role": "assistant", "content": "me too"}],
    ]
    assistant_turns = [m["content"] for chat in both for m in chat if m["role"] == "assistant"]
    assert sorted(assistant_turns) == sorted(["yes", "great", "me too", "ok"])  # every reply, once
    assert thread_chats(thread, "second") == both[:1]
    assert thread_chats(turns(("A", "alone")), "both") == []


def test_pretrain_documents_and_provenance(run):
    tokens = run / "tokens"
    tokenize_corpus(run / "data", run / "tokenizer", tokens, TokenizerSettings())
    tok = ChatTokenizer.load(run / "tokenizer")
    manifest = read_manifest(tokens)
    assert manifest["vocab_hash"] == tok.vocab_hash() and (tokens / "tokenizer.json").is_file()
    posts = pq.read_table(run / "data" / "posts.parquet").to_pylist()
    convs = pq.read_table(run / "data" / "conversations.parquet").to_pylist()
    entry = manifest["splits"]["pretrain"]["train"]
    index = pq.read_table(tokens / entry["index"]).to_pylist()
    stream = np.fromfile(tokens / entry["shards"][0]["file"], dtype=np.uint16)
    texts = {}
    for row in index:
        ids = stream[row["offset"]:row["offset"] + row["length"]].tolist()
        assert ids[0] == tok.eos_id
        texts[tuple(row["post_ids"])] = tok.decode(ids[1:])
        assert row["bytes"] == len(texts[tuple(row["post_ids"])].encode())
    in_threads = {p for c in convs for p in c["post_ids"]}
    expected = {tuple(c["post_ids"]): "\n".join(t["text"] for t in c["turns"]) for c in convs if c["split"] == "train"}
    expected |= {(p["id"],): p["text"] for p in posts if p["split"] == "train" and p["id"] not in in_threads}
    assert texts == expected
    assert entry["bytes"] == sum(len(t.encode()) for t in expected.values())
    assert manifest["splits"]["pretrain"]["validation"]["documents"] > 0
    assert "test" not in manifest["splits"]["pretrain"]  # the fixture has no test split


def test_sft_documents_match_chat_rendering(run):
    tokens = run / "tokens_sft"
    tokenize_corpus(run / "data", run / "tokenizer", tokens, TokenizerSettings())
    tok = ChatTokenizer.load(run / "tokenizer")
    entry = read_manifest(tokens)["splits"]["sft"]["train"]
    ids = np.fromfile(tokens / entry["shards"][0]["file"], dtype=np.uint16)
    masks = np.fromfile(tokens / entry["shards"][0]["mask_file"], dtype=np.uint8)
    convs = [c for c in pq.read_table(run / "data" / "conversations.parquet").to_pylist() if c["split"] == "train"]
    chats = [chat for c in convs for chat in thread_chats(c["turns"], "both")]
    rows = pq.read_table(tokens / entry["index"]).to_pylist()
    assert len(rows) == len(chats) == entry["documents"]
    for row, chat in zip(rows, chats):
        got_ids = ids[row["offset"]:row["offset"] + row["length"]].tolist()
        got_mask = masks[row["offset"]:row["offset"] + row["length"]].tolist()
        want_ids, want_mask = tok.render_chat_with_mask(chat)
        assert got_ids == [tok.eos_id] + want_ids and got_mask == [0] + want_mask
    assert entry["target_tokens"] == int(masks.sum())


def test_piece_encoder_equals_whole_encoding(run):
    """Reusing each post's ids gives exactly the ids of encoding the whole text, whitespace edge cases
    (which fall back to whole encoding) included."""
    tok = ChatTokenizer.load(run / "tokenizer")
    assert tok.encodes_by_parts
    docs = [["hello world", "café ☕!", "42 tickets"], ["  leading", "trailing  "], ["a", "\n\nblank lines"],
            ["'s contraction", "end."], ["x"]]
    chats = [[{"role": "user", "parts": ["hi", "there?"]}, {"role": "assistant", "parts": ["yes!", "😀 ok"]}],
             [{"role": "user", "parts": [" spaced"]}, {"role": "assistant", "parts": ["tab\t"]}]]
    doc_ids, rendered = PieceEncoder(tok).encode(docs, chats)
    assert doc_ids == tok.encode_batch(["\n".join(d) for d in docs])
    joined = [[{"role": m["role"], "content": "\n".join(m["parts"])} for m in c] for c in chats]
    assert rendered == [tok.render_chat_with_mask(c) for c in joined]


def test_chat_jsonl_sources_with_weights(run, tmp_path):
    good = tmp_path / "licensed.jsonl"
    lines = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": f"answer number {i}"}]} for i in range(10)]
    lines.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]},
                               {"role": "assistant", "content": "ok"}], "split": "validation"})
    text = "\n".join(json.dumps(x) for x in lines) + "\n{broken json\n" + json.dumps(
        {"messages": [{"role": "user", "content": "no reply"}]}) + "\n"
    good.write_text(text)
    base = tokenize_corpus(run / "data", run / "tokenizer", tmp_path / "t0", TokenizerSettings())
    summary = tokenize_corpus(run / "data", run / "tokenizer", tmp_path / "t1", TokenizerSettings(),
                              chat_sources=[(str(good), 2.0)])
    assert summary["counts"]["sft/train"]["documents"] == base["counts"]["sft/train"]["documents"] + 20
    assert summary["counts"]["sft/validation"]["documents"] == base["counts"]["sft/validation"]["documents"] + 2
    assert summary["unused"] == {"bad_json": 1, "no_assistant": 1}
    entry = read_manifest(tmp_path / "t1")["splits"]["sft"]["train"]
    rows = pq.read_table(tmp_path / "t1" / entry["index"]).to_pylist()
    assert sum(r["source"] == "jsonl:licensed.jsonl" for r in rows) == 20
    half = tokenize_corpus(run / "data", run / "tokenizer", tmp_path / "t2", TokenizerSettings(),
                           chat_sources=[(str(good), 0.5)])
    extra = half["counts"]["sft/train"]["documents"] - base["counts"]["sft/train"]["documents"]
    assert 0 < extra < 10 and extra == sum(copies(0.5, f"licensed.jsonl:{i + 1}", 0) for i in range(10))
    assert parse_chat_source("a/b.jsonl:3") == ("a/b.jsonl", 3.0) and parse_chat_source("c.jsonl") == ("c.jsonl", 1.0)
    with pytest.raises(MurmurError, match="not found"):
        tokenize_corpus(run / "data", run / "tokenizer", tmp_path / "t3", TokenizerSettings(),
                        chat_sources=[(str(tmp_path / "absent.jsonl"), 1.0)])


def test_loader_reads_stage_output(run):
    tokens = run / "tokens_loader"
    tokenize_corpus(run / "data", run / "tokenizer", tokens, TokenizerSettings())
    batch = next(iter(TokenLoader(tokens, kind="sft", seq_len=64, batch_size=2)))
    tok = ChatTokenizer.load(run / "tokenizer")
    targets = batch["targets"][0]
    trained = tok.decode(targets[targets != -100].tolist())
    assert "<|im_end|>" in trained and "<|im_start|>" not in trained and "user" not in trained


def test_unchanged_inputs_are_skipped_and_bad_inputs_explained(run, tmp_path):
    out = tmp_path / "tokens"
    first = tokenize_corpus(run / "data", run / "tokenizer", out, TokenizerSettings())
    assert "skipped" not in first
    again = tokenize_corpus(run / "data", run / "tokenizer", out, TokenizerSettings())
    assert again["skipped"] is True and again["counts"] == first["counts"]
    changed = tokenize_corpus(run / "data", run / "tokenizer", out, TokenizerSettings(sft_roles="second"))
    assert "skipped" not in changed
    assert changed["counts"]["sft/train"]["documents"] < first["counts"]["sft/train"]["documents"]
    with pytest.raises(MurmurError, match="conversations.parquet not found"):
        (tmp_path / "partial").mkdir()
        (tmp_path / "partial" / "posts.parquet").write_bytes((run / "data" / "posts.parquet").read_bytes())
        tokenize_corpus(tmp_path / "partial", run / "tokenizer", tmp_path / "x", TokenizerSettings())
    write_data_dir(tmp_path / "valonly", conversations=3, loose_posts=2, splits=("validation",))
    with pytest.raises(MurmurError, match="no training documents"):
        tokenize_corpus(tmp_path / "valonly", run / "tokenizer", tmp_path / "y", TokenizerSettings())
    assert not (tmp_path / "y").exists()


def test_cli_tokenize(run, tmp_path):
    murmur = [sys.executable, "-m", "murmur", "tokenize"]
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    ok = subprocess.run(murmur + ["--data", str(run / "data"), "--tokenizer", str(run / "tokenizer"), "--out",
                                  str(tmp_path / "t"), "--chat-jsonl", f"{jsonl}:3"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "sft/train" in ok.stdout and read_manifest(tmp_path / "t")["sources"]["chat_sources"][0]["weight"] == 3
    bad = subprocess.run(murmur + ["--data", str(run / "data"), "--tokenizer", str(tmp_path / "none"), "--out",
                                   str(tmp_path / "u")], capture_output=True, text=True)
    assert bad.returncode == 1 and "run `murmur tokenizer` first" in bad.stderr and "Traceback" not in bad.stderr


def test_stage_with_a_foreign_chat_template(run, tmp_path):
    """An imported model's tokenizer (its own template, eos as boundary) goes through the general path."""
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(run / "tokenizer", foreign)
    (foreign / "chat_template.jinja").write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}### assistant: {% endif %}")
    tok = ChatTokenizer.load(foreign)
    assert not tok.encodes_by_parts
    tokenize_corpus(run / "data", foreign, tmp_path / "tokens", TokenizerSettings())
    entry = read_manifest(tmp_path / "tokens")["splits"]["sft"]["train"]
    ids = np.fromfile(tmp_path / "tokens" / entry["shards"][0]["file"], dtype=np.uint16)
    mask = np.fromfile(tmp_path / "tokens" / entry["shards"][0]["mask_file"], dtype=np.uint8)
    trained = tok.decode(ids[mask == 1].tolist())
    masked_eos = int((ids[mask == 1] == tok.eos_id).sum())
    assert "### " not in trained and trained.count("<|endoftext|>") == masked_eos > 0
    # Each trained run (one assistant turn) ends with exactly one end-of-text token, its last.
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])) == -1) - 1  # last index of each run
    assert masked_eos == len(runs) and (ids[runs] == tok.eos_id).all()


def test_data_files_of_the_wrong_shape(run, tmp_path):
    import pyarrow as pa

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"id": ["1"], "text": ["hello"]}), data / "posts.parquet")
    (data / "conversations.parquet").write_text("not parquet")
    with pytest.raises(MurmurError, match="lacks the column.*split"):
        list(training_texts(data))
    with pytest.raises(MurmurError, match="not a readable Parquet file"):
        tokenize_corpus(data, run / "tokenizer", tmp_path / "t", TokenizerSettings())


def test_a_base_model_build_writes_the_chat_shards_only(run, tmp_path):
    """A build that finetunes `model.base` never pretrains: its tokenize stage writes no pretraining shards,
    and its chat shards are the same bytes as a full tokenize's."""
    from murmur.config import settings_from_dict
    from murmur.tokenize import run_stage

    full = tokenize_corpus(run / "data", run / "tokenizer", tmp_path / "full", TokenizerSettings())
    shutil.copytree(run / "data", tmp_path / "data")
    shutil.copytree(run / "tokenizer", tmp_path / "tokenizer")
    settings = settings_from_dict({"run": {"dir": str(tmp_path)}, "model": {"base": "somewhere/base"}})
    summary = run_stage(settings, tmp_path)
    manifest = read_manifest(tmp_path / "tokens")
    assert set(manifest["splits"]) == {"sft"} and not (tmp_path / "tokens" / "pretrain").exists()
    assert "pretrain_train_tokens" not in summary and summary["sft_train_tokens"] == full["sft_train_tokens"]
    assert manifest["splits"]["sft"] == read_manifest(tmp_path / "full")["splits"]["sft"]
    with pytest.raises(MurmurError, match="unknown shard kinds"):
        tokenize_corpus(run / "data", run / "tokenizer", tmp_path / "x", TokenizerSettings(), kinds=("posts",))
