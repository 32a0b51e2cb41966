"""The `murmur` command: export round trip, model info, and one-line errors with the right exit codes."""

import json
import subprocess
import sys

import pytest
import torch

from murmur.cli import main
from murmur.hf import load_hf_model, save_hf_model
from murmur.model import Transformer
from murmur.settings.model import ModelSettings


def murmur(*args):
    """Run the real console entry point in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "murmur", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelSettings(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                      max_seq_len=64)).eval()
    return save_hf_model(model, tmp_path / "hf"), model


def test_export_round_trip_through_the_cli(tmp_path, hf_dir):
    src, model = hf_dir
    assert main(["export", str(src), "--out", str(tmp_path / "again")]) == 0
    again, _ = load_hf_model(tmp_path / "again")
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))


def test_model_info_json(hf_dir, capsys):
    src, model = hf_dir
    assert main(["model", "info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("setup,args,message", [
    (lambda d: None, ["model", "info", "{d}"], "no config.json"),
    (lambda d: (d / "config.json").write_text('{"model_type": "bert"}'), ["export", "{d}", "--out", "{d}/o"],
     "model_type 'bert' is not supported"),
    (lambda d: None, ["model", "info", "preset:13b"], "unknown preset '13b'"),
    (lambda d: None, ["model", "info", "{d}/nowhere"], "does not exist"),
])
def test_errors_are_one_line_without_traceback(tmp_path, setup, args, message):
    setup(tmp_path)
    result = murmur(*[a.format(d=tmp_path) for a in args])
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2():
    result = murmur("export")
    assert result.returncode == 2 and "required" in result.stderr


def test_help_lists_commands():
    result = murmur("--help")
    assert result.returncode == 0 and "export" in result.stdout and "model" in result.stdout
