"""Bits per byte on held-out posts: the loss measured in a unit that does not depend on the tokenizer.

Each post is scored as one document, `<|endoftext|> text <|endoftext|>`: every text token and the
closing boundary are predicted (the model must also know where a post ends), the opening boundary
is only context. bpb = total negative log-likelihood in bits / UTF-8 bytes of the texts, so two runs
with different tokenizers compare. A post longer than the model's context is cut into windows that
overlap by one token, so every token is still predicted exactly once.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from murmur.errors import MurmurError
from murmur.eval.scoring import sequence_logprobs


@dataclass
class BitsPerByte:
    """Totals of one scored split; bpb and loss derive from them."""

    posts: int
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the texts
    nats: float  # summed negative log-likelihood

    @property
    def loss(self) -> float:
        """Mean cross-entropy per predicted token, in nats (what the trainer logs)."""
        return self.nats / self.tokens

    @property
    def bpb(self) -> float:
        """Bits per UTF-8 byte: mean loss × tokens / (ln 2 × bytes)."""
        return self.loss * self.tokens / (math.log(2) * self.bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "loss": self.loss, "bpb": self.bpb}


def document_windows(ids: list[int], max_len: int) -> list[list[int]]:
    """Cut a token list into windows of at most max_len tokens, each starting at the previous one's
    last token, so that every token after the first is predicted exactly once."""
    if max_len < 2:
        raise ValueError("a window must hold at least two tokens")
    windows, start = [], 0
    while True:
        windows.append(ids[start:start + max_len])
        if start + max_len >= len(ids):
            return windows
        start += max_len - 1


def bits_per_byte(model, tokenizer, texts: list[str], batch_size: int = 32) -> BitsPerByte:
    """Score `texts` as separate documents and return their totals."""
    texts = [t for t in texts if t]
    if not texts:
        raise MurmurError("no non-empty texts to compute bits per byte on")
    eos = tokenizer.eos_id
    sequences: list[list[int]] = []
    for ids in tokenizer.encode_batch(texts):
        sequences.extend(document_windows([eos, *ids, eos], model.settings.max_seq_len))
    logps = sequence_logprobs(model, sequences, [1] * len(sequences), batch_size=batch_size)
    nats = -sum(float(lp.sum()) for lp in logps)
    tokens = sum(len(lp) for lp in logps)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return BitsPerByte(posts=len(texts), tokens=tokens, bytes=n_bytes, nats=nats)


def read_split_posts(data_dir: str | Path, split: str, max_posts: int, seed: int = 0) -> list[str]:
    """Texts of the posts of one split of `data_dir/posts.parquet`: all of them, or a fixed seeded
    sample of `max_posts` in file order, so that every run is scored on the same posts."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(data_dir) / "posts.parquet"
    if not path.is_file():
        raise MurmurError(f"{path} not found; run `murmur data` first or pass --data DIR")
    table = pq.read_table(path, columns=["text", "split"])
    texts = [t for t in table.filter(pc.equal(table["split"], split))["text"].to_pylist() if t]
    if not texts:
        raise MurmurError(f"{path} has no posts in the '{split}' split; held-out posts are needed for bits per "
                          "byte (check the data stage's split fractions, or set eval.bpb_splits)")
    if len(texts) > max_posts:
        keep = sorted(random.Random(seed).sample(range(len(texts)), max_posts))
        texts = [texts[i] for i in keep]
    return texts
