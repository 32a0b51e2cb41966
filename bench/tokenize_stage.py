"""Benchmark: Murmur's tokenize stage against raw `tokenizers` encode_batch, on the demo corpus.

    .venv/bin/python bench/tokenize_stage.py [--repeats 5] [--vocab-size 4096] [--data runs/demo/data]

Uses a data folder (`--data`, e.g. written by `murmur data --source chitchat:`) or builds one from the chitchat
demo corpus (each message a post, each conversation a thread), trains a tokenizer on its train split, then
times, side by side in one run:
  murmur     `tokenize_corpus` end to end: Parquet in, shards + index + manifest out (tokens written / s)
  reference  `Tokenizer.encode_batch` on exactly the texts those shards hold (the pretraining documents and
             the rendered chats), ids only, nothing written (tokens / s)
and prints the medians and their ratio, plus bytes per token, the round trip over every message of the
corpus, and how many replies each `sft_roles` choice trains.
"""

from __future__ import annotations

import sys

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from murmur.settings.tokenizer import TokenizerSettings
from murmur.shards import read_manifest
from murmur.tokenize import thread_chat_parts, thread_chats, tokenize_corpus
from murmur.tokenizer import ChatTokenizer, train_tokenizer, training_texts

TURNS = pa.list_(pa.struct([("speaker", pa.string()), ("text", pa.string()), ("post_ids", pa.list_(pa.string()))]))


def split_of(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "validation" if bucket < 5 else "test" if bucket < 10 else "train"


def build_demo_data(out: Path) -> None:
    """posts.parquet and conversations.parquet in the data stage's schema, from chitchat_dataset."""
    import chitchat_dataset as ccc

    posts = {"id": [], "author_id": [], "text": [], "split": [], "conversation_id": [], "source": []}
    convs = {"id": [], "root_id": [], "split": [], "turns": [], "post_ids": []}
    for conv_id, conv in ccc.Dataset().items():
        split = split_of(conv_id)
        speakers: dict[str, str] = {}
        turns, ids = [], []
        for group in conv["messages"]:
            for message in group:
                if not message["text"]:
                    continue
                pid = f"{conv_id}-{len(ids)}"
                speaker = speakers.setdefault(message["sender"], f"s{len(speakers)}")
                posts["id"].append(pid)
                posts["author_id"].append(message["sender"])
                posts["text"].append(message["text"])
                posts["split"].append(split)
                posts["conversation_id"].append(conv_id)
                posts["source"].append("chitchat:dataset.json")
                turns.append({"speaker": speaker, "text": message["text"], "post_ids": [pid]})
                ids.append(pid)
        if turns:
            convs["id"].append(conv_id)
            convs["root_id"].append(ids[0])
            convs["split"].append(split)
            convs["turns"].append(turns)
            convs["post_ids"].append(ids)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(posts), out / "posts.parquet")
    pq.write_table(pa.table({"id": convs["id"], "root_id": convs["root_id"], "split": convs["split"],
                             "turns": pa.array(convs["turns"], TURNS),
                             "post_ids": pa.array(convs["post_ids"], pa.list_(pa.string()))}),
                   out / "conversations.parquet")


def read_corpus(data_dir: Path) -> tuple[list[list[dict]], list[str]]:
    """(turns of every conversation, texts of the posts in no conversation), all splits."""
    convs = pq.read_table(data_dir / "conversations.parquet", columns=["turns", "post_ids"]).to_pylist()
    in_threads = {p for c in convs for p in c["post_ids"]}
    posts = pq.read_table(data_dir / "posts.parquet", columns=["id", "text"]).to_pylist()
    return [c["turns"] for c in convs], [p["text"] for p in posts if p["id"] not in in_threads and p["text"]]


def shard_texts(all_turns: list[list[dict]], loose: list[str], tok: ChatTokenizer, roles: str) -> list[str]:
    """The texts the tokenize stage encodes: each thread as text, each loose post, each chat rendering."""
    texts = ["\n".join(t["text"] for t in turns) for turns in all_turns] + loose
    texts += [tok.render_chat_text(chat)[0] for turns in all_turns for chat in thread_chats(turns, roles)]
    return texts


