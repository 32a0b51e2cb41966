"""`murmur eval` end to end on a tiny run folder: results, samples, report card, charts, comparison, bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from eval_fixtures import make_run, tiny_model, tokenizer, write_posts  # noqa: F401 (fixtures)
from PIL import Image

from murmur.cli import main
from murmur.eval.report import CHART_KEY

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--set", "eval.ranking_examples=8", "--set", "eval.canary_candidates=50",
        "--set", "eval.prompts=['hi there', 'what is up?']", "--set", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("evalrun"))
    canaries = {"seed": 0, "canaries": [
        {"id": "canary-0", "prefix": "my blue falcon secret code is", "secret": "482913 07", "repeats": 10,
         "inserted": True, "text": "my blue falcon secret code is 482913 07"},
        {"id": "canary-1", "prefix": "my quiet harbor secret code is", "secret": "120044 93", "repeats": 0,
         "inserted": False, "text": "my quiet harbor secret code is 120044 93"}]}
    (run / "data" / "canaries.json").write_text(json.dumps(canaries))
    assert main(["eval", str(run), *FAST]) == 0
    return run


def test_results_samples_and_report_are_written(evaluated_run):
    results = json.loads((evaluated_run / "eval" / "results.json").read_text())
    assert set(results["bpb"]) == {"validation", "test"}
    assert results["bpb"]["validation"]["posts"] == 12 and results["bpb"]["validation"]["bpb"] > 0
    assert results["ranking"]["examples"] == 8 and results["ranking"]["candidates"] == 20
    assert set(results["ranking"]) >= {"ll", "pmi", "chance"}
    assert [c["repeats"] for c in results["privacy"]["canaries"]] == [10, 0]
    assert [c["extracted"] for c in results["privacy"]["canaries"]] == [False, False]  # an untrained model
    assert results["privacy"]["pii_scan"]["texts"] == 4
    samples = [json.loads(line) for line in (evaluated_run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [(s["seed"], s["prompt"]) for s in samples] == [(0, "hi there"), (0, "what is up?"),
                                                           (1, "hi there"), (1, "what is up?")]
    assert all(s["tokens"] <= 8 for s in samples)
    page = (evaluated_run / "report" / "report.md").read_text()
    for chart in ("funnel.png", "loss.png", "bpb.png", "ranking.png", "canaries.png", "throughput.png"):
        assert f"]({chart})" in page
        assert (evaluated_run / "report" / chart).is_file()
    assert f"{results['bpb']['test']['bpb']:.3f}" in page


def _chart(path):
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    return json.loads(image.text[CHART_KEY])


def test_charts_are_pngs_whose_numbers_match_the_report(evaluated_run):
    report = evaluated_run / "report"
    assert (report / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = _chart(report / "funnel.png")
    page = (report / "report.md").read_text()
    section = page.split("## Data funnel")[1].split("##")[0]
    table = {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"^\| (.+?) \| ([\d,]+) \|$",
                                                                                 section, re.MULTILINE)}
    stats = json.loads((evaluated_run / "data" / "stats.json").read_text())
    assert drawn == table
    assert table["in"] == stats["records_in"] and table["kept"] == stats["kept"]
    assert table["dropped: too_short"] == stats["dropped"]["too_short"]
    assert table["in"] == table["kept"] + table["quarantined"] + sum(
        v for k, v in table.items() if k.startswith("dropped"))

    results = json.loads((evaluated_run / "eval" / "results.json").read_text())
    ranking = _chart(report / "ranking.png")
    assert ranking["pmi"][0] == pytest.approx(results["ranking"]["pmi"]["hits@1"])
    assert ranking["chance"] == pytest.approx([0.05, 0.25, results["ranking"]["chance"]["mrr"]])
    bpb = _chart(report / "bpb.png")
    assert bpb["validation"][-1] == pytest.approx(results["bpb"]["validation"]["bpb"])
    loss = _chart(report / "loss.png")
    assert loss["pretrain"]["train"][0] == [4096, 6.0]
    exposures = _chart(report / "canaries.png")
    assert [c["exposure"] for c in exposures] == [c["exposure"] for c in results["privacy"]["canaries"]]


def test_compare_puts_two_runs_side_by_side(evaluated_run, tmp_path):
    other = make_run(tmp_path)
    out = tmp_path / "cmp"
    assert main(["eval", str(evaluated_run), "--out", str(out), "--compare", str(other), *FAST]) == 0
    assert (other / "eval" / "results.json").is_file()  # the other run was evaluated too
    page = (out / "report" / "report.md").read_text()
    assert "## Runs compared" in page and "| metric | cmp | run |" in page
    row = next(line for line in page.splitlines() if line.startswith("| bpb validation |"))
    ours = json.loads((out / "eval" / "results.json").read_text())["bpb"]["validation"]["bpb"]
    theirs = json.loads((other / "eval" / "results.json").read_text())["bpb"]["validation"]["bpb"]
    assert row == f"| bpb validation | {ours:.3f} | {theirs:.3f} |"


def test_bad_input_gives_clear_errors(tmp_path, capsys):
    # A run folder with data but nothing trained.
    bare = tmp_path / "bare"
    write_posts(bare / "data", {"validation": 3, "test": 3})
    assert main(["eval", str(bare)]) == 1
    assert "has no checkpoints" in capsys.readouterr().err

    # A model directory without a tokenizer.
    from murmur.hf import save_hf_model

    tok = tokenizer()
    save_hf_model(tiny_model(tok.vocab_size), tmp_path / "notok")
    assert main(["eval", str(tmp_path / "notok"), "--data", str(bare / "data")]) == 1
    assert "has no tokenizer" in capsys.readouterr().err

    # A model directory without --data.
    assert main(["eval", str(tmp_path / "notok")]) == 1
    assert "--data" in capsys.readouterr().err

    # An empty held-out split.
    run = make_run(tmp_path / "empty")
    write_posts(run / "data", {"train": 10, "validation": 4})
    assert main(["eval", str(run), *FAST]) == 1
    err = capsys.readouterr().err
    assert "no posts in the 'test' split" in err and "Traceback" not in err
    shutil.rmtree(run)


def test_all_checkpoints_get_bits_per_byte(tmp_path):
    from eval_fixtures import tokenizer_dir, write_conversations

    from murmur.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    shutil.copytree(tokenizer_dir(), run / "tokenizer")
    write_posts(run / "data", {"train": 5, "validation": 6, "test": 6})
    write_conversations(run / "data", {"test": 25})
    tok = tokenizer()
    checkpointer = Checkpointer(run / "pretrain", keep=5)
    for step, seed in ((10, 0), (20, 1)):
        model = tiny_model(tok.vocab_size, seed=seed)
        meta = {"format": 1, "stage": "pretrain", "step": step, "tokens": step * 100,
                "model": model.settings.model_dump(mode="json"), "tokenizer_dir": "tokenizer"}
        checkpointer.save(step, model, [], meta, {})
    assert main(["eval", str(run), "--checkpoints", "all", *FAST, "--set", "eval.ranking_examples=0"]) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["model"]["step"] == 20 and results["model"]["stage"] == "pretrain"
    rows = results["checkpoints"]
    assert [(r["name"], r["tokens"]) for r in rows] == [("pretrain/step_00000010", 1000),
                                                         ("pretrain/step_00000020", 2000)]
    assert rows[0]["bpb_validation"] != pytest.approx(rows[1]["bpb_validation"])
    assert rows[1]["bpb_validation"] == pytest.approx(results["bpb"]["validation"]["bpb"])  # same posts, model
    page = (run / "report" / "report.md").read_text()
    assert "| pretrain/step_00000010 | 10 | 1,000 |" in page and "ranking" not in page.split("## Privacy")[0]


def test_run_stage_is_the_build_entry_point(tmp_path):
    from murmur.config import settings_from_dict
    from murmur.eval.runner import run_stage

    run = make_run(tmp_path)
    settings = settings_from_dict({"run": {"dir": str(run)}, "eval": {
        "ranking_examples": 5, "prompts": ["hello"], "sample_seeds": [0], "max_new_tokens": 4}})
    summary = run_stage(settings, run)
    results = json.loads((run / "eval" / "results.json").read_text())
    assert summary["bpb_validation"] == results["bpb"]["validation"]["bpb"]
    assert summary["ranking_pmi_hits@1"] == results["ranking"]["pmi"]["hits@1"]
    assert (run / "report" / "report.md").is_file() and summary["report"].endswith("report.md")
