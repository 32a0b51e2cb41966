"""Token shards on disk, the document index behind them, and the resumable distributed loader.

Layout of a tokens folder (see docs/tokenizer.md):

    tokens/manifest.json                 dtype, vocabulary, per split: tokens, documents, bytes, shard checksums
    tokens/tokenizer.json                the tokenizer the shards were written with (audits re-encode with it)
    tokens/{pretrain,sft}/{train,validation}/shard_00000.bin        flat token ids (uint16 or uint32)
                                            shard_00000.mask.bin   sft only: 1 byte per token, 1 = trained
                                            index.parquet          one row per document: shard, offset,
                                                                   length, bytes, source, post_ids

The manifest is the commit point: readers only follow the files it names, and every writer (the tokenize
stage, `write_shards`, `purge_documents`) writes new files first and replaces the manifest last, durably (fsynced).
Shard and index files are written atomically but not fsynced (one flush each would cost more than the data):
a crash that loses one is caught by its checksum in the manifest, and the loader asks for `murmur tokenize`.

    loader = TokenLoader("runs/demo/tokens", kind="pretrain", split="train", seq_len=256, batch_size=8,
                         rank=rank, world_size=world, seed=0)
    for batch in loader: ...                  # {"inputs": LongTensor[B, T], "targets": LongTensor[B, T]}
    state = loader.state_dict()               # JSON; load_state_dict(state) resumes at the next batch
"""

from __future__ import annotations

import hashlib
import json
import mmap
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from murmur.errors import MurmurError
from murmur.files import atomic_path, write_atomic, write_json_atomic, write_table_atomic

MANIFEST = "manifest.json"
FORMAT = "murmur-tokens/1"
KINDS = ("pretrain", "sft")
IGNORE_INDEX = -100
DEFAULT_SHARD_TOKENS = 1 << 26
# Texts shorter than this are audited through the provenance index only: a few tokens match anywhere.
MIN_AUDIT_TOKENS = 10


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---- manifest ----------------------------------------------------------------------------------

