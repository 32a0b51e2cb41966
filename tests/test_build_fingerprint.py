"""What a build reruns when one setting changes: each stage is fingerprinted on the settings it reads, by
dotted key, so a setting only the tokenize stage reads never retrains the tokenizer, and one that changes
only the chat-finetuning shards never reruns pretraining."""

import dataclasses
import importlib

import pytest

from murmur.build import STAGE_BY_NAME, STAGE_NAMES, build, load_record, plan_build
from murmur.build_display import QuietDisplay
from murmur.config import Settings, settings_from_dict
from murmur.errors import SettingsError
from murmur.fingerprint import check_keys, settings_by_key
from murmur.settings.tokenizer import TokenizerSettings
from test_build import FakeStages


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
                              "sft": "run", "export": "run", "index": "skip", "eval": "run"}
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
    assert fakes.calls == [name for name in STAGE_NAMES[1:] if name != "index"]  # the index reads data/ alone


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


# ------------------------------------------------------------------------------ reads checked at import


@pytest.mark.parametrize("field, key", [("reads", "tokenize"), ("reads", "tokenizer.thread_wieght"),
                                        ("ignores", "tokenizer.vocab_sise"), ("unaffected_by", "model.base.path")])
def test_a_misspelled_settings_key_fails_when_the_module_declaring_the_stage_is_imported(tmp_path, monkeypatch,
                                                                                           field, key):
    keys = {"reads": ("tokenizer",), field: (key,)}
    name = f"stages_with_a_typo_in_{field}"
    (tmp_path / f"{name}.py").write_text(
        "from murmur.build_types import Stage\n"
        f"STAGE = Stage('tokenize', 'm:f', after=(), outputs=(), done_marker='tokens/manifest.json', **{keys!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SettingsError, match=f"stage tokenize: unknown setting '{key}'"):
        importlib.import_module(name)


def test_the_shipped_stages_read_keys_that_exist():
    from murmur.build import STAGES
    from murmur.build_types import Stage

    for stage in STAGES:  # remade from their fields, so the check runs again on each
        assert Stage(**{f.name: getattr(stage, f.name) for f in dataclasses.fields(stage)}) == stage
    assert STAGE_BY_NAME["tokenize"].reads == ("tokenizer",)


# ---------------------------------------------------------------------- one helper, every fingerprint


def test_settings_by_key_takes_sections_and_dotted_keys_less_what_is_ignored(tmp_path, corpus):
    settings = _settings(tmp_path, corpus, thread_weight=3.0)
    picked = settings_by_key(settings, ["tokenizer", "model.base"], ignore=["tokenizer.seed"])
    assert set(picked) == {"tokenizer", "model.base"} and picked["model.base"] is None
    assert picked["tokenizer"]["thread_weight"] == 3.0 and "seed" not in picked["tokenizer"]
    assert set(picked["tokenizer"]) == set(TokenizerSettings.model_fields) - {"seed"}
    assert settings_by_key(settings.tokenizer, ignore=["chat_sources"]) == {
        k: v for k, v in settings.tokenizer.model_dump(mode="json").items() if k != "chat_sources"}
    with pytest.raises(SettingsError, match="unknown setting 'tokenizer.nope'"):
        check_keys(Settings, ["tokenizer.nope"], "test")


class _Vocabulary:
    def vocab_hash(self) -> str:
        return "vocab"


def test_the_tokenize_fingerprint_covers_a_setting_added_later(tmp_path):
    """No hand-picked list: a tokenizer setting that did not exist when the fingerprint was written counts."""
    from murmur.tokenize import _fingerprint

    class Later(TokenizerSettings):
        new_knob: int = 0

    def fingerprint(**settings):
        return _fingerprint(tmp_path, _Vocabulary(), Later(**settings), [])

    assert fingerprint() == fingerprint()
    assert fingerprint(new_knob=1) != fingerprint()
    assert fingerprint(thread_weight=2.0) != fingerprint()
    # the chat sources passed in replace the settings' own, so only those count
    assert fingerprint(chat_sources=[{"path": str(tmp_path / "x.jsonl")}]) == fingerprint()


def test_the_data_resume_fingerprint_covers_a_setting_added_later(tmp_path):
    from murmur.data.pipeline import EXECUTION_ONLY, _fingerprint
    from murmur.settings.data import DataSettings

    class Later(DataSettings):
        new_knob: int = 0

    assert _fingerprint(Later(new_knob=1), [], EXECUTION_ONLY) != _fingerprint(Later(), [], EXECUTION_ONLY)
    assert _fingerprint(Later(workers=3), [], EXECUTION_ONLY) == _fingerprint(Later(), [], EXECUTION_ONLY)