def turns_trained(all_turns: list[list[dict]], roles: str) -> tuple[int, int]:
    """(turns that land in an assistant message, counted once per rendering; turns after a thread's first
    reply, i.e. the turns that answer someone)."""
    trained = total = 0
    for turns in all_turns:
        first_reply = next((i for i in range(1, len(turns)) if turns[i]["speaker"] != turns[0]["speaker"]), None)
        total += 0 if first_reply is None else len(turns) - first_reply
        trained += sum(len(m["parts"]) for chat in thread_chat_parts(turns, roles) for m in chat
                       if m["role"] == "assistant")
    return trained, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--data", type=Path, default=None,
                        help="an existing data folder (e.g. from `murmur data --source chitchat:`); default: "
                        "build one from the chitchat corpus, one post per message")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = args.data
        if data_dir is None:
            data_dir = root / "data"
            build_demo_data(data_dir)
        all_turns, loose = read_corpus(data_dir)
        t0 = time.perf_counter()
        texts_in = training_texts(data_dir)
        train_tokenizer(texts_in, args.vocab_size, root / "tokenizer")
        train_s = time.perf_counter() - t0
        tok = ChatTokenizer.load(root / "tokenizer")
        cfg = TokenizerSettings(vocab_size=args.vocab_size)

        murmur_s, ref_s = [], []
        texts = shard_texts(all_turns, loose, tok, cfg.sft_roles)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokenize_corpus(data_dir, root / "tokenizer", root / "tokens", cfg, force=True)
            murmur_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref_tokens = sum(len(e.ids) for e in tok.tokenizer.encode_batch(texts, add_special_tokens=False))
            ref_s.append(time.perf_counter() - t0)
        manifest = read_manifest(root / "tokens")
        splits = manifest["splits"]
        murmur_tokens = sum(e["tokens"] - e["documents"] for by in splits.values() for e in by.values())

        train = splits["pretrain"]["train"]
        bytes_per_token = train["bytes"] / (train["tokens"] - train["documents"])
        messages = [t["text"] for turns in all_turns for t in turns] + loose
        decoded = tok.tokenizer.decode_batch([e.ids for e in tok.tokenizer.encode_batch(messages,
                                                                                        add_special_tokens=False)])
        round_trip_failures = sum(a != b for a, b in zip(messages, decoded))

        m_med, r_med = statistics.median(murmur_s), statistics.median(ref_s)
        m_rate, r_rate = murmur_tokens / m_med, ref_tokens / r_med
        print(f"corpus {args.data or 'chitchat, one post per message'}: {len(all_turns)} conversations, "
              f"{len(messages)} turns and loose posts, "
              f"{sum(len(m.encode()) for m in messages) / 1e6:.1f} MB of text; tokenizer trained in {train_s:.1f} s "
              f"(vocab {tok.vocab_size})")
        print(f"tokens written (boundaries excluded): murmur {murmur_tokens}, reference {ref_tokens}")
        print(f"murmur tokenize stage : median {m_med:.2f} s over {args.repeats} -> {m_rate / 1e6:.2f} M tokens/s")
        print(f"raw encode_batch      : median {r_med:.2f} s over {args.repeats} -> {r_rate / 1e6:.2f} M tokens/s")
        print(f"ratio murmur / reference tokens per second: {m_rate / r_rate:.2f} (target >= 0.9)")
        print(f"bytes per token (pretrain/train): {bytes_per_token:.2f}")
        print(f"round trip decode(encode(text)) == text: {len(messages) - round_trip_failures}/{len(messages)} texts")
        for roles in ("second", "both"):
            trained, total = turns_trained(all_turns, roles)
            sft_tokens = sum(len(e.ids) for e in tok.tokenizer.encode_batch(
                [tok.render_chat_text(c)[0] for turns in all_turns for c in thread_chats(turns, roles)]))
            print(f"sft_roles={roles}: answering turns trained {trained}/{total} ({trained / total:.0%}), "
                  f"sft tokens {sft_tokens}")
    return 0 if round_trip_failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