def read_manifest(tokens_dir: str | Path) -> dict[str, Any]:
    """The manifest of a tokens folder, or a clear error when there is none."""
    path = Path(tokens_dir) / MANIFEST
    if not path.is_file():
        raise MurmurError(f"{path} not found; run `murmur tokenize` first (or pass the tokens folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MurmurError(f"{path} is not valid JSON ({err}); rerun `murmur tokenize`") from None
    if manifest.get("format") != FORMAT:
        raise MurmurError(f"{path} is not a Murmur tokens manifest (format {manifest.get('format')!r}, expected "
                          f"{FORMAT!r}); rerun `murmur tokenize`")
    return manifest


def write_manifest(tokens_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically and durably: it is the commit point of every change to the folder."""
    write_json_atomic(Path(tokens_dir) / MANIFEST, manifest, durable=True)


def split_entry(manifest: dict[str, Any], kind: str, split: str) -> dict[str, Any]:
    """The manifest entry of one kind/split, or an error listing what the folder holds."""
    entry = manifest.get("splits", {}).get(kind, {}).get(split)
    if entry is None:
        held = [f"{k}/{s}" for k, splits in manifest.get("splits", {}).items() for s in splits]
        raise MurmurError(f"the tokens folder has no {kind}/{split} shards (it has: {', '.join(held) or 'none'}); "
                          "rerun `murmur tokenize` or pick another split")
    return entry


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_split(tokens_dir: str | Path, entry: dict[str, Any]) -> list[str]:
    """Problems with the files of one split: missing, wrong size, or a checksum that does not match."""
    tokens_dir = Path(tokens_dir)
    problems = []
    for shard in entry["shards"]:
        for key, sha_key in (("file", "sha256"), ("mask_file", "mask_sha256")):
            if not shard.get(key):
                continue
            path = tokens_dir / shard[key]
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif sha256_file(path) != shard[sha_key]:
                problems.append(f"{path} does not match its checksum in the manifest (corrupted or edited)")
    index = tokens_dir / entry["index"]
    if not index.is_file():
        problems.append(f"{index} is missing")
    elif sha256_file(index) != entry["index_sha256"]:
        problems.append(f"{index} does not match its checksum in the manifest")
    return problems


# ---- file names and the document index (the one definition the writer and the purge share) ------

def _generation_suffix(generation: int) -> str:
    return f".g{generation}" if generation else ""


def shard_file_names(split_dir: str | Path, number: int, generation: int = 0) -> tuple[str, str]:
    """Relative names of shard `number`'s ids and loss mask in one kind/split folder ("pretrain/train")."""
    stem = Path(split_dir) / f"shard_{number:05d}{_generation_suffix(generation)}"
    return f"{stem}.bin", f"{stem}.mask.bin"


def index_file_name(split_dir: str | Path, generation: int = 0) -> str:
    """Relative name of the document index of one kind/split folder."""
    return str(Path(split_dir) / f"index{_generation_suffix(generation)}.parquet")


# The document index: one row per document, in stream order. post_ids is the provenance the purge follows.
INDEX_COLUMNS = ("doc", "shard", "offset", "length", "bytes", "source", "post_ids")


def index_schema():
    import pyarrow as pa

    return pa.schema([("doc", pa.int64()), ("shard", pa.int32()), ("offset", pa.int64()), ("length", pa.int64()),
                      ("bytes", pa.int64()), ("source", pa.string()), ("post_ids", pa.list_(pa.string()))])


def write_index(path: Path, columns: dict[str, list]) -> str:
    """Write the document index (a list per column of INDEX_COLUMNS) atomically; its sha256."""
    import pyarrow as pa

    write_table_atomic(pa.table({name: columns[name] for name in INDEX_COLUMNS}, schema=index_schema()), path)
    return sha256_file(path)


# ---- writing -----------------------------------------------------------------------------------

class ShardWriter:
    """Streams documents of one kind/split into shard files of about `shard_tokens` tokens each.

    Memory holds at most one shard's tokens plus the document index rows."""

    def __init__(self, tokens_dir: str | Path, kind: str, split: str, dtype: np.dtype, with_mask: bool,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, generation: int = 0):
        if kind not in KINDS:
            raise MurmurError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.tokens_dir = Path(tokens_dir)
        self.rel_dir = f"{kind}/{split}"
        (self.tokens_dir / self.rel_dir).mkdir(parents=True, exist_ok=True)
        self.kind, self.split = kind, split
        self.dtype = np.dtype(dtype)
        self.limit = np.iinfo(self.dtype).max
        self.with_mask = with_mask
        self.shard_tokens = shard_tokens
        self.generation = generation
        self.shards: list[dict[str, Any]] = []
        self.rows: dict[str, list] = {name: [] for name in INDEX_COLUMNS}
        self._ids: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._fill = 0
        self._docs_in_shard = 0
        self.tokens = self.documents = self.bytes = self.target_tokens = 0

    def add(self, ids: Sequence[int] | np.ndarray, mask: Sequence[int] | np.ndarray | None = None,
            post_ids: Sequence[str] = (), nbytes: int = 0, source: str = "") -> None:
        """Append one document (its ids already include any boundary token)."""
        if len(ids) == 0:
            return
        try:
            if isinstance(ids, np.ndarray):
                if ids.min() < 0 or ids.max() > self.limit:
                    raise OverflowError
                arr = ids.astype(self.dtype, copy=False)
            else:  # numpy refuses Python ints that do not fit the dtype
                arr = np.array(ids, dtype=self.dtype)
        except OverflowError:
            raise MurmurError(f"token id out of range for {self.dtype} shards (ids must lie in 0..{self.limit})") \
                from None
        if self.with_mask:
            if mask is None or len(mask) != len(arr):
                raise MurmurError("sft documents need a loss mask of the same length as their ids")
            m = np.asarray(mask, dtype=np.uint8)
            self._masks.append(m)
            self.target_tokens += int(m.sum())
        self._ids.append(arr)
        rows = self.rows
        rows["doc"].append(self.documents)
        rows["shard"].append(len(self.shards))
        rows["offset"].append(self._fill)
        rows["length"].append(len(arr))
        rows["bytes"].append(int(nbytes))
        rows["source"].append(source)
        rows["post_ids"].append([str(p) for p in post_ids])
        self._fill += len(arr)
        self._docs_in_shard += 1
        self.tokens += len(arr)
        self.documents += 1
        self.bytes += int(nbytes)
        if self._fill >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._ids:
            return
        ids_name, mask_name = shard_file_names(self.rel_dir, len(self.shards), self.generation)
        entry = {"file": ids_name, "tokens": self._fill, "documents": self._docs_in_shard}
        entry["sha256"] = _write_array(self.tokens_dir / entry["file"], self._ids)
        if self.with_mask:
            entry["mask_file"] = mask_name
            entry["mask_sha256"] = _write_array(self.tokens_dir / entry["mask_file"], self._masks)
        self.shards.append(entry)
        self._ids, self._masks, self._fill, self._docs_in_shard = [], [], 0, 0

    def close(self) -> dict[str, Any]:
        """Write the last shard and the document index; the manifest entry of this split."""
        self._flush()
        index_rel = index_file_name(self.rel_dir, self.generation)
        index_sha = write_index(self.tokens_dir / index_rel, self.rows)
        entry = {"kind": self.kind, "split": self.split, "tokens": self.tokens, "documents": self.documents,
                 "bytes": self.bytes, "index": index_rel, "index_sha256": index_sha, "shards": self.shards}
        if self.with_mask:
            entry["target_tokens"] = self.target_tokens
        return entry


def _write_array(path: Path, parts: list[np.ndarray]) -> str:
    """Write arrays back to back to `path` atomically; their sha256."""
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for part in parts:
            data = np.ascontiguousarray(part).tobytes()
            digest.update(data)
            f.write(data)
    return digest.hexdigest()


def new_manifest(vocab_size: int, vocab_hash: str | None = None, boundary_id: int | None = None) -> dict[str, Any]:
    """An empty manifest for shards of a vocabulary of `vocab_size` ids."""
    return {"format": FORMAT, "dtype": dtype_for_vocab(vocab_size).name, "vocab_size": int(vocab_size),
            "vocab_hash": vocab_hash, "boundary_id": boundary_id, "splits": {}}


def write_shards(tokens_dir: str | Path, documents: Iterable[Sequence[int]], *, vocab_size: int,
                 kind: str = "pretrain", split: str = "train", masks: Iterable[Sequence[int]] | None = None,
                 post_ids: Iterable[Sequence[str]] | None = None, doc_bytes: Iterable[int] | None = None,
                 boundary_id: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    """Write one kind/split of a tokens folder from lists of token ids (no Parquet, no tokenizer needed).

    documents: token ids per document. With `boundary_id` each document is prefixed by that id (mask 0),
    as the tokenize stage does with `<|endoftext|>`; without it documents are stored as given.
    masks: sft only, 1 where a loss is taken, one per document. post_ids: source post ids per document
    (the provenance index). doc_bytes: UTF-8 bytes of each document's text (for bits per byte).
    Replaces that split if present and updates manifest.json; returns the split's manifest entry.
    """
    tokens_dir = Path(tokens_dir)
    tokens_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = tokens_dir / MANIFEST
    manifest = read_manifest(tokens_dir) if manifest_path.is_file() else new_manifest(vocab_size, None, boundary_id)
    if manifest["vocab_size"] != vocab_size:
        raise MurmurError(f"{manifest_path} holds shards of vocab_size {manifest['vocab_size']}, not {vocab_size}; "
                          "write to another folder")
    with_mask = kind == "sft"
    if with_mask and masks is None:
        raise MurmurError("sft shards need masks (1 where the loss is taken)")
    old = manifest["splits"].get(kind, {}).get(split)
    generation = _next_generation(old)
    writer = ShardWriter(tokens_dir, kind, split, dtype_for_vocab(vocab_size), with_mask, shard_tokens,
                         generation=generation)
    mask_iter = iter(masks) if masks is not None else None
    post_iter = iter(post_ids) if post_ids is not None else None
    bytes_iter = iter(doc_bytes) if doc_bytes is not None else None
    for ids in documents:
        mask = list(next(mask_iter)) if mask_iter is not None else None
        ids = list(ids)
        if boundary_id is not None:
            ids = [boundary_id] + ids
            mask = [0] + mask if mask is not None else None
        writer.add(ids, mask if with_mask else None, next(post_iter) if post_iter is not None else (),
                   next(bytes_iter) if bytes_iter is not None else 0)
    entry = writer.close()
    if tokenizer_dir is not None:
        _copy_tokenizer_file(tokenizer_dir, tokens_dir)
    manifest["splits"].setdefault(kind, {})[split] = entry
    write_manifest(tokens_dir, manifest)
    if old is not None:
        _remove_split_files(tokens_dir, old, keep=entry)
    return entry


def _next_generation(old: dict[str, Any] | None) -> int:
    """File names carry a generation so that a rewrite never overwrites a file the manifest still names."""
    if old is None:
        return 0
    names = [s["file"] for s in old["shards"]] + [old["index"]]
    gens = [int(part[1:]) for name in names for part in Path(name).name.split(".")
            if part.startswith("g") and part[1:].isdigit()]
    return max(gens, default=0) + 1


def _remove_split_files(tokens_dir: Path, old: dict[str, Any], keep: dict[str, Any]) -> None:
    kept = {s.get(k) for s in keep["shards"] for k in ("file", "mask_file")} | {keep["index"]}
    for name in [s.get(k) for s in old["shards"] for k in ("file", "mask_file")] + [old["index"]]:
        if name and name not in kept:
            (tokens_dir / name).unlink(missing_ok=True)


def _copy_tokenizer_file(tokenizer_dir: str | Path, tokens_dir: Path) -> None:
    write_atomic(tokens_dir / "tokenizer.json", lambda tmp: shutil.copyfile(Path(tokenizer_dir) / "tokenizer.json", tmp))


# ---- reading -----------------------------------------------------------------------------------

class TokenStream:
    """The shards of one kind/split as one memory-mapped stream of ids (and loss mask for sft)."""

    def __init__(self, tokens_dir: str | Path, kind: str, split: str, verify: bool = True):
        self.tokens_dir = Path(tokens_dir)
        self.manifest = read_manifest(self.tokens_dir)
        self.entry = split_entry(self.manifest, kind, split)
        if verify:
            problems = verify_split(self.tokens_dir, self.entry)
            if problems:
                raise MurmurError(f"{problems[0]}; rerun `murmur tokenize` to rebuild the shards")
        dtype = np.dtype(self.manifest["dtype"])
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] | None = [] if kind == "sft" else None
        for shard in self.entry["shards"]:
            path = self.tokens_dir / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise MurmurError(f"{path} is missing or has the wrong size for {shard['tokens']} tokens; "
                                  "rerun `murmur tokenize`")
            self.ids.append(_memmap(path, dtype, shard["tokens"]))
            if self.masks is not None:
                self.masks.append(_memmap(self.tokens_dir / shard["mask_file"], np.uint8, shard["tokens"]))
        self.starts = np.cumsum([0] + [len(a) for a in self.ids])
        self.size = int(self.starts[-1])

    def read(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Ids [start, start+length) of the stream (and the mask for sft), across shard borders."""
        out = np.empty(length, dtype=np.int64)
        mask = np.empty(length, dtype=np.uint8) if self.masks is not None else None
        pos, end = start, start + length
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while pos < end:
            lo = pos - self.starts[shard]
            take = min(end - pos, len(self.ids[shard]) - lo)
            out[pos - start:pos - start + take] = self.ids[shard][lo:lo + take]
            if mask is not None:
                mask[pos - start:pos - start + take] = self.masks[shard][lo:lo + take]
            pos += take
            shard += 1
        return out, mask


def _memmap(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def shuffled_index(i: int, n: int, key: int) -> int:
    """Position i of a pseudo-random permutation of range(n) chosen by `key`, in O(1) memory.

    A 4-round Feistel network is a bijection on 2^(2h) >= n values; walking the cycle until the value falls
    below n restricts it to a bijection of range(n) (under 4 steps on average). Unlike a stored permutation
    this costs nothing per window, so a loader over 10^12 tokens needs no gigabytes of indices."""
    if n <= 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & low
        for round_ in range(4):
            left, right = right, left ^ (_mix64(right ^ _mix64(key * 4 + round_)) & low)
        x = (left << half) | right
        if x < n:
            return x


class TokenLoader:
    """Fixed-length windows over the concatenated token stream of one kind/split, for one rank.

    Window w covers stream positions [w*seq_len, w*seq_len + seq_len + 1): inputs are its first seq_len
    ids, targets the last seq_len, so every token after the first is a target exactly once per epoch.
    For sft, targets are -100 where the mask is 0 (everything but assistant content and its <|im_end|>).

    Order: with loop=True, the global sequence of windows is a permutation per epoch chosen by (seed, epoch),
    repeated forever; each step the world consumes batch_size * world_size windows and rank r takes the r-th slice.
    The state is the global position in that sequence, so it resumes exactly at the next batch under any
    world size or batch size. With loop=False windows come in stream order, once each; the last window is
    padded (targets -100) so every token is predicted once: sum the loss over all targets != -100 and
    divide by ln 2 and by `text_bytes` for bits per byte.
    """

    def __init__(self, tokens_dir: str | Path, kind: str = "pretrain", split: str = "train", seq_len: int = 256,
                 batch_size: int = 8, rank: int = 0, world_size: int = 1, seed: int = 0, loop: bool = True,
                 verify: bool = True):
        if kind not in KINDS:
            raise MurmurError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if seq_len <= 0 or batch_size <= 0:
            raise MurmurError("seq_len and batch_size must be positive")
        if not 0 <= rank < world_size:
            raise MurmurError(f"rank {rank} is outside world_size {world_size}")
        self.kind, self.split, self.seq_len, self.batch_size = kind, split, seq_len, batch_size
        self.rank, self.world_size, self.seed, self.loop = rank, world_size, seed, loop
        self.stream = TokenStream(tokens_dir, kind, split, verify=verify)
        self.pad_id = int(self.stream.manifest.get("boundary_id") or 0)
        n = self.stream.size
        if loop:
            self.num_windows = (n - 1) // seq_len if n > 0 else 0
            if self.num_windows == 0:
                raise MurmurError(f"{kind}/{split} holds {n} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                                  "lower seq_len or add data")
        else:
            self.num_windows = -(-(n - 1) // seq_len) if n > 1 else 0
            if self.num_windows == 0:
                raise MurmurError(f"{kind}/{split} is empty ({n} tokens); check the data split or rerun "
                                  "`murmur tokenize`")
        self.position = 0

    @property
    def tokens(self) -> int:
        """Tokens in this split's stream."""
        return self.stream.size

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the text the split's tokens encode (the denominator of bits per byte)."""
        return int(self.stream.entry.get("bytes", 0))

    def __len__(self) -> int:
        """Batches this rank yields in one pass (loop=False), or per epoch (loop=True)."""
        per_step = self.batch_size * self.world_size
        steps = -(-self.num_windows // per_step) if not self.loop else self.num_windows // per_step
        if self.loop:
            return max(steps, 1)
        last = self.num_windows - (steps - 1) * per_step
        return steps - (1 if last <= self.rank * self.batch_size else 0)

    def _window(self, g: int) -> int:
        if not self.loop:
            return g
        epoch, j = divmod(g, self.num_windows)
        return shuffled_index(j, self.num_windows, (self.seed << 32) ^ epoch)

    def _batch(self, globals_: range) -> dict[str, Any]:
        import torch

        T = self.seq_len
        ids = np.full((len(globals_), T + 1), self.pad_id, dtype=np.int64)
        targets_ok = np.zeros((len(globals_), T + 1), dtype=bool)
        for row, g in enumerate(globals_):
            start = self._window(g) * T
            length = min(T + 1, self.stream.size - start)
            window, mask = self.stream.read(start, length)
            ids[row, :length] = window
            targets_ok[row, :length] = True if mask is None else mask.astype(bool)
        inputs = ids[:, :-1]
        targets = np.where(targets_ok[:, 1:], ids[:, 1:], IGNORE_INDEX)
        return {"inputs": torch.from_numpy(np.ascontiguousarray(inputs)),
                "targets": torch.from_numpy(np.ascontiguousarray(targets))}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        per_step = self.batch_size * self.world_size
        while self.loop or self.position < self.num_windows:
            start = self.position + self.rank * self.batch_size
            end = start + self.batch_size
            if not self.loop:
                end = min(end, self.num_windows)
            self.position += per_step
            if end > start:
                yield self._batch(range(start, end))

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts, in the global (world-size independent) window sequence."""
        return {"version": 1, "kind": self.kind, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
                "loop": self.loop, "position": self.position, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()` of a loader of the same kind, split, seq_len and seed (any world size)."""
        for key in ("kind", "split", "seq_len", "seed", "loop"):
            if key in state and state[key] != getattr(self, key):
                raise MurmurError(f"loader state is for {key}={state[key]!r}, this loader has "
                                  f"{key}={getattr(self, key)!r}; resume with the settings it was saved with")
        self.position = int(state["position"])


# ---- compliance --------------------------------------------------------------------------------

def _read_index(tokens_dir: Path, entry: dict[str, Any]):
    import pyarrow.parquet as pq

    return pq.read_table(tokens_dir / entry["index"])


def _affected_rows(index, deleted: set[str]) -> list[int]:
    post_ids = index.column("post_ids").to_pylist()
    return [i for i, ids in enumerate(post_ids) if ids and not deleted.isdisjoint(ids)]


def audit_deletions(tokens_dir: str | Path, deleted_post_ids: Iterable[str],
                    deleted_texts: Iterable[str] = ()) -> list[str]:
    """Problems that show a deleted post still in the token shards (an empty list means the audit passes).

    Checks every shard's checksum, that no indexed document was built from a deleted post, and that the
    token sequence of each deleted text (of at least MIN_AUDIT_TOKENS tokens, its edge tokens dropped since
    they depend on context) occurs in no shard."""
    tokens_dir = Path(tokens_dir)
    if not (tokens_dir / MANIFEST).is_file():
        return []
    manifest = read_manifest(tokens_dir)
    deleted = {str(p) for p in deleted_post_ids}
    texts = [t for t in deleted_texts if t]
    problems: list[str] = []
    needles: list[tuple[str, bytes]] = []
    if texts:
        tok_path = tokens_dir / "tokenizer.json"
        if not tok_path.is_file():
            problems.append(f"{tok_path} is missing, so deleted texts cannot be searched in the shards; "
                            "rerun `murmur tokenize`")
        else:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tok_path))
            # As the tokenize stage encodes post text: a special token's literal in it is text, not a control token.
            tokenizer.encode_special_tokens = True
            dtype = np.dtype(manifest["dtype"])
            for text, enc in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False)):
                if len(enc.ids) >= MIN_AUDIT_TOKENS:
                    needles.append((text, np.asarray(enc.ids[1:-1], dtype=dtype).tobytes()))
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for kind, splits in manifest.get("splits", {}).items():
        for split, entry in splits.items():
            problems += verify_split(tokens_dir, entry)
            index = _read_index(tokens_dir, entry)
            rows = _affected_rows(index, deleted)
            if rows:
                docs = index.column("doc").to_pylist()
                problems.append(f"{kind}/{split}: {len(rows)} document(s) built from deleted posts remain "
                                f"(doc {', '.join(str(docs[r]) for r in rows[:5])}); run `murmur data purge`")
            for shard in entry["shards"]:
                for text, needle in needles:
                    if _contains_aligned(tokens_dir / shard["file"], needle, itemsize):
                        shown = text[:40] + ("…" if len(text) > 40 else "")
                        problems.append(f"{shard['file']}: holds the tokens of deleted text {shown!r}")
    return problems


