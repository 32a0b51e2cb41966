"""Hugging Face checkpoint import and export (Llama, Mistral, Qwen2, Qwen3), through safetensors only.

A Hugging Face directory holds `config.json`, the weights in `model.safetensors` or in shards listed
by `model.safetensors.index.json`, and usually a tokenizer. Murmur's parameter names are Hugging
Face's without the `model.` prefix, so the weight mapping is a rename. Pickled weights
(`pytorch_model.bin`) are refused: unpickling a file a user hands in can run arbitrary code.

A directory may come from anyone: every file is read only if it resolves inside the directory
(murmur.confine), config.json values are checked for kind and range and named when wrong, and the
layer count is checked against the weights before a model (even on the meta device) is built.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from murmur.confine import confined, folder_root, relative_name
from murmur.errors import MurmurError
from murmur.files import staged_dir
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
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(data, dict) and "model_type" in data


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise MurmurError(f"{directory} is not a directory; pass a Hugging Face model directory or a Murmur run")
    path = directory / "config.json"
    if not path.is_file():
        raise MurmurError(f"{directory} has no config.json; a Hugging Face model directory needs one")
    try:
        config = json.loads(confined(folder_root(directory), path, "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MurmurError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise MurmurError(f"{path} must hold a JSON object (found a {type(config).__name__})")
    return config


_LARGEST = 2**31 - 1  # no dimension, length or window of a real model comes near it


def _value(config: dict[str, Any], key: str, kinds: tuple[type, ...], source: str, default: Any = None,
           label: str | None = None) -> Any:
    """config[key], or `default` when absent or null, provided it is of `kinds` (a bool is not a number
    here) and, for numbers, finite and within 0.._LARGEST."""
    value = config.get(key)
    if value is None:
        return default
    label = label or key
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise MurmurError(f"{source}: {label} is {value!r:.80}; expected {' or '.join(k.__name__ for k in kinds)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and not (math.isfinite(value) and 0 <= value <= _LARGEST):
        raise MurmurError(f"{source}: {label} is {value!r:.80}; expected a finite number from 0 to {_LARGEST}")
    return value


def _required(config: dict[str, Any], key: str, source: str, label: str | None = None) -> Any:
    value = _value(config, key, (int, float), source, label=label)
    if value is None:
        raise MurmurError(f"{source}: missing {label or key}")
    return value


def _rope_from_hf(config: dict[str, Any], source: str = "config.json") -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); older versions `rope_theta` + `rope_scaling`.
    params = _value(config, "rope_parameters", (dict,), source, {})
    theta = float(_value(params, "rope_theta", (int, float), source, label="rope_parameters.rope_theta")
                  or _value(config, "rope_theta", (int, float), source, 10000.0))
    scaling_key = "rope_scaling"
    scaling = _value(config, "rope_scaling", (dict,), source)
    if not scaling and params.get("rope_type") not in (None, "default"):
        scaling, scaling_key = params, "rope_parameters"
    if not scaling:
        return theta, None
    kind = _value(scaling, "rope_type", (str,), source, label=f"{scaling_key}.rope_type") \
        or _value(scaling, "type", (str,), source, label=f"{scaling_key}.type")
    if kind in (None, "default"):
        return theta, None

    def number(key: str) -> float:
        return _required(scaling, key, source, label=f"{scaling_key}.{key}")

    try:
        if kind == "llama3":
            return theta, RopeScaling(
                type="llama3", factor=number("factor"), low_freq_factor=number("low_freq_factor"),
                high_freq_factor=number("high_freq_factor"),
                original_max_seq_len=int(number("original_max_position_embeddings")))
        if kind == "linear":
            return theta, RopeScaling(type="linear", factor=number("factor"))
    except ValueError as err:
        raise MurmurError(f"{source}: {scaling_key}: {err}") from None
    raise MurmurError(f"{source}: rope scaling type {kind!r:.80} is not supported; supported: default, linear, llama3")


def settings_from_hf_config(config: dict[str, Any], source: str = "config.json") -> ModelSettings:
    """ModelSettings equivalent to a Hugging Face config, or an error naming what is unsupported."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise MurmurError(f"{source}: model_type {model_type!r:.80} is not supported; supported: "
                          f"{', '.join(SUPPORTED_TYPES)}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise MurmurError(f"{source}: hidden_act {act!r:.80} is not supported; Murmur's MLP is SwiGLU (silu)")
    if config.get("mlp_bias"):
        raise MurmurError(f"{source}: mlp_bias=true is not supported")
    if model_type in ("llama", "mistral") and config.get("attention_bias"):
        raise MurmurError(f"{source}: attention_bias=true on {model_type} (bias on o_proj) is not supported")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if config.get(k) is None]
    if missing:
        raise MurmurError(f"{source}: missing {', '.join(missing)}")
    size = {key: _value(config, key, (int,), source) for key in required + (
        "num_key_value_heads", "head_dim", "sliding_window")}
    theta, scaling = _rope_from_hf(config, source)
    max_len = _value(config, "max_position_embeddings", (int,), source, 2048)
    # Sliding-window attention never triggers within the window: capping the context keeps outputs exact.
    window = size["sliding_window"]
    if window and (model_type == "mistral" or config.get("use_sliding_window")):
        max_len = min(max_len, window)
    try:
        return ModelSettings(
            vocab_size=size["vocab_size"], dim=size["hidden_size"], n_layers=size["num_hidden_layers"],
            n_heads=size["num_attention_heads"],
            n_kv_heads=size["num_key_value_heads"] or size["num_attention_heads"],
            head_dim=size["head_dim"], ffn_dim=size["intermediate_size"], max_seq_len=max_len,
            rope_theta=theta, rope_scaling=scaling, norm_eps=_value(config, "rms_norm_eps", (int, float), source, 1e-6),
            qk_norm=model_type == "qwen3", attn_bias=model_type == "qwen2",
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=_value(config, "initializer_range", (int, float), source, 0.02))
    except ValueError as err:
        raise MurmurError(f"{source}: inconsistent shape: {err}") from None


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of `directory`, each resolved and inside it (an index may not name a file elsewhere)."""
    root = folder_root(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(confined(root, index, INDEX_NAME).read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise MurmurError(f"{index} is not a valid safetensors index (needs a weight_map): {err}") from None
        if not isinstance(weight_map, dict):
            raise MurmurError(f"{index}: weight_map must be an object mapping tensor names to shard files")
        names = sorted({relative_name(name, str(index)) for name in weight_map.values()})
        absent = [name for name in names if not (directory / name).is_file()]
        if absent:
            raise MurmurError(f"{index} lists shards that are missing: {', '.join(absent)}")
        return [confined(root, directory / name, f"shard {name} of {INDEX_NAME}") for name in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [confined(root, single, "model.safetensors")]
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


_LAYER_NAME = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def hf_to_murmur_state(tensors: dict[str, torch.Tensor], settings: ModelSettings, source: str) -> dict:
    """Rename Hugging Face tensor names to Murmur's and check every name and shape."""
    # Building even a meta model costs memory per layer: check the count against the weights first.
    layers = {int(m.group(1)) for m in map(_LAYER_NAME.match, tensors) if m}
    if len(layers) != settings.n_layers or layers != set(range(settings.n_layers)):
        raise MurmurError(f"{source}: config.json says num_hidden_layers={settings.n_layers}, the weights hold "
                          f"{len(layers)} layers")
    model = _meta_model(settings, source)
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


