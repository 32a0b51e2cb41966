"""The `tokenize` stage: curated posts and threads -> token shards for pretraining and chat finetuning.

Pretraining documents: each conversation as plain text (its turns joined by newlines), and each post that
belongs to no conversation. Every document is prefixed with `<|endoftext|>` and records the ids of the posts
it was built from (the provenance index that `murmur data purge` uses).

Chat finetuning documents: each conversation rendered with the chat template, the loss on assistant turns
only. A thread has no natural assistant, so with `sft_roles = "both"` it is rendered once per speaker who
replies, that speaker as the assistant and everyone else as the user: every reply is then trained exactly
once. With "second" only the speaker of the first reply is the assistant. Conversations from JSONL files in
OpenAI's `messages` format are mixed in with a weight per source.

Text is encoded in batches by the Rust tokenizer (parallel across cores) while Parquet is streamed in
record batches, so memory stays bounded by the batch and one shard per output.

A build that finetunes a base model (`model.base`) never pretrains: its tokenize stage writes the chat
shards only (`kinds=("sft",)`), which saves encoding every post a second time.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from murmur.data.records import SPLITS
from murmur.errors import MurmurError
from murmur.files import staged_dir
from murmur.fingerprint import digest, settings_by_key
from murmur.shards import (
    ShardWriter,
    dtype_for_vocab,
    new_manifest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from murmur.tokenizer import ChatTokenizer, open_parquet

BATCH = 2048
KINDS = ("pretrain", "sft")
CHAT_ROLES = ("system", "user", "assistant")


def thread_chat_parts(turns: list[dict[str, Any]], roles: str = "both") -> list[list[dict[str, Any]]]:
    """The chats a thread is trained as, one per assistant speaker (see the module docstring); each message
    holds `role` and `parts`, the texts of the turns it joins.

    Turns before the assistant's first reply to someone else are context only, consecutive turns of the
    same role become one message (joined by newlines), and the chat ends at the assistant's last turn."""
    turns = [t for t in turns if t.get("text")]
    if len(turns) < 2:
        return []
    repliers = []
    for prev, turn in itertools.pairwise(turns):
        if turn["speaker"] != prev["speaker"] and turn["speaker"] not in repliers:
            repliers.append(turn["speaker"])
    if roles == "second":
        repliers = repliers[:1]
    chats = []
    for speaker in repliers:
        messages: list[dict[str, Any]] = []
        for turn in turns:
            role = "assistant" if turn["speaker"] == speaker else "user"
            if not messages and role == "assistant":
                continue  # the assistant never opens a chat
            if messages and messages[-1]["role"] == role:
                messages[-1]["parts"].append(turn["text"])
            else:
                messages.append({"role": role, "parts": [turn["text"]]})
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if messages:
            chats.append(messages)
    return chats


def thread_chats(turns: list[dict[str, Any]], roles: str = "both") -> list[list[dict[str, str]]]:
    """`thread_chat_parts` as chat messages (`role`, `content`)."""
    return [[{"role": m["role"], "content": "\n".join(m["parts"])} for m in chat]
            for chat in thread_chat_parts(turns, roles)]


def _clean(piece: str) -> bool:
    return bool(piece) and not piece[0].isspace() and not piece[-1].isspace()


