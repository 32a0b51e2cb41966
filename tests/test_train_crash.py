"""Crash safety: a run killed with SIGKILL resumes to exactly the losses of an uninterrupted run.

The children kill themselves with SIGKILL at a chosen point (a real kill: no cleanup runs), once
mid-training and once in the middle of writing a checkpoint; the test then resumes in this process
and compares, bit for bit, with a reference run made here with the same thread count.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from train_helpers import in_one_thread, link_tokens, read_losses, settings_for, write_pretrain_tokens
from murmur.train import checkpoint as ckpt
from murmur.train.trainer import run_stage

HERE = Path(__file__).parent
SETTINGS = dict(steps=12, checkpoint_interval=4, eval_interval=100, keep_checkpoints=5)

CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from train_helpers import settings_for
    from murmur.train import checkpoint, trainer

    mode, run = sys.argv[1], Path(sys.argv[2])
    if mode == "mid-step":
        original_step = trainer.Trainer.train_step
        def train_step(self, batches):
            if self.step == 6:  # after the step-4 checkpoint, before step 8's
                os.kill(os.getpid(), signal.SIGKILL)
            return original_step(self, batches)
        trainer.Trainer.train_step = train_step
    else:  # "mid-write": the step-8 shards are on disk, its murmur.json is not
        original_write = checkpoint.write_json_atomic
        def write_json(path, data, **kw):
            if path.name == checkpoint.META_FILE and "step_00000008" in path.parent.name:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_write(path, data, **kw)
        checkpoint.write_json_atomic = write_json
    trainer.run_stage(settings_for(run, **%r), run, "pretrain")
""" % SETTINGS)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crash") / "tokens"
    write_pretrain_tokens(folder)
    return folder


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference")
    link_tokens(run, tokens)
    in_one_thread(lambda: run_stage(settings_for(run, **SETTINGS), run, "pretrain"))
    return run


def _killed_child(mode: str, run: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(run)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _same_weights(a: Path, b: Path) -> bool:
    ma, _, _ = ckpt.load_for_inference(a)
    mb, _, _ = ckpt.load_for_inference(b)
    return all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


@pytest.mark.parametrize("mode", ["mid-step", "mid-write"])
def test_killed_run_resumes_bit_exact(mode, tokens, reference, tmp_path):
    run = tmp_path / "run"
    link_tokens(run, tokens)
    _killed_child(mode, run)
    checkpoints = run / "pretrain" / "checkpoints"
    # The last complete checkpoint is step 4, and it loads; a half-written step 8 is never `latest`.
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    assert not (checkpoints / "step_00000008").exists()
    if mode == "mid-write":
        assert (checkpoints / ".partial_step_00000008").is_dir()
    model, settings, _ = ckpt.load_for_inference(run)
    assert settings.dim == 32 and model.layers[0].mlp.up_proj.weight.shape == (64, 32)
    killed = read_losses(run / "pretrain")
    assert max(killed) >= 6  # it really trained past the checkpoint before dying

    summary = in_one_thread(lambda: run_stage(settings_for(run, **SETTINGS), run, "pretrain"))
    assert summary["steps"] == 12 and summary["new_steps"] == 8
    assert not (checkpoints / ".partial_step_00000008").exists()
    expected, resumed = read_losses(reference / "pretrain"), read_losses(run / "pretrain")
    for step in range(5, 13):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])  # bit for bit
    assert _same_weights(run, reference)
