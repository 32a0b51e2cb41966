"""Tiny tokenizers, models and live servers for the inference and serving tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from murmur.model import Transformer
from murmur.settings.model import ModelSettings

CORPUS = ["hello world, how are you today? I am fine, thanks for asking.",
          "the quick brown fox jumps over the lazy dog near the river bank",
          "coffee in the morning, music at night, and a long walk in the rain",
          "héllo wörld, naïve café, déjà vu: 日本語のテキスト and emoji 🙂🎉 too",
          "**bold** and `code` and <b>tags</b> in markdown, 1. lists - items"] * 40


def make_tokenizer(directory: Path, vocab_size: int = 320):
    """A byte-level BPE tokenizer with Murmur's chat template, trained on a few sentences."""
    from murmur.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size, directory)


class SlowTransformer(Transformer):
    """The same model, sleeping in every forward pass: makes requests long-lived in tests of cancellation."""

    delay_s = 0.0

    def forward(self, *args, **kwargs):
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().forward(*args, **kwargs)


def make_model(vocab_size: int, seed: int = 0, max_seq_len: int = 256, dim: int = 48, delay_s: float = 0.0
               ) -> Transformer:
    """A random 2-layer model; a wide init makes its logits peaked, so greedy choices are clear-cut.

    A plain Transformer (the engine then decodes through its packed step), or with `delay_s` a SlowTransformer
    (whose own forward the engine calls for every pass)."""
    torch.manual_seed(seed)
    settings = ModelSettings(vocab_size=vocab_size, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=2 * dim,
                             max_seq_len=max_seq_len, init_std=0.3)
    if not delay_s:
        return Transformer(settings).eval()
    model = SlowTransformer(settings).eval()
    model.delay_s = delay_s
    return model


def recite_corpus(model: Transformer, tokenizer, steps: int = 120) -> dict[str, torch.Tensor]:
    """Train `model` to recite the corpus and return its weights (batches drawn from torch's global RNG: seed
    it first): its greedy choices are then decided by clear margins, as a real model's mostly are (a random
    model's top two logits are often within rounding of each other, so a faster or quantized path may flip
    them)."""
    model.train()
    ids = torch.tensor([i for text in CORPUS[:5] for i in tokenizer.encode(text + "\n")])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,)).tolist()
        x = torch.stack([ids[s:s + 32] for s in starts])
        y = torch.stack([ids[s + 1:s + 33] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def naive_greedy(model: Transformer, prompt: list[int], steps: int, stop_ids=()) -> list[int]:
    """The reference decoder: recompute the whole sequence every step, no cache at all."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            ids.append(token)
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A chat tokenizer for the whole module; a test module imports it by name from here."""
    return make_tokenizer(tmp_path_factory.mktemp("tok"))
