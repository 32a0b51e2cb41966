"""Hugging Face checkpoint import and export (Llama, Mistral, Qwen2, Qwen3), through safetensors only.

A Hugging Face directory holds `config.json`, the weights in `model.safetensors` or in shards listed
by `model.safetensors.index.json`, and usually a tokenizer. Murmur's parameter names are Hugging
Face's without the `model.` prefix, so the weight mapping is a rename. Pickled weights
(`pytorch_model.bin`) are refused: unpickling a file a user hands in can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from murmur.errors import MurmurError
from murmur.model import Transformer
from murmur.settings.model import ModelSettings, RopeScaling

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
INDEX_NAME = "model.safetensors.index.json"


def is_hf_dir(path: str | Path) -> bool:
    """True when `path` looks like a Hugging Face model directory (has config.json with a model_type)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise MurmurError(f"{directory} is not a directory; pass a Hugging Face model directory or a Murmur run")
    path = directory / "config.json"
    if not path.is_file():
        raise MurmurError(f"{directory} has no config.json; a Hugging Face model directory needs one")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MurmurError(f"{path} is not valid JSON: {err}") from None


def _rope_from_hf(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); older versions `rope_theta` + `rope_scaling`.
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (params if params.get("rope_type") not in (None, "default") else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in (None, "default"):
        return float(theta), None
    if kind == "llama3":
        return float(theta), RopeScaling(
            type="llama3", factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_seq_len=scaling["original_max_position_embeddings"])
    if kind == "linear":
        return float(theta), RopeScaling(type="linear", factor=scaling["factor"])
    raise MurmurError(f"config.json: rope scaling type {kind!r} is not supported; supported: default, linear, llama3")


def settings_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelSettings:
    """ModelSettings equivalent to a Hugging Face config, or an error naming what is unsupported."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise MurmurError(f"{source}: model_type {model_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_TYPES)}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise MurmurError(f"{source}: hidden_act {act!r} is not supported; Murmur's MLP is SwiGLU (silu)")
    if config.get("mlp_bias"):
        raise MurmurError(f"{source}: mlp_bias=true is not supported")
    if model_type in ("llama", "mistral") and config.get("attention_bias"):
        raise MurmurError(f"{source}: attention_bias=true on {model_type} (bias on o_proj) is not supported")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in config]
    if missing:
        raise MurmurError(f"{source}: missing {', '.join(missing)}")
    theta, scaling = _rope_from_hf(config)
    max_len = config.get("max_position_embeddings", 2048)
    # Sliding-window attention never triggers within the window: capping the context keeps outputs exact.
    window = config.get("sliding_window")
    if window and (model_type == "mistral" or config.get("use_sliding_window")):
        max_len = min(max_len, window)
    try:
        return ModelSettings(
            vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            head_dim=config.get("head_dim"), ffn_dim=config["intermediate_size"], max_seq_len=max_len,
            rope_theta=theta, rope_scaling=scaling, norm_eps=config.get("rms_norm_eps", 1e-6),
            qk_norm=model_type == "qwen3", attn_bias=model_type == "qwen2",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=config.get("initializer_range", 0.02))
    except ValueError as err:
        raise MurmurError(f"{source}: inconsistent shape: {err}") from None


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise MurmurError(f"{index} is not a valid safetensors index (needs a weight_map): {err}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise MurmurError(f"{index} lists shards that are missing: {', '.join(absent)}")
        return files
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise MurmurError(f"{directory} holds only pickled weights (.bin/.pt); Murmur loads safetensors only. "
                          "Convert them with transformers' save_pretrained(safe_serialization=True)")
    raise MurmurError(f"{directory} has no model.safetensors or {INDEX_NAME}")


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files, with a clear error for a corrupt or truncated file."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise MurmurError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    return tensors


def hf_to_murmur_state(tensors: dict[str, torch.Tensor], settings: ModelSettings, source: str) -> dict:
    """Rename Hugging Face tensor names to Murmur's and check every name and shape."""
    model = _meta_model(settings)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        key = name.removeprefix("model.")
        if key.endswith("rotary_emb.inv_freq"):
            continue  # derived from the config, recomputed by Murmur
        if key == "lm_head.weight" and settings.tie_embeddings:
            continue
        if key not in expected:
            raise MurmurError(f"{source}: unexpected tensor {name!r}; it does not belong to a "
                              f"{settings.n_layers}-layer model of this config")
        if tuple(tensor.shape) != tuple(expected[key]):
            raise MurmurError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                              f"config.json implies {tuple(expected[key])}")
        state[key] = tensor
    if settings.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MurmurError(f"{source}: missing tensors {shown}")
    return state


