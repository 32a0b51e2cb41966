"""Every layout the planner recommends, on real processes: torchrun --nproc-per-node 4 on gloo/CPU.

One launch trains HSDP 2×2, FSDP 2 × TP 2, PP 2 × FSDP 2, PP 2 × TP 2, PP 2 × 2 replicas, and PP 4 with two interleaved
stages per rank (Interleaved1F1B and InterleavedZeroBubble), each on the same global batch as one process;
every step's loss and the validation losses must match the one-process run within float32 reduction-order
noise. Checkpoints then cross layouts: PP 2 × FSDP 2 -> FSDP 4 -> one process, and HSDP -> PP 2 × TP 2,
each continuing the one-process trajectory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train_helpers import SEQ, link_tokens, read_losses, read_val, write_pretrain_tokens
from train_layouts_worker import LAYOUTS, RESUMES, STEPS, continue_from, layout_settings

from murmur.train.trainer import run_stage

HERE = Path(__file__).parent
TOLERANCE = 2e-5  # relative; the layouts sum the same terms in a different order
REFERENCES = {2: "single", 8: "single8"}  # one process, by the model's number of blocks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("layouts")
    tokens = work / "tokens"
    write_pretrain_tokens(tokens, validation_tokens=SEQ * 3 + 1)  # 3 windows: some ranks get none
    for name in (*REFERENCES.values(), *LAYOUTS, *RESUMES, "fsdp4_to_single"):
        link_tokens(work / name, tokens)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                str(HERE / "train_layouts_worker.py"), str(work)]
    proc = subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Meanwhile, the one-process references: 2 sequences × 4 micro-batches = the same 8 sequences per step.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for layers, name in REFERENCES.items():
            run_stage(layout_settings(work / name, layers), work / name, "pretrain")
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-6000:]
        # The last leg of PP 2 × FSDP 2 -> FSDP 4 -> one process.
        continue_from(work / "pp_fsdp_to_fsdp4", work / "fsdp4_to_single", step=3)
        run_stage(layout_settings(work / "fsdp4_to_single"), work / "fsdp4_to_single", "pretrain")
    finally:
        torch.set_num_threads(threads)
        if proc.poll() is None:
            proc.kill()
    return work


def _assert_follows(got: dict[int, float], ref: dict[int, float], steps: list[int], what: str) -> None:
    assert sorted(got) == steps, (what, got)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=TOLERANCE), (what, step, got[step], ref[step])


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_four_process_layout_matches_one_process(runs, layout):
    layers = LAYOUTS[layout][0]
    reference = runs / REFERENCES[layers] / "pretrain"
    ref = read_losses(reference)
    assert ref[STEPS] < ref[1] - 0.05  # and it learns
    _assert_follows(read_losses(runs / layout / "pretrain"), ref, list(range(1, STEPS + 1)), layout)
    ref_val = read_val(reference)
    assert sorted(ref_val) == [0, STEPS]
    _assert_follows(read_val(runs / layout / "pretrain"), ref_val, [0, STEPS], f"{layout} validation")


@pytest.mark.distributed
@pytest.mark.parametrize("name", [*RESUMES, "fsdp4_to_single"])
def test_checkpoint_resumes_under_another_layout(runs, name):
    """PP 2 × FSDP 2 (step 1) -> FSDP 4 (steps 2-4, its step 3) -> one process (step 4); HSDP -> PP 2 × TP 2."""
    ref = read_losses(runs / "single" / "pretrain")
    first = 4 if name == "fsdp4_to_single" else 2
    _assert_follows(read_losses(runs / name / "pretrain"), ref, list(range(first, STEPS + 1)), name)