def _contains_aligned(path: Path, needle: bytes, itemsize: int) -> bool:
    if not needle or not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        at = mm.find(needle)
        while at >= 0:
            if at % itemsize == 0:
                return True
            at = mm.find(needle, at + 1)
    return False


def purge_documents(tokens_dir: str | Path, deleted_post_ids: Iterable[str]) -> dict[str, Any]:
    """Drop every document built from a deleted post, rewriting only the shards that held one.

    New shard and index files get a new generation name; the manifest is replaced last (atomically), then
    the superseded files are removed. Returns counts and the shards rewritten."""
    tokens_dir = Path(tokens_dir)
    deleted = {str(p) for p in deleted_post_ids}
    summary: dict[str, Any] = {"documents_removed": 0, "tokens_removed": 0, "shards_rewritten": []}
    if not (tokens_dir / MANIFEST).is_file() or not deleted:
        return summary
    manifest = read_manifest(tokens_dir)
    dtype = np.dtype(manifest["dtype"])
    superseded: list[str] = []
    for splits in manifest.get("splits", {}).values():
        for entry in splits.values():
            index = _read_index(tokens_dir, entry)
            rows = set(_affected_rows(index, deleted))
            if not rows:
                continue
            generation = _next_generation(entry)
            split_dir = Path(entry["index"]).parent
            cols = index.to_pydict()
            touched = sorted({cols["shard"][r] for r in rows})
            keep = [i for i in range(index.num_rows) if i not in rows]
            new_offsets = list(cols["offset"])
            for number in touched:
                shard = entry["shards"][number]
                members = [i for i in range(index.num_rows) if cols["shard"][i] == number]
                ids = _memmap(tokens_dir / shard["file"], dtype, shard["tokens"])
                kept_ids, kept_mask, fill = [], [], 0
                masks = _memmap(tokens_dir / shard["mask_file"], np.uint8, shard["tokens"]) \
                    if shard.get("mask_file") else None
                for i in members:
                    if i in rows:
                        continue
                    lo, n = cols["offset"][i], cols["length"][i]
                    kept_ids.append(np.array(ids[lo:lo + n]))
                    if masks is not None:
                        kept_mask.append(np.array(masks[lo:lo + n]))
                    new_offsets[i] = fill
                    fill += n
                removed_tokens = shard["tokens"] - fill
                ids_name, mask_name = shard_file_names(split_dir, number, generation)
                new = {"file": ids_name, "tokens": fill,
                       "documents": shard["documents"] - sum(1 for i in members if i in rows)}
                new["sha256"] = _write_array(tokens_dir / new["file"], kept_ids)
                superseded.append(shard["file"])
                if masks is not None:
                    new["mask_file"] = mask_name
                    new["mask_sha256"] = _write_array(tokens_dir / new["mask_file"], kept_mask)
                    superseded.append(shard["mask_file"])
                entry["shards"][number] = new
                summary["tokens_removed"] += removed_tokens
                summary["shards_rewritten"].append(new["file"])
            removed_rows = sorted(rows)
            cols["offset"] = new_offsets
            index_rel = index_file_name(split_dir, generation)
            index_sha = write_index(tokens_dir / index_rel, {name: [cols[name][i] for i in keep]
                                                             for name in INDEX_COLUMNS})
            superseded.append(entry["index"])
            entry["index"], entry["index_sha256"] = index_rel, index_sha
            entry["tokens"] = sum(s["tokens"] for s in entry["shards"])
            entry["documents"] = len(keep)
            entry["bytes"] -= sum(cols["bytes"][r] for r in removed_rows)
            if "target_tokens" in entry:
                entry["target_tokens"] = int(sum(
                    int(_memmap(tokens_dir / s["mask_file"], np.uint8, s["tokens"]).sum()) for s in entry["shards"]))
            summary["documents_removed"] += len(removed_rows)
    if summary["documents_removed"]:
        write_manifest(tokens_dir, manifest)
        for name in superseded:
            (tokens_dir / name).unlink(missing_ok=True)
    return summary


