"""A long data run shows its progress on the console: records read, kept, quarantined, throughput and ETA;
nothing when asked not to (the Ray executor's line is checked in tests/test_data_ray.py)."""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import source_specs, write_corpus

from murmur.cli import main

COLUMNS = 'data.columns={id="post",text="body",author_id="user",created_at="when"}'


def run_cli(tmp_path, *flags) -> str:
    paths = write_corpus(tmp_path / "in")
    argv = ["data", "--out", str(tmp_path / "out"), "--set", COLUMNS, "--set", "data.batch_size=8",
            "--set", "data.workers=1", *flags]
    for spec in source_specs(paths):
        argv += ["--source", spec]
    assert main(argv) == 0
    return argv


def test_the_progress_line_counts_records_and_estimates_the_time_left(tmp_path, capsys):
    run_cli(tmp_path, "--progress")
    captured = capsys.readouterr()
    last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    funnel_in = int(re.search(r"records in\s+([\d,]+)", captured.out).group(1).replace(",", ""))
    read = int(re.search(r"read ([\d,]+)", last).group(1).replace(",", ""))
    assert read == funnel_in  # every record read is counted
    assert re.search(r"kept [\d,]+ \| quarantined [1-9][\d,]* \| [\d,]+ records/s", last)
    assert "ETA" in last and "100%" in last


def test_no_progress_line_when_turned_off(tmp_path, capsys):
    run_cli(tmp_path, "--no-progress")
    captured = capsys.readouterr()
    assert "records/s" not in captured.err and "ETA" not in captured.err
    assert "records in" in captured.out