def _meta_model(settings: ModelSettings) -> Transformer:
    with torch.device("meta"):
        return Transformer(settings)


def build_from_state(settings: ModelSettings, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> Transformer:
    """A model holding exactly `state` (no random init is spent on weights about to be replaced)."""
    model = _meta_model(settings)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    if settings.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if settings.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_rope()
    return model.eval()


def load_hf_model(directory: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = torch.float32) -> tuple[Transformer, ModelSettings]:
    """Load a local Hugging Face directory into Murmur's Transformer."""
    directory = Path(directory)
    config = read_hf_config(directory)
    settings = settings_from_hf_config(config, source=str(directory / "config.json"))
    tensors = read_safetensors(_weight_files(directory))
    state = hf_to_murmur_state(tensors, settings, source=str(directory))
    return build_from_state(settings, state, device=device, dtype=dtype), settings


def hf_config_from_settings(settings: ModelSettings, special_tokens: dict[str, int] | None = None,
                            dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json `transformers` needs to rebuild this model."""
    if settings.qk_norm and settings.attn_bias:
        raise MurmurError("a model with both qk_norm and attn_bias has no Hugging Face equivalent")
    model_type = "qwen3" if settings.qk_norm else "qwen2" if settings.attn_bias else "llama"
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    config: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": settings.vocab_size,
        "hidden_size": settings.dim, "intermediate_size": settings.hidden_dim,
        "num_hidden_layers": settings.n_layers, "num_attention_heads": settings.n_heads,
        "num_key_value_heads": settings.kv_heads, "head_dim": settings.attention_head_dim,
        "max_position_embeddings": settings.max_seq_len, "rms_norm_eps": settings.norm_eps,
        "rope_theta": settings.rope_theta, "tie_word_embeddings": settings.tie_embeddings,
        "hidden_act": "silu", "initializer_range": settings.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    if model_type in ("qwen2", "qwen3"):
        config.update(use_sliding_window=False, sliding_window=None, attention_bias=False if model_type == "qwen3"
                      else True)
    scaling = settings.rope_scaling
    if scaling is not None:
        config["rope_scaling"] = {"rope_type": scaling.type, "factor": scaling.factor}
        if scaling.type == "llama3":
            config["rope_scaling"].update(low_freq_factor=scaling.low_freq_factor,
                                          high_freq_factor=scaling.high_freq_factor,
                                          original_max_position_embeddings=scaling.original_max_seq_len)
    for key, value in (special_tokens or {}).items():
        config[key] = value
    return config


def special_token_ids(tokenizer_dir: str | Path | None) -> dict[str, int]:
    """bos/eos/pad token ids for config.json, read from a tokenizer directory's tokenizer_config.json."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        return {}
    config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text())
    added = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text()).get("added_tokens", [])
    ids = {t["content"]: t["id"] for t in added}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if token in ids:
            out[f"{key}_id"] = ids[token]
    return out


def murmur_to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Murmur's weights under Hugging Face names; a tied head is stored once (as transformers does)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.settings.tie_embeddings:
            continue
        key = name if name == "lm_head.weight" else f"model.{name}"
        state[key] = tensor.detach().to("cpu").contiguous()
    return state


def save_hf_model(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                  special_tokens: dict[str, int] | None = None, max_shard_bytes: int = 5 * 2**30,
                  dtype: torch.dtype | None = None) -> Path:
    """Write `model` as a Hugging Face directory, atomically: the folder appears only when complete.

    Weights larger than `max_shard_bytes` are split into `model-0000i-of-0000n.safetensors` with an
    index, as transformers writes them. Tokenizer files are copied from `tokenizer_dir` when given.
    """
    out_dir = Path(out_dir)
    state = murmur_to_hf_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    out_dtype = next(iter(state.values())).dtype
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = hf_config_from_settings(model.settings, special_tokens, out_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_weights(state, tmp, max_shard_bytes)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_weights(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=metadata)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
