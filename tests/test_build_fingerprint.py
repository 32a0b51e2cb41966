"""What a build reruns when one setting changes: each stage is fingerprinted on the settings it reads, by
dotted key, so a setting only the tokenize stage reads never retrains the tokenizer, and one that changes
only the chat-finetuning shards never reruns pretraining."""

import pytest

from murmur.build import STAGE_NAMES, build, load_record, plan_build
from murmur.build_display import QuietDisplay
from murmur.config import settings_from_dict
from tests.test_build import FakeStages


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "posts.jsonl"
    path.write_text('{"id": "1", "text": "hello"}\n')
    return path


def _settings(tmp_path, corpus, **tokenizer):
    return settings_from_dict({"run": {"name": "t", "dir": str(tmp_path / "run")},
                               "data": {"sources": [f"jsonl:{corpus}"]},
                               "model": {"preset": "tiny-cpu"}, "train": {"steps": 10},
                               "tokenizer": tokenizer})


def _build(settings, fakes, **kw):
    return build(settings, functions=fakes.functions(), display=QuietDisplay(), **kw)


def _actions(plan):
    return {step.stage.name: step.action for step in plan.steps}


@pytest.mark.parametrize("setting", [{"thread_weight": 2.0}, {"sft_roles": "second"}, {"seed": 7}])
def test_a_chat_shard_setting_reruns_tokenize_and_chat_finetuning_never_the_tokenizer_or_pretraining(
        tmp_path, corpus, setting):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    fakes.calls.clear()

    plan = plan_build(_settings(tmp_path, corpus, **setting))
    assert _actions(plan) == {"data": "skip", "tokenizer": "skip", "tokenize": "run", "pretrain": "skip",
                              "sft": "run", "export": "run", "eval": "run"}
    assert f"tokenizer.{next(iter(setting))}" in plan.step("tokenize").reason
    _build(_settings(tmp_path, corpus, **setting), fakes)
    assert fakes.calls == ["tokenize", "sft", "export", "eval"]

    fakes.calls.clear()
    _build(_settings(tmp_path, corpus, **setting), fakes)
    assert fakes.calls == []  # and the record it left is up to date


def test_a_setting_of_both_shard_kinds_reruns_pretraining_but_not_the_tokenizer(tmp_path, corpus):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    fakes.calls.clear()
    _build(_settings(tmp_path, corpus, shard_tokens=1 << 20), fakes)
    assert fakes.calls == ["tokenize", "pretrain", "sft", "export", "eval"]


def test_a_tokenizer_setting_reruns_everything_from_the_tokenizer(tmp_path, corpus):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    fakes.calls.clear()
    _build(_settings(tmp_path, corpus, vocab_size=512), fakes)
    assert fakes.calls == list(STAGE_NAMES[1:])


def test_an_interrupted_tokenize_of_a_chat_setting_still_spares_pretraining(tmp_path, corpus):
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    with pytest.raises(RuntimeError):
        _build(_settings(tmp_path, corpus, thread_weight=2.0), FakeStages(fail="tokenize"))
    fakes.calls.clear()
    _build(_settings(tmp_path, corpus, thread_weight=2.0), fakes)
    assert fakes.calls == ["tokenize", "sft", "export", "eval"]


def test_a_tokenize_rerun_no_setting_explains_reruns_pretraining(tmp_path, corpus):
    """Deleted shards or a forced rerun may not reproduce the old pretraining shards: what follows reruns."""
    fakes = FakeStages()
    _build(_settings(tmp_path, corpus), fakes)
    (tmp_path / "run" / "tokens" / "manifest.json").unlink()
    fakes.calls.clear()
    _build(_settings(tmp_path, corpus), fakes)
    assert fakes.calls == ["tokenize", "pretrain", "sft", "export", "eval"]
    assert load_record(tmp_path / "run")["stages"]["tokenize"]["state"] == "completed"
