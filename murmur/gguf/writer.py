"""GGUF export: a Murmur model as a llama-architecture GGUF (f32, f16 or q8_0) with its tokenizer and chat
template, and an Ollama `Modelfile` beside it, so llama.cpp, Ollama and LM Studio run it directly.

    write_gguf(model, tokenizer_dir, "exported/gguf", quant="q8_0")
    # exported/gguf/model-q8_0.gguf, exported/gguf/Modelfile

Written with the `gguf` package's GGUFWriter (maintained with llama.cpp). The q and k rows are put in
llama.cpp's order (murmur.gguf.layout); norms stay float32 as llama.cpp's converter keeps them; a matrix
whose rows are not whole q8_0 blocks (32 values) is stored as f16.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from murmur.errors import MurmurError
from murmur.files import staged_dir
from murmur.gguf.layout import ARCHITECTURE, ROPE_FREQS, gguf_name, llama3_divisors, metadata_from_settings, permute_qk
from murmur.gguf.tokenizer import metadata_from_tokenizer
from murmur.model import Transformer

QUANTS = ("f32", "f16", "q8_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def gguf_tensors(model: Transformer, quant: str) -> dict[str, tuple[np.ndarray, Any]]:
    """{GGUF name: (array to write, ggml type or None for a plain float array)} for a model's weights."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    settings = model.settings
    out: dict[str, tuple[np.ndarray, Any]] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and settings.tie_embeddings:
            continue  # llama.cpp uses token_embd when output.weight is absent
        weight = tensor.detach().to("cpu", dtype=torch.float32)
        if name.endswith("q_proj.weight"):
            weight = permute_qk(weight, settings.n_heads)
        elif name.endswith("k_proj.weight"):
            weight = permute_qk(weight, settings.kv_heads)
        array = weight.contiguous().numpy()
        if array.ndim == 1 or quant == "f32":
            out[gguf_name(name)] = (array, None)
        elif quant == "q8_0" and array.shape[-1] % 32 == 0:
            out[gguf_name(name)] = (quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        else:
            out[gguf_name(name)] = (array.astype(np.float16), None)
    if settings.rope_scaling is not None and settings.rope_scaling.type == "llama3":
        out[ROPE_FREQS] = (llama3_divisors(settings).numpy(), None)
    return out


def _add_value(writer, key: str, value: Any) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], int):
        writer.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    else:
        writer.add_array(key, value)


def modelfile(gguf_name: str, chat) -> str:
    """An Ollama Modelfile for the exported file: ChatML turns when the tokenizer has ChatML's markers."""
    lines = [f"FROM ./{gguf_name}", ""]
    vocab = chat.tokenizer.get_vocab(with_added_tokens=True)
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        lines += ['TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}',
                  '{{ .Content }}<|im_end|>', '{{ end }}<|im_start|>assistant', '"""']
    else:
        lines += ["# No TEMPLATE: the chat template travels in the GGUF (tokenizer.chat_template)."]
    for stop in sorted(chat.stop_ids):
        lines.append(f"PARAMETER stop {json.dumps(chat.tokenizer.id_to_token(stop), ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_gguf(model: Transformer, tokenizer_dir: str | Path | None, out_dir: str | Path, quant: str = "f16",
               name: str = "murmur") -> Path:
    """Write out_dir/model-QUANT.gguf and out_dir/Modelfile, replacing out_dir atomically; returns the file."""
    from gguf import GGUFWriter

    from murmur.tokenizer import ChatTokenizer

    if quant not in QUANTS:
        raise MurmurError(f"GGUF quantization {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    if tokenizer_dir is None:
        raise MurmurError("this model has no tokenizer folder; a GGUF carries its tokenizer, so export a run or "
                          "a Hugging Face directory that has tokenizer.json")
    chat = ChatTokenizer.load(tokenizer_dir)
    metadata = {**metadata_from_settings(model.settings), **metadata_from_tokenizer(chat, model.settings.vocab_size)}
    tensors = gguf_tensors(model, quant)
    out_dir = Path(out_dir)
    filename = f"model-{quant}.gguf"
    with staged_dir(out_dir) as tmp:
        writer = GGUFWriter(tmp / filename, ARCHITECTURE)
        writer.add_name(name)
        writer.add_file_type(_FILE_TYPE[quant])
        for key, value in metadata.items():
            _add_value(writer, key, value)
        for tensor_name, (array, qtype) in tensors.items():
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (tmp / "Modelfile").write_text(modelfile(filename, chat), encoding="utf-8")
    return out_dir / filename
