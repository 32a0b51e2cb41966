"""`murmur build` end to end on a cut-down demo recipe: a few hundred conversations, a few dozen steps, a tiny
model. A second build skips every stage; changing one training setting reruns only training and what follows."""

import json
import math
import random
import subprocess
import sys

import pytest

from murmur.build import STAGE_NAMES, load_record

pytestmark = pytest.mark.slow

TOPICS = ["coffee", "music", "football", "rain", "books", "pizza", "trains", "cats", "gardens", "movies",
          "mountains", "bread", "guitars", "winter", "podcasts", "bikes"]
OPENERS = ["have you tried any good {t} lately", "what do you think about {t} these days",
           "i keep thinking about {t} all week", "do you know much about {t} honestly"]
REPLIES = ["yes {t} is great, i had some {w} ones yesterday", "not really, {t} feels a bit {w} to me",
           "{t} always makes me happy when it is {w}", "i only like {t} when it is {w} and quiet"]
WORDS = ["warm", "loud", "strange", "fresh", "old", "bright", "slow", "lovely", "cheap", "tiny", "wild", "soft"]


def _corpus(path, conversations=300, seed=0):
    """JSONL posts: reply chains of 3-4 turns between two people, on varied topics."""
    rng = random.Random(seed)
    lines = []
    for c in range(conversations):
        topic = rng.choice(TOPICS)
        people = [f"u{rng.randrange(200)}", f"u{200 + rng.randrange(200)}"]
        parent = None
        for turn in range(rng.choice([3, 4])):
            template = rng.choice(OPENERS if turn == 0 else REPLIES)
            text = template.format(t=topic, w=rng.choice(WORDS)) + f" ({rng.choice(WORDS)} {c} {turn})"
            post_id = f"{c}{turn:02d}"
            lines.append(json.dumps({"id": post_id, "text": text, "author_id": people[turn % 2],
                                     "created_at": f"2024-01-01T00:{turn:02d}:00Z", "conversation_id": f"{c}00",
                                     "in_reply_to_id": parent}))
            parent = post_id
    path.write_text("\n".join(lines) + "\n")


def _recipe(tmp_path):
    corpus = tmp_path / "posts.jsonl"
    _corpus(corpus)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f"""
[run]
name = "tiny"
dir = "{tmp_path / 'run'}"

[data]
sources = ["jsonl:{corpus}"]
languages = []
workers = 1

[tokenizer]
vocab_size = 384

[model]
vocab_size = 384
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_dim = 128
max_seq_len = 64

[train]
device = "cpu"
seq_len = 64
micro_batch_size = 8
steps = 20
warmup_steps = 4
log_interval = 10
eval_interval = 20
eval_batches = 2
checkpoint_interval = 20

[sft]
device = "cpu"
seq_len = 64
micro_batch_size = 8
steps = 10
warmup_steps = 2
log_interval = 5
eval_interval = 10
eval_batches = 2
checkpoint_interval = 10

[eval]
device = "cpu"
bpb_max_posts = 20
bpb_checkpoint_posts = 10
ranking_examples = 10
distractors = 4
prompts = ["do you like coffee?"]
sample_seeds = [0]
max_new_tokens = 8
canary_candidates = 20
""")
    return recipe


def _build(recipe, *args):
    proc = subprocess.run([sys.executable, "-m", "murmur", "build", str(recipe), *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _completed_at(run):
    return {name: entry["completed_at"] for name, entry in load_record(run)["stages"].items()}


def test_build_end_to_end_then_skip_then_rerun_from_training(tmp_path):
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    out = _build(recipe)
    first = _completed_at(run)
    assert set(first) == set(STAGE_NAMES)
    assert (run / "model" / "config.json").is_file() and (run / "model" / "tokenizer.json").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["model"]["stage"] == "sft"  # the chat-finetuned model is the one evaluated
    val = results["bpb"]["validation"]
    assert 0 < val["bpb"] < 8  # a trained model beats 8 bits per byte
    # ... and a model guessing uniformly over its 384 tokens (log2(384) bits a token), by a clear margin.
    assert val["bpb"] < 0.8 * math.log2(384) * val["tokens"] / val["bytes"], val
    assert results["ranking"]["examples"] > 0 and "hits@1" in results["ranking"]["pmi"]
    # The trainer's own validation reports bits per byte too (its tokenizer gives each token's bytes).
    from murmur.files import read_jsonl

    val_bpb = [r["val_bpb"] for r in read_jsonl(run / "pretrain" / "metrics.jsonl") if r.get("val_bpb")]
    assert val_bpb and all(0 < b < 8 for b in val_bpb) and val_bpb[-1] < val_bpb[0], val_bpb
    assert "build finished" in out and str(run / "model") in out

    out = _build(recipe)
    assert _completed_at(run) == first  # nothing reran
    assert out.count("skipped (up to date)") >= len(STAGE_NAMES)

    _build(recipe, "--set", "train.lr=1e-3")
    third = _completed_at(run)
    rerun = {name for name in STAGE_NAMES if third[name] != first[name]}
    assert rerun == {"pretrain", "sft", "export", "eval"}
    record = load_record(run)
    assert record["stages"]["pretrain"]["settings"]["train"]["lr"] == 1e-3


def _base_model(tmp_path, texts):
    """A tiny 'open model': a Hugging Face directory with its own tokenizer, as a hub download would be."""
    import torch

    from murmur.hf import save_hf_model, special_token_ids
    from murmur.model import Transformer
    from murmur.settings.model import ModelSettings
    from murmur.tokenizer import train_tokenizer

    tok_dir = tmp_path / "base-tokenizer"
    tok = train_tokenizer(texts, 320, tok_dir)
    torch.manual_seed(0)
    model = Transformer(ModelSettings(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                      ffn_dim=64, max_seq_len=128))
    model.init_weights()
    return save_hf_model(model, tmp_path / "base", tokenizer_dir=tok_dir,
                         special_tokens=special_token_ids(tok_dir))


def test_finetune_open_model_skips_pretraining_and_keeps_its_tokenizer(tmp_path):
    recipe = _recipe(tmp_path)
    texts = [json.loads(line)["text"] for line in (tmp_path / "posts.jsonl").read_text().splitlines()]
    base = _base_model(tmp_path, texts)
    out = _build(recipe, "--set", f"model.base={base}", "--set", "sft.steps=4", "--set", "eval.ranking_examples=0")
    run = tmp_path / "run"
    record = load_record(run)
    assert "pretrain" not in record["stages"] and not (run / "pretrain").exists()
    assert "not needed" in out
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 1  # the base model's shape
    assert json.loads((run / "eval" / "results.json").read_text())["model"]["stage"] == "sft"