class PieceEncoder:
    """Encodes documents built from posts, each distinct post text once, reusing its ids in the
    pretraining text and in every chat rendering of its thread (when `tokenizer.encodes_by_parts`; a
    document with a piece that starts or ends with whitespace is encoded whole). The ids equal those of
    encoding the whole text, as `transformers` would."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tok = tokenizer
        self.fast = tokenizer.encodes_by_parts
        if self.fast:
            self.newline = tokenizer.encode("\n")
            self.heads = {role: [tokenizer.im_start_id] + tokenizer.encode(f"{role}\n") for role in CHAT_ROLES}

    def encode(self, docs: list[list[str]], chats: list[list[dict[str, Any]]]
               ) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
        """Ids of each document (its pieces joined by newlines) and (ids, mask) of each chat."""
        if not self.fast:
            return (self.tok.encode_batch(["\n".join(d) for d in docs], specials_as_text=True),
                    self.tok.render_chats_with_masks([_joined(c) for c in chats]))
        pieces: dict[str, int] = {}
        for parts in docs:
            for piece in parts:
                if _clean(piece):
                    pieces.setdefault(piece, len(pieces))
        for chat in chats:
            for m in chat:
                for piece in m["parts"]:
                    if _clean(piece):
                        pieces.setdefault(piece, len(pieces))
        # Posts are text: a control token typed in one stays text, in its pretraining and its chat documents.
        encoded = self.tok.encode_batch(list(pieces), specials_as_text=True)
        nl = self.newline

        def join(parts: list[str]) -> list[int]:
            ids = list(encoded[pieces[parts[0]]])
            for piece in parts[1:]:
                ids += nl
                ids += encoded[pieces[piece]]
            return ids

        doc_ids: list[list[int] | None] = []
        whole_docs = []
        for parts in docs:
            if parts and all(p in pieces for p in parts):
                doc_ids.append(join(parts))
            else:
                doc_ids.append(None)
                whole_docs.append(len(doc_ids) - 1)
        for i, ids in zip(whole_docs, self.tok.encode_batch(["\n".join(docs[i]) for i in whole_docs],
                                                            specials_as_text=True)):
            doc_ids[i] = ids

        chat_out: list[tuple[list[int], list[int]] | None] = []
        whole_chats = []
        im_end = self.tok.im_end_id
        for chat in chats:
            if not all(m["role"] in self.heads and m["parts"] and all(p in pieces for p in m["parts"]) for m in chat):
                chat_out.append(None)
                whole_chats.append(len(chat_out) - 1)
                continue
            ids: list[int] = []
            mask: list[int] = []
            for m in chat:
                head, body = self.heads[m["role"]], join(m["parts"]) + [im_end]
                ids += head
                ids += body
                ids += nl
                mask += [0] * len(head)
                mask += [1 if m["role"] == "assistant" else 0] * len(body)
                mask += [0] * len(nl)
            chat_out.append((ids, mask))
        rendered = self.tok.render_chats_with_masks([_joined(chats[i]) for i in whole_chats])
        for i, pair in zip(whole_chats, rendered):
            chat_out[i] = pair
        return doc_ids, chat_out


def _joined(chat: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": "\n".join(m["parts"])} for m in chat]


def copies(weight: float, key: str, seed: int) -> int:
    """How many times a conversation of a source with `weight` appears: floor(weight), plus one more for a
    seeded share equal to the fractional part (deterministic per conversation)."""
    whole = math.floor(weight)
    frac = weight - whole
    if frac <= 0:
        return whole
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return whole + (int.from_bytes(digest, "little") / 2**64 < frac)


def parse_chat_source(text: str) -> tuple[str, float]:
    """`FILE[:WEIGHT]` from the command line."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
        except ValueError:
            return text, 1.0
        if value < 0 or not math.isfinite(value):
            raise MurmurError(f"--chat-jsonl {text}: the weight must be a non-negative number")
        return path, value
    return text, 1.0


def read_chat_jsonl(path: str | Path, counts: dict[str, int]) -> Iterator[tuple[str, list[dict[str, str]], str]]:
    """(key, messages, split) for each usable line of an OpenAI `messages` JSONL file; the reasons for lines
    that cannot be used are counted in `counts`."""
    path = Path(path)
    if not path.is_file():
        raise MurmurError(f"chat source {path} not found; pass a JSONL file with one {{\"messages\": [...]}} "
                          "object per line")
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                counts["bad_json"] = counts.get("bad_json", 0) + 1
                continue
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                counts["no_messages"] = counts.get("no_messages", 0) + 1
                continue
            clean = []
            for m in messages:
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                if m.get("role") in CHAT_ROLES and isinstance(content, str):
                    clean.append({"role": m["role"], "content": content})
            if len(clean) != len(messages):
                counts["bad_message"] = counts.get("bad_message", 0) + 1
                continue
            if not any(m["role"] == "assistant" for m in clean):
                counts["no_assistant"] = counts.get("no_assistant", 0) + 1
                continue
            split = record.get("split", "train")
            if split not in SPLITS:
                split = "train"
            yield f"{path.name}:{number}", clean, split


def _fingerprint(data_dir: Path, tokenizer: ChatTokenizer, cfg, chat_sources: list[tuple[str, float]],
                 kinds: tuple[str, ...] = KINDS) -> str:
    """What the shards are made from: the data, the vocabulary, every tokenizer setting (a new one included
    without a list to edit) and the chat sources, which the caller may pass instead of `cfg.chat_sources`."""
    return digest({
        "data": {name: sha256_file(data_dir / name) if (data_dir / name).is_file() else None
                 for name in ("posts.parquet", "conversations.parquet")},
        "vocab": tokenizer.vocab_hash(),
        "settings": settings_by_key(cfg, ignore=["chat_sources"]),
        "chat_sources": [[path, weight, sha256_file(Path(path)) if Path(path).is_file() else None]
                         for path, weight in chat_sources],
        **({} if kinds == KINDS else {"kinds": list(kinds)}),  # the default keeps older fingerprints valid
    })



