"""`murmur.source.resolve_source`: one answer to "what is this SRC?" for loading, training and the build.

One tiny model is written in every form a SRC may take (a Hugging Face folder, a run's checkpoint, a run
whose model was exported, a GGUF); each resolves to its kind, its settings and its tokenizer without reading
a weight, a broken one says what is wrong, and `load_model`, the trainer and the build's preflight check agree
on the model the same SRC names. Everything is built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from murmur import build, hf
from murmur.errors import MurmurError
from murmur.model import Transformer
from murmur.settings.model import ModelSettings
from murmur.source import load_model, resolve_source
from murmur.tokenizer import train_tokenizer
from murmur.train import checkpoint as ckpt
from murmur.train.trainer import run_stage
from tests.tokenizer_fixtures import sentence
from tests.train_helpers import settings_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where a GGUF's tokenizer is rebuilt


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict:
    """The same tiny model (max_seq_len 32) as a HF folder, a run's checkpoint, a run's exported model/ and a
    GGUF, with its tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    rng = random.Random(0)
    tok = train_tokenizer([sentence(rng, 10) for _ in range(200)], vocab_size=300, out_dir=root / "tokenizer")
    settings = ModelSettings(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                             max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(settings)
    model.init_weights()
    hf_dir = hf.save_hf_model(model, root / "hf", tokenizer_dir=root / "tokenizer",
                              special_tokens=hf.special_token_ids(root / "tokenizer"))
    run = root / "run"
    shutil.copytree(root / "tokenizer", run / "tokenizer")
    meta = {"model": settings.model_dump(mode="json"), "stage": "pretrain", "step": 1, "tokens": 0,
            "tokenizer_dir": "tokenizer"}
    ckpt.Checkpointer(run / "pretrain", keep=1).save(1, model, [], meta, {})
    exported = root / "exported"
    shutil.copytree(hf_dir, exported / "model")
    from murmur.gguf.writer import write_gguf

    gguf = write_gguf(model, root / "tokenizer", root / "gguf", quant="f32")
    return {"settings": settings, "hf": hf_dir, "run": run, "exported": exported, "gguf": gguf,
            "weights": {k: v.clone() for k, v in model.state_dict().items()}}


def _shape(settings: ModelSettings) -> dict:
    return settings.model_dump(include={"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                        "max_seq_len", "tie_embeddings"})


# --- each kind ----------------------------------------------------------------------------------------


def test_each_kind_resolves_with_its_own_fields(forms, tmp_path):
    run, exported = forms["run"], forms["exported"]
    step = run / "pretrain" / "checkpoints" / ckpt.step_name(1)
    expected = {  # SRC -> (kind, path, tokenizer folder, step folder)
        str(forms["hf"]): ("hf", forms["hf"], forms["hf"], None),
        str(run): ("checkpoint", run, run / "tokenizer", step),
        str(run / "pretrain"): ("checkpoint", run / "pretrain", run / "tokenizer", step),
        str(step): ("checkpoint", step, run / "tokenizer", step),
        str(exported): ("run-model", exported / "model", exported / "model", None),
        f"gguf:{forms['gguf']}": ("gguf", forms["gguf"], None, None),
        str(forms["gguf"]): ("gguf", forms["gguf"], None, None),
    }
    for src, (kind, path, tokenizer, step_dir) in expected.items():
        source = resolve_source(src)
        assert (source.kind, source.path, source.step_dir) == (kind, path, step_dir), src
        assert _shape(source.settings) == _shape(forms["settings"]), src
        if kind == "gguf":  # rebuilt from the file's metadata into the cache
            assert (source.tokenizer_dir / "tokenizer.json").is_file()
            assert source.tokenizer_dir.is_relative_to(tmp_path / "cache")
        else:
            assert source.tokenizer_dir == tokenizer, src
    assert resolve_source(exported).origin == "hf" and resolve_source(run).origin == "checkpoint"


def test_settings_are_read_without_reading_a_weight(forms, tmp_path):
    """Resolving reads config.json or murmur.json only: a source whose weights are gone still resolves, and
    loading it is what fails."""
    hf_dir = Path(shutil.copytree(forms["hf"], tmp_path / "hf"))
    (hf_dir / "model.safetensors").unlink()
    run = Path(shutil.copytree(forms["run"], tmp_path / "run"))
    for data in (run / "pretrain" / "checkpoints" / ckpt.step_name(1)).glob("*.distcp"):
        data.unlink()
    for src in (hf_dir, run):
        assert _shape(resolve_source(src).settings) == _shape(forms["settings"])
        with pytest.raises(MurmurError):
            load_model(src)


def test_load_model_loads_what_resolve_source_found(forms):
    for src in (forms["hf"], forms["run"], forms["exported"], f"gguf:{forms['gguf']}"):
        source, loaded = resolve_source(src), load_model(src)
        assert (loaded.origin, loaded.path, loaded.tokenizer_dir, loaded.step_dir) == \
            (source.origin, source.path, source.tokenizer_dir, source.step_dir)
        assert loaded.settings == source.settings
        for name, weight in forms["weights"].items():
            torch.testing.assert_close(loaded.model.state_dict()[name], weight, msg=f"{src}: {name}")


# --- bad sources --------------------------------------------------------------------------------------


def _broken_config(d: Path) -> Path:
    shutil.copytree(d, d.parent / "broken")
    (d.parent / "broken" / "config.json").write_text("{not json")
    return d.parent / "broken"


def _no_model_settings(run: Path) -> Path:
    copy = Path(shutil.copytree(run, run.parent / "copy"))
    meta_file = copy / "pretrain" / "checkpoints" / ckpt.step_name(1) / ckpt.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["model"] = {"dim": "wide"}
    meta_file.write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("make, message", [
    (lambda forms, tmp: tmp / "nowhere", "does not exist; pass a Hugging Face model directory"),
    (lambda forms, tmp: tmp, "is not a model: it has no config.json"),
    (lambda forms, tmp: f"gguf:{tmp / 'missing.gguf'}", "is not a file; pass gguf:PATH"),
    (lambda forms, tmp: _broken_config(Path(shutil.copytree(forms["hf"], tmp / "hf"))), "is not valid JSON"),
    (lambda forms, tmp: _no_model_settings(Path(shutil.copytree(forms["run"], tmp / "run"))),
     "murmur.json has no valid model settings"),
])
def test_a_bad_source_says_what_is_wrong(forms, tmp_path, make, message):
    with pytest.raises(MurmurError, match=message):
        resolve_source(make(forms, tmp_path))


@pytest.mark.parametrize("name", [5, ["tokenizer"], {"x": 1}, "tok\0enizer"])
def test_a_checkpoint_naming_its_tokenizer_with_no_folder_name_is_refused(forms, tmp_path, name):
    """murmur.json comes from whoever made the checkpoint: its tokenizer_dir must be a folder name."""
    run = Path(shutil.copytree(forms["run"], tmp_path / "run"))
    meta_file = run / "pretrain" / "checkpoints" / ckpt.step_name(1) / ckpt.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["tokenizer_dir"] = name
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(MurmurError, match="tokenizer_dir must name a folder"):
        load_model(run)


# --- one answer for loading, training and the build ----------------------------------------------


def _sft_settings(run: Path, init_from, seq_len: int):
    # [model] allows 128 positions: only the model SFT starts from limits seq_len to 32.
    settings = settings_for(run, sft_init_from=str(init_from), seq_len=seq_len, sft_steps=1)
    settings.model.max_seq_len = 128
    return settings


def _build_check(settings) -> None:
    stage = next(s for s in build.STAGES if s.name == "sft")
    stage.preflight(settings, stage)


@pytest.mark.parametrize("form", ["hf", "run", "exported"])
def test_trainer_and_build_check_agree_with_load_model(forms, tmp_path, form):
    """SFT trains the model its init_from names, at that model's shape: a seq_len past the loaded model's
    max_seq_len is refused by the build's check before any stage runs, as the trainer refuses it."""
    src = forms[form]
    assert load_model(src).settings.max_seq_len == 32
    too_long = _sft_settings(tmp_path / "a", src, seq_len=64)
    with pytest.raises(MurmurError, match="stage sft: sft.seq_len=64 exceeds model.max_seq_len=32"):
        _build_check(too_long)
    with pytest.raises(MurmurError, match="sft.seq_len=64 exceeds model.max_seq_len=32"):
        run_stage(too_long, tmp_path / "a", "sft")
    fits = _sft_settings(tmp_path / "b", src, seq_len=32)
    _build_check(fits)
    with pytest.raises(MurmurError, match="no sft training shards"):  # past the model: the run has no tokens
        run_stage(fits, tmp_path / "b", "sft")


def test_a_gguf_to_start_training_from_is_refused_by_the_build_check_and_the_trainer(forms, tmp_path):
    settings = _sft_settings(tmp_path / "run", forms["gguf"], seq_len=32)
    with pytest.raises(MurmurError, match="stage sft: sft.init_from = .* is a GGUF.*set model.base"):
        _build_check(settings)
    with pytest.raises(MurmurError, match="sft.init_from = .* is a GGUF.*set model.base"):
        run_stage(settings, tmp_path / "run", "sft")


def test_a_missing_start_is_named_by_its_setting(tmp_path):
    settings = _sft_settings(tmp_path / "run", tmp_path / "nowhere", seq_len=32)
    with pytest.raises(MurmurError, match="stage sft: sft.init_from: .*nowhere does not exist"):
        _build_check(settings)
    with pytest.raises(MurmurError, match="sft.init_from: .*nowhere does not exist"):
        run_stage(settings, tmp_path / "run", "sft")
