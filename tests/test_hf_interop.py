"""Hugging Face interop: logits of tiny random transformers models match Murmur's, both ways."""

import json

import pytest
import torch
import transformers

from murmur.errors import MurmurError
from murmur.hf import load_hf_model, save_hf_model
from murmur.model import Transformer, generate_greedy
from murmur.settings.model import ModelSettings

TOL = 1e-4


def _tiny_config(kind: str, tied: bool, rope_scaling: bool):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied, rms_norm_eps=1e-6)
    if rope_scaling:
        common["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        common["rope_theta"] = 500000.0
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    return transformers.Qwen3Config(**common, head_dim=24)


def _hf_model(kind, tied, rope_scaling, seed=0):
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[kind]
    model = cls(_tiny_config(kind, tied, rope_scaling)).eval()
    # Random init leaves norms at one and biases at zero; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


TOKENS = torch.tensor([[1, 5, 9, 42, 7, 3, 88, 60, 12, 2, 33, 71], [4, 4, 8, 15, 16, 23, 42, 96, 0, 1, 2, 3]])


@pytest.mark.parametrize("kind,tied,rope_scaling", [
    ("llama", False, False), ("llama", True, True), ("qwen3", True, False), ("qwen3", False, True),
    ("qwen2", False, False), ("mistral", True, False)])
def test_hf_to_murmur_logits_match(tmp_path, kind, tied, rope_scaling):
    hf = _hf_model(kind, tied, rope_scaling)
    hf.save_pretrained(tmp_path)
    model, settings = load_hf_model(tmp_path)
    assert settings.tie_embeddings == tied
    with torch.no_grad():
        expected = hf(TOKENS).logits
        got = model(TOKENS)
    assert torch.allclose(got, expected, atol=TOL), (got - expected).abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2"])
def test_murmur_export_loads_in_transformers(tmp_path, kind):
    settings = ModelSettings(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                             max_seq_len=128, qk_norm=kind == "qwen3", attn_bias=kind == "qwen2",
                             head_dim=24 if kind == "qwen3" else None, tie_embeddings=kind != "llama",
                             rope_scaling={"factor": 4.0, "original_max_seq_len": 32} if kind == "llama" else None)
    torch.manual_seed(1)
    model = Transformer(settings).eval()
    save_hf_model(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(hf(TOKENS).logits, model(TOKENS), atol=TOL)


def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf_model("llama", False, False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = load_hf_model(tmp_path)
    with torch.no_grad():
        assert torch.allclose(model(TOKENS), hf(TOKENS).logits, atol=TOL)


def test_murmur_writes_sharded_export_that_round_trips(tmp_path):
    settings = ModelSettings(vocab_size=97, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=64)
    model = Transformer(settings).eval()
    save_hf_model(model, tmp_path / "out", max_shard_bytes=40_000)
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 1
    again, _ = load_hf_model(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(TOKENS), model(TOKENS))


def test_cached_decoding_matches_full_recompute():
    torch.manual_seed(0)
    model = Transformer(ModelSettings(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                      max_seq_len=64)).eval()
    prompt = [3, 14, 15, 92, 65]
    cached = generate_greedy(model, prompt, 10)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]


# Bad inputs: each gives one message naming the problem.

def test_directory_without_config(tmp_path):
    with pytest.raises(MurmurError, match="no config.json"):
        load_hf_model(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(MurmurError, match="model_type 'gpt2' is not supported"):
        load_hf_model(tmp_path)


def test_tensor_of_wrong_shape(tmp_path):
    hf = _hf_model("llama", False, False)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MurmurError, match=r"mlp\.\w+_proj\.weight' has shape .*, config.json implies .*80"):
        load_hf_model(tmp_path)


def test_truncated_safetensors(tmp_path):
    hf = _hf_model("llama", False, False)
    hf.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(MurmurError, match="not a readable safetensors file"):
        load_hf_model(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    hf = _hf_model("llama", False, False)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(MurmurError, match="safetensors only"):
        load_hf_model(tmp_path)
