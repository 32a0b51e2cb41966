"""The transformer itself: shapes, counts, FLOPs, initialisation, meta-device construction."""

import math

import torch

from murmur.model import DenseKVCache, Transformer, count_params, flops_per_token
from murmur.settings.model import ModelSettings

SMALL = ModelSettings(vocab_size=101, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)


def test_param_count_matches_the_built_model():
    for settings in (SMALL, SMALL.model_copy(update={"tie_embeddings": False, "qk_norm": True, "attn_bias": True})):
        model = Transformer(settings)
        actual = sum(p.numel() for p in model.parameters())  # tied weights are counted once by parameters()
        assert count_params(settings) == actual


def test_flops_per_token_is_6n_plus_attention():
    n = count_params(SMALL, embeddings=False) + SMALL.vocab_size * SMALL.dim  # tied head still multiplies
    expected = 6 * n + 12 * SMALL.n_layers * SMALL.n_heads * SMALL.attention_head_dim * 32
    assert flops_per_token(SMALL, 32) == expected
    assert flops_per_token(SMALL, 32, training=False) == expected / 3


def test_initialisation_scales():
    torch.manual_seed(0)
    model = Transformer(SMALL)
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.003
    residual = model.layers[0].mlp.down_proj.weight.std().item()
    assert abs(residual - 0.02 / math.sqrt(2 * SMALL.n_layers)) < 0.002
    # A fresh model predicts close to uniform: loss near ln(vocab) on random next tokens.
    tokens, targets = torch.randint(0, SMALL.vocab_size, (2, 2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(SMALL.vocab_size)) < 0.1


def test_meta_construction_then_init_matches_shapes():
    with torch.device("meta"):
        model = Transformer(SMALL)
    assert model.embed_tokens.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 101, (1, 8)))).all()
    assert model.lm_head.weight is model.embed_tokens.weight


def test_positions_and_cache_give_the_same_logits_as_one_pass():
    torch.manual_seed(0)
    model = Transformer(SMALL).eval()
    tokens = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = DenseKVCache(SMALL, 2, 12)
        first = model(tokens[:, :7], cache=cache)
        rest = model(tokens[:, 7:], positions=torch.arange(7, 12).expand(2, 5), cache=cache)
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_gradients_flow_to_every_parameter():
    model = Transformer(SMALL.model_copy(update={"qk_norm": True}))
    tokens = torch.randint(0, 101, (2, 16))
    model(tokens).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
