"""Training records reach the experiment trackers of `train.loggers` (TensorBoard, trackio, wandb offline),
read back from what each one wrote; a tracker whose package is missing stops the stage before it trains."""

from __future__ import annotations

import glob
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from murmur.errors import MurmurError
from murmur.settings.train import TrainSettings
from murmur.train.metrics import MetricsLogger

RECORDS = [{"step": 10, "tokens": 640, "loss": 3.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_sec": 100.0,
            "mfu": None, "gflops_per_sec": 1.0},
           {"step": 20, "tokens": 1280, "loss": 2.5, "lr": 9e-4, "grad_norm": 0.25, "tokens_per_sec": 110.0,
            "mfu": None, "gflops_per_sec": 1.1},
           {"step": 20, "val_loss": 2.75, "val_bpb": 1.5}]


def write_records(stage_dir: Path, loggers: list[str]) -> MetricsLogger:
    logger = MetricsLogger(stage_dir, 20, 1e6, torch.device("cpu"), 1, loggers=loggers, stream=io.StringIO(),
                           config={"lr": 1e-3})
    for record in RECORDS:
        logger.log(record)
    logger.close()
    return logger


def test_recipes_choose_the_loggers():
    assert TrainSettings().loggers == ["tensorboard"]
    assert TrainSettings(loggers=["tensorboard", "trackio"]).loggers == ["tensorboard", "trackio"]
    with pytest.raises(ValidationError, match="tensorboard"):
        TrainSettings(loggers=["mlflow"])


def test_tensorboard_events_hold_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage = tmp_path / "run" / "pretrain"
    write_records(stage, ["tensorboard"])
    events = EventAccumulator(str(stage / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(10, 3.5), (20, 2.5)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(20, 2.75)]
    assert "mfu" not in events.Tags()["scalars"]  # None is not a number to plot


def wandb_history(path: str) -> list[dict]:
    """The history rows of an offline .wandb file: a LevelDB-format log of protobuf Records after a 7-byte
    header (wandb 0.2x ships no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, rows = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_records(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an extra: pip install 'murmur[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    stage = tmp_path / "run" / "sft"
    write_records(stage, ["wandb"])
    [path] = glob.glob(str(stage / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_history(path)
    # wandb merges what is logged at one step into one row: step 20's training and evaluation records.
    assert [(r["_step"], r["loss"], r.get("val_loss"), r.get("val_bpb")) for r in rows] == [
        (10, 3.5, None, None), (20, 2.5, 2.75, 1.5)]


TRACKIO_SCRIPT = """
import json, sys
from pathlib import Path
from murmur.train.trackers import open_trackers
[tracker] = open_trackers(["trackio"], Path(sys.argv[1]) / "myrun" / "pretrain", {"lr": 1e-3})
for record in json.loads(sys.argv[2]):
    tracker.log({k: v for k, v in record.items() if k != "step" and v is not None}, record["step"])
tracker.close()
from trackio.sqlite_storage import SQLiteStorage
print("LOGS=" + json.dumps(SQLiteStorage.get_logs("myrun", "pretrain")))
"""


def test_trackio_run_holds_the_records_locally(tmp_path):
    pytest.importorskip("trackio", reason="trackio is an extra: pip install 'murmur[trackio]'")
    # trackio reads TRACKIO_DIR when imported: a process of its own keeps the test's folder its only store
    # (the tracker alone there, without torch: MetricsLogger's part is the same for every tracker).
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path), json.dumps(RECORDS)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logs = json.loads(done.stdout.split("LOGS=")[1].splitlines()[0])
    assert [(r["step"], r.get("loss")) for r in logs if "loss" in r] == [(10, 3.5), (20, 2.5)]
    assert [(r["step"], r["val_loss"]) for r in logs if "val_loss" in r] == [(20, 2.75)]
    assert list((tmp_path / "trackio").glob("myrun.db"))


@pytest.mark.parametrize("name", ["tensorboard", "trackio", "wandb"])
def test_a_missing_tracker_names_its_extra_before_anything_is_written(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # not installed, whatever this machine has
    stage = tmp_path / "run" / "pretrain"
    with pytest.raises(MurmurError, match=rf"pip install 'murmur\[{name}\]'"):
        MetricsLogger(stage, 20, 1e6, torch.device("cpu"), 1, loggers=[name], stream=io.StringIO())
    assert not (stage / "metrics.jsonl").exists()


def test_no_matplotlib_means_no_loss_png_and_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    stream = io.StringIO()
    logger = MetricsLogger(tmp_path / "run" / "pretrain", 20, 1e6, torch.device("cpu"), 1, loggers=[],
                           stream=stream)
    logger.log(RECORDS[0])
    logger.close()
    assert not (tmp_path / "run" / "pretrain" / "loss.png").exists()
    assert "pip install 'murmur[plot]'" in stream.getvalue()
    assert json.loads((tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text())["loss"] == 3.5
