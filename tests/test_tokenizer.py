"""The tokenizer: round trip, Hugging Face parity of the chat template, loss masks, bad inputs."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from murmur.errors import MurmurError
from murmur.tokenizer import IM_END, ChatTokenizer, train_tokenizer, training_texts

sys.path.insert(0, str(Path(__file__).parent))
from tokenizer_fixtures import sentence, write_data_dir

CONVERSATION = [
    {"role": "system", "content": "You are a friendly regular of the café."},
    {"role": "user", "content": "hello! any concert tickets left? 🎉"},
    {"role": "assistant", "content": "Sold out, sorry — try the garden café tomorrow ☕"},
    {"role": "user", "content": "你好 世界\n\n  two blank lines and spaces  "},
    {"role": "assistant", "content": " leading space, Привет мир, مرحبا\n"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    rng = random.Random(1)
    texts = [sentence(rng, 12) for _ in range(400)]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(texts, 420, out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir) -> ChatTokenizer:
    return ChatTokenizer.load(tok_dir)


def test_saved_files_and_special_ids(tok_dir, tok):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        assert (tok_dir / name).is_file()
    assert tok.vocab_size == 420
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"
    assert tok.decode(sorted(tok.stop_ids)) == "<|endoftext|><|im_end|>"


def test_round_trip_unicode_and_whitespace(tok):
    texts = ["plain ascii", "emoji 😀🎉🧑‍🤝‍🧑 flags 🇫🇷", "中文 日本語 한국어 ไทย हिन्दी", "  spaces\tand\ttabs\n\n\r\n",
             "combining é (e + \u0301) and zero width\u200b joiner", "\x00control\x7f", "", "x" * 3000]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_round_trip_demo_corpus(tok):
    """decode(encode(text)) == text on messages of the demo corpus (chitchat), emoji included: every 10th
    conversation here, all of them in bench/tokenize_stage.py."""
    ccc = pytest.importorskip("chitchat_dataset")
    convs = list(ccc.Dataset().values())[::10]
    texts = [m["text"] for conv in convs for turn in conv["messages"] for m in turn]
    assert len(texts) > 10_000
    # The demo corpus is plain ASCII, so emoji and other scripts are added by hand.
    texts += ["emoji 😀🎉🧑‍🤝‍🧑 🇫🇷", "中文 日本語 한국어 ไทย हिन्दी עברית", "Привет, мир! مرحبا"]
    decoded = tok.tokenizer.decode_batch([e.ids for e in tok.tokenizer.encode_batch(texts, add_special_tokens=False)],
                                         skip_special_tokens=False)
    mismatches = [t for t, d in zip(texts, decoded) if t != d]
    assert mismatches == []


def test_transformers_apply_chat_template_matches(tok_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:2]):
        for gen in (False, True):
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert ids == tok.render_chat(messages, add_generation_prompt=gen)
    text = hf.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == tok.render_chat_text(CONVERSATION)[0]
    assert text.startswith("<|im_start|>system\nYou are")
    ids = tok.render_chat(CONVERSATION)
    assert hf.decode(ids) == tok.decode(ids) == text
    assert hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|endoftext|>"


def test_mask_covers_exactly_assistant_tokens(tok):
    ids, mask = tok.render_chat_with_mask(CONVERSATION)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assistants = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    # The masked tokens, run by run, decode to exactly each assistant reply and its <|im_end|>.
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert current == []
    assert [tok.decode(r) for r in runs] == [a + IM_END for a in assistants]
    # Everything else is the prompt: system and user text, role headers, the final newline.
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "You are a friendly" in unmasked and "你好 世界" in unmasked and "Sold out" not in unmasked
    assert unmasked.count("<|im_start|>assistant\n") == 2
    # The batch path gives the same.
    assert tok.render_chats_with_masks([CONVERSATION])[0] == (ids, mask)


def test_foreign_template_renders_like_transformers(tok_dir, tmp_path):
    """An imported tokenizer keeps its own Jinja template; ids match transformers and the mask still
    covers the assistant replies."""
    transformers = pytest.importorskip("transformers")
    foreign = tmp_path / "foreign"
    shutil.copytree(tok_dir, foreign)
    (foreign / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}[BOT] {{ m['content'] }}"
        "{{ eos_token }}{% else %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}[BOT] {% endif %}")
    tok = ChatTokenizer.load(foreign)
    hf = transformers.AutoTokenizer.from_pretrained(str(foreign))
    for gen in (False, True):
        assert tok.render_chat(CONVERSATION, gen) == hf.apply_chat_template(
            CONVERSATION, tokenize=True, add_generation_prompt=gen, return_dict=False)
    ids, mask = tok.render_chat_with_mask(CONVERSATION)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "".join(m["content"] + "<|endoftext|>" for m in CONVERSATION if m["role"] == "assistant")


def test_corpus_too_small_for_vocab(tmp_path):
    with pytest.raises(MurmurError, match="too small for vocab_size 5000"):
        train_tokenizer(["tiny corpus"] * 3, 5000, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(MurmurError, match="too small"):
        train_tokenizer(["abc"], 100, tmp_path / "t")


def test_empty_training_split(tmp_path):
    write_data_dir(tmp_path / "data", conversations=4, loose_posts=2, splits=("validation",))
    with pytest.raises(MurmurError, match="training split is empty"):
        train_tokenizer(training_texts(tmp_path / "data"), 300, tmp_path / "t")
    with pytest.raises(MurmurError, match="run `murmur data` first"):
        training_texts(tmp_path / "nowhere")


def test_tokenizer_directory_missing_or_broken(tok_dir, tmp_path):
    with pytest.raises(MurmurError, match="does not exist"):
        ChatTokenizer.load(tmp_path / "absent")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tok_dir / "tokenizer_config.json", partial)
    with pytest.raises(MurmurError, match="missing tokenizer.json"):
        ChatTokenizer.load(partial)
    (partial / "tokenizer.json").write_text("{not json")
    with pytest.raises(MurmurError, match="not a valid tokenizer file"):
        ChatTokenizer.load(partial)
    shutil.copy(tok_dir / "tokenizer.json", partial)
    (partial / "tokenizer_config.json").write_text("[")
    with pytest.raises(MurmurError, match="not valid JSON"):
        ChatTokenizer.load(partial)


def test_chat_template_read_from_config_when_no_jinja_file(tok_dir, tmp_path):
    other = tmp_path / "cfg_template"
    shutil.copytree(tok_dir, other)
    template = (other / "chat_template.jinja").read_text()
    (other / "chat_template.jinja").unlink()
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    tok = ChatTokenizer.load(other)
    assert tok.chat_template == template
    assert tok.render_chat(CONVERSATION) == ChatTokenizer.load(tok_dir).render_chat(CONVERSATION)


def test_cli_tokenizer_trains_and_explains_errors(tmp_path):
    write_data_dir(tmp_path / "data", conversations=40, loose_posts=20)
    murmur = [sys.executable, "-m", "murmur"]
    ok = subprocess.run(murmur + ["tokenizer", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t"),
                                  "--vocab-size", "320"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ChatTokenizer.load(tmp_path / "t").vocab_size == 320
    bad = subprocess.run(murmur + ["tokenizer", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "u"),
                                   "--vocab-size", "90000"], capture_output=True, text=True)
    assert bad.returncode == 1 and "lower --vocab-size" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run(murmur + ["tokenizer", "--out", "x"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_run_stage_trains_or_takes_a_pretrained_tokenizer(tok_dir, tmp_path):
    from murmur.config import Settings
    from murmur.tokenizer import run_stage

    write_data_dir(tmp_path / "run" / "data", conversations=40, loose_posts=20)
    settings = Settings()
    settings.tokenizer.vocab_size = 330
    summary = run_stage(settings, tmp_path / "run")
    assert summary["vocab_size"] == 330 and summary["texts"] > 0
    assert ChatTokenizer.load(tmp_path / "run" / "tokenizer").vocab_size == 330
    settings.tokenizer.pretrained = str(tok_dir)
    summary = run_stage(settings, tmp_path / "run")
    assert summary["vocab_size"] == 420
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
