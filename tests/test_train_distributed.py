"""Real multi-process training: torchrun --nproc-per-node 2 on gloo/CPU.

One launch trains three layouts (FSDP2, DDP, tensor parallel) on the same global batch as a single
process; their losses must agree within float32 reduction-order noise. The validation split holds a
single window, so one rank has no validation batch at all and must not hang the others. The FSDP
run's checkpoint, written by 2 processes, then resumes in 1 process.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import SEQ, link_tokens, read_losses, read_val, settings_for, write_pretrain_tokens
from murmur.train.trainer import run_stage

HERE = Path(__file__).parent
TOLERANCE = 2e-5  # relative; the layouts sum the same terms in a different order
LAYOUTS = ("fsdp", "ddp", "tp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    tokens = work / "tokens"
    write_pretrain_tokens(tokens, validation_tokens=SEQ + 1)
    for name in ("single", "fsdp-meta", *LAYOUTS):
        link_tokens(work / name, tokens)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                str(HERE / "train_dist_worker.py"), str(work)]
    proc = subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Meanwhile, the single-process reference: 4 sequences × 2 accumulation = the same 128 tokens per step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage(settings_for(work / "single", micro_batch_size=4, global_batch_tokens=SEQ * 8), work / "single",
                  "pretrain")
    finally:
        torch.set_num_threads(threads)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    return work


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_match_one(runs, layout):
    ref = read_losses(runs / "single" / "pretrain")
    got = read_losses(runs / layout / "pretrain")
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=TOLERANCE), (layout, step)
    assert ref[8] < ref[1] - 0.2  # and it learns
    # Validation: one window; rank 1 of the data-parallel layouts has none and still joins in.
    ref_val, got_val = read_val(runs / "single" / "pretrain"), read_val(runs / layout / "pretrain")
    assert sorted(got_val) == sorted(ref_val) and len(ref_val) >= 2
    for step in ref_val:
        assert got_val[step] == pytest.approx(ref_val[step], rel=TOLERANCE)


@pytest.mark.distributed
def test_meta_device_init_after_sharding_trains(runs):
    losses = read_losses(runs / "fsdp-meta" / "pretrain")
    assert sorted(losses) == list(range(1, 9))
    assert 3.9 < losses[1] < 4.4  # a fresh init: about ln(64) = 4.16
    assert losses[8] < losses[1] - 0.15


@pytest.mark.distributed
def test_checkpoint_of_two_processes_resumes_on_one(runs, tmp_path):
    # Take the 2-process FSDP run back to its step-4 checkpoint and finish it in one process.
    src = runs / "fsdp"
    run = tmp_path / "resumed"
    link_tokens(run, runs / "tokens")
    shutil.copytree(src / "pretrain", run / "pretrain")
    (run / "pretrain" / "metrics.jsonl").unlink()
    (run / "pretrain" / "checkpoints" / "latest").write_text("step_00000004\n")
    shutil.rmtree(run / "pretrain" / "checkpoints" / "step_00000008")
    summary = run_stage(settings_for(run, micro_batch_size=4, global_batch_tokens=SEQ * 8), run, "pretrain")
    assert summary["new_steps"] == 4 and summary["steps"] == 8
    ref = read_losses(runs / "single" / "pretrain")
    got = read_losses(run / "pretrain")
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=TOLERANCE)