def tokenize_corpus(data_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, cfg,
                    chat_sources: list[tuple[str, float]] | None = None, force: bool = False,
                    kinds: tuple[str, ...] = KINDS) -> dict[str, Any]:
    """Write the tokens folder `out_dir` from a data folder and a tokenizer folder (see the module docstring).

    `cfg` is a TokenizerSettings; `chat_sources` (path, weight) pairs override `cfg.chat_sources`; `kinds` the
    shards to write (pretraining, chat finetuning). Skips the work when `out_dir` already holds shards of the
    same inputs and settings, unless `force`."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise MurmurError(f"unknown shard kinds {unknown or list(kinds)}; use {', '.join(KINDS)}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    tokenizer = ChatTokenizer.load(tokenizer_dir)
    if chat_sources is None:
        chat_sources = [(s.path, s.weight) for s in cfg.chat_sources]
    for name in ("posts.parquet", "conversations.parquet"):
        if not (data_dir / name).is_file():
            raise MurmurError(f"{data_dir / name} not found; run `murmur data` first (or pass --data DIR)")
    fingerprint = _fingerprint(data_dir, tokenizer, cfg, chat_sources, kinds)
    if not force and (out_dir / "manifest.json").is_file():
        try:
            old = read_manifest(out_dir)
        except MurmurError:
            old = {}
        if old.get("fingerprint") == fingerprint:
            return {**old.get("summary", {}), "tokens_dir": str(out_dir), "skipped": True}

    # Millions of short id lists and no reference cycles: the cyclic collector would only rescan them.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        # Durable: the manifest and the swap survive a crash (a shard lost with it fails its checksum on reading).
        with staged_dir(out_dir, durable=True) as tmp:
            summary = _write_all(data_dir, tokenizer, tmp, cfg, chat_sources, kinds)
            manifest = new_manifest(tokenizer.vocab_size, tokenizer.vocab_hash(), tokenizer.eos_id)
            manifest["splits"] = summary.pop("splits")
            manifest["fingerprint"] = fingerprint
            manifest["summary"] = summary
            manifest["sources"] = {"data": str(data_dir), "tokenizer": str(tokenizer_dir),
                                   "chat_sources": [{"path": p, "weight": w} for p, w in chat_sources]}
            shutil.copyfile(Path(tokenizer_dir) / "tokenizer.json", tmp / "tokenizer.json")
            write_manifest(tmp, manifest)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {**summary, "tokens_dir": str(out_dir)}


def _write_all(data_dir: Path, tokenizer: ChatTokenizer, out: Path, cfg,
               chat_sources: list[tuple[str, float]], kinds: tuple[str, ...]) -> dict[str, Any]:

    dtype = dtype_for_vocab(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    writers = {(kind, split): ShardWriter(out, kind, split, dtype, kind == "sft", cfg.shard_tokens)
               for kind in kinds for split in SPLITS}
    pretraining = "pretrain" in kinds
    unused: dict[str, int] = {}

    pieces = PieceEncoder(tokenizer)

    def add_pretrain(split, texts, post_ids, source):
        if not pretraining:
            return
        for text, ids, posts in zip(texts, tokenizer.encode_batch(texts, specials_as_text=True), post_ids):
            if ids:
                writers["pretrain", split].add([eos] + ids, None, posts, len(text.encode("utf-8")), source)

    def add_sft(split, chats, post_ids, source):
        if "sft" not in kinds:
            return
        for chat, (ids, mask), posts in zip(chats, tokenizer.render_chats_with_masks(chats), post_ids):
            trained = sum(len(m["content"].encode("utf-8")) for m in chat if m["role"] == "assistant")
            writers["sft", split].add([eos] + ids, [0] + mask, posts, trained, source)

    def thread_batch(batch) -> tuple[list, list, list, list, list, list]:
        """Pretraining pieces and chats of one record batch of threads, each tagged with its split."""
        cols = batch.to_pydict()
        docs, doc_meta, chats, chat_meta = [], [], [], []
        for conv_id, split, turns, posts in zip(cols["id"], cols["split"], cols["turns"], cols["post_ids"]):
            posts = posts or []
            in_threads.update(posts)
            if split not in SPLITS:
                unused["unknown_split"] = unused.get("unknown_split", 0) + 1
                continue
            parts = [t["text"] for t in turns or [] if t.get("text")]
            if parts and pretraining:
                docs.append(parts)
                doc_meta.append((split, posts))
            for k, chat in enumerate(thread_chat_parts(turns or [], cfg.sft_roles) if "sft" in kinds else []):
                for _ in range(copies(cfg.thread_weight, f"{conv_id}:{k}", cfg.seed)):
                    chats.append(chat)
                    chat_meta.append((split, posts))
        return docs, doc_meta, chats, chat_meta

    def write_threads(prepared, encoded) -> None:
        docs, doc_meta, chats, chat_meta = prepared
        doc_ids, rendered = encoded
        for parts, ids, (split, posts) in zip(docs, doc_ids, doc_meta):
            text = "\n".join(parts)
            if ids:
                writers["pretrain", split].add([eos] + ids, None, posts, len(text.encode("utf-8")), "thread")
        for chat, (ids, mask), (split, posts) in zip(chats, rendered, chat_meta):
            # UTF-8 bytes of the assistant contents: their parts plus the newlines joining them.
            trained = sum(sum(len(p.encode("utf-8")) for p in m["parts"]) + len(m["parts"]) - 1
                          for m in chat if m["role"] == "assistant")
            writers["sft", split].add([eos] + ids, [0] + mask, posts, trained, "thread")

    in_threads: set[str] = set()
    threads = open_parquet(data_dir / "conversations.parquet", ["id", "split", "turns", "post_ids"])
    for batch in threads.iter_batches(columns=["id", "split", "turns", "post_ids"], batch_size=BATCH):
        prepared = thread_batch(batch)
        write_threads(prepared, pieces.encode(prepared[0], prepared[2]))

    posts_file = open_parquet(data_dir / "posts.parquet", ["id", "text", "split"])
    # Posts outside every thread are pretraining documents only.
    for batch in posts_file.iter_batches(columns=["id", "text", "split"], batch_size=BATCH * 4) if pretraining else []:
        cols = batch.to_pydict()
        by_split_posts: dict[str, tuple[list, list]] = {}
        for post_id, text, split in zip(cols["id"], cols["text"], cols["split"]):
            if post_id in in_threads or not text:
                continue
            if split not in SPLITS:
                unused["unknown_split"] = unused.get("unknown_split", 0) + 1
                continue
            texts, ids = by_split_posts.setdefault(split, ([], []))
            texts.append(text)
            ids.append([post_id])
        for split, (texts, ids) in by_split_posts.items():
            add_pretrain(split, texts, ids, "post")

    for path, weight in chat_sources:
        pending: dict[str, list] = {}
        source = f"jsonl:{Path(path).name}"
        for key, messages, split in read_chat_jsonl(path, unused):
            for _ in range(copies(weight, key, cfg.seed)):
                pending.setdefault(split, []).append(messages)
            if sum(len(v) for v in pending.values()) >= BATCH:
                for s, chats in pending.items():
                    add_sft(s, chats, [[] for _ in chats], source)
                pending = {}
        for s, chats in pending.items():
            add_sft(s, chats, [[] for _ in chats], source)

    splits: dict[str, dict[str, Any]] = {kind: {} for kind in kinds}
    for (kind, split), writer in writers.items():
        if writer.documents or split != "test":
            splits[kind][split] = writer.close()
        else:
            writer.close()
            shutil.rmtree(out / kind / split, ignore_errors=True)
    if all(by["train"]["documents"] == 0 for by in splits.values()):
        raise MurmurError(f"no training documents in {data_dir}: the train split of posts.parquet and "
                          "conversations.parquet is empty; check the data stage's split settings")
    totals = {f"{kind}/{split}": {"documents": e["documents"], "tokens": e["tokens"]}
              for kind, by in splits.items() for split, e in by.items()}
    return {**{f"{kind}_train_tokens": splits[kind]["train"]["tokens"] for kind in kinds},
            "documents": sum(e["documents"] for by in splits.values() for e in by.values()),
            "splits": splits, "counts": totals, "unused": unused}


def run_stage(settings, run_dir: str | Path) -> dict[str, Any]:
    """The `tokenize` stage: run_dir/data + run_dir/tokenizer -> run_dir/tokens."""
    run_dir = Path(run_dir)
    kinds = ("sft",) if getattr(settings.model, "base", None) else KINDS  # a base model is never pretrained here
    return tokenize_corpus(run_dir / "data", run_dir / "tokenizer", run_dir / "tokens", settings.tokenizer,
                           kinds=kinds)