def _meta_model(settings: ModelSettings, source: str = "config.json") -> Transformer:
    try:
        with torch.device("meta"):
            return Transformer(settings)
    except (RuntimeError, ValueError, OverflowError) as err:
        raise MurmurError(f"{source}: the settings describe no buildable model: {err}") from None


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
    model.inv_freq = torch.empty(0, device=device)  # not in the state dict: still on meta; init_rope fills it
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


def _tokenizer_json(tokenizer_dir: Path, name: str) -> dict[str, Any]:
    path = confined(folder_root(tokenizer_dir), tokenizer_dir / name, f"tokenizer file {name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MurmurError(f"tokenizer file {tokenizer_dir / name} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise MurmurError(f"tokenizer file {tokenizer_dir / name} must hold a JSON object")
    return data


def special_token_ids(tokenizer_dir: str | Path | None) -> dict[str, int]:
    """bos/eos/pad token ids for config.json, read from a tokenizer directory's tokenizer_config.json.

    Added-token entries that are not {"content": str, "id": int} are ignored: they name no special token."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer_config.json").is_file():
        return {}
    config = _tokenizer_json(Path(tokenizer_dir), "tokenizer_config.json")
    added = _tokenizer_json(Path(tokenizer_dir), "tokenizer.json").get("added_tokens")
    ids = {t["content"]: t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("content"), str)
           and type(t.get("id")) is int} if isinstance(added, list) else {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        token = config.get(key)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token in ids:
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
    with staged_dir(out_dir) as tmp:
        config = hf_config_from_settings(model.settings, special_tokens, out_dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_weights(state, tmp, max_shard_bytes)
        if tokenizer_dir is not None:
            root = folder_root(tokenizer_dir)
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():  # a link out (to a key, say) must not be exported
                    shutil.copy2(confined(root, Path(tokenizer_dir) / name, f"tokenizer file {name}"), tmp / name)
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
