"""The eval sized for a real model on a laptop: standard errors of the ranking figures, progress while it runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from eval_fixtures import make_run, tiny_model, tokenizer, write_conversations

from murmur.cli import main
from murmur.eval.ranking import ModelReplyScorer, build_examples, evaluate_ranking, rank_metrics, read_conversations

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_ranking_figure_has_its_standard_error_over_the_contexts():
    # Four contexts of five candidates, the true one at 0: ranked 1st, 3rd, 5th and 1st.
    scores = np.array([[9, 1, 2, 3, 4], [5, 9, 6, 1, 0], [0, 1, 2, 3, 4], [3, 2, 1, 0, -1]], dtype=float)
    result = rank_metrics(scores, np.zeros(4, dtype=int), ks=(1, 5))
    hits1, mrr = [1, 0, 0, 1], [1, 1 / 3, 1 / 5, 1]
    assert result["hits@1"] == 0.5
    assert result["se"]["hits@1"] == pytest.approx(np.std(hits1, ddof=1) / 2)
    assert result["se"]["hits@5"] == 0.0  # every true reply is in the top 5
    assert result["mrr"] == pytest.approx(np.mean(mrr))
    assert result["se"]["mrr"] == pytest.approx(np.std(mrr, ddof=1) / 2)
    assert rank_metrics(scores[:1], np.zeros(1, dtype=int))["se"]["hits@1"] == 0.0  # one context: no spread


def test_the_scorer_reports_progress_through_the_contexts(tmp_path):
    tok = tokenizer()
    write_conversations(tmp_path, {"test": 40})
    examples = build_examples(read_conversations(tmp_path, "test"), 20, 4, seed=0)
    lines: list[str] = []
    ticks = iter(range(1000))
    scorer = ModelReplyScorer(tiny_model(tok.vocab_size), tok, progress=lines.append, clock=lambda: next(ticks))
    result = evaluate_ranking(examples, scorer)
    assert result["examples"] == 20
    assert lines[0].startswith("eval: reply ranking: ") and "distinct replies scored without context" in lines[0]
    done = [int(line.split(": ")[2].split("/")[0]) for line in lines[1:]]
    assert done == list(range(2, 20, 2))  # about every tenth of the contexts, in order
    assert all(line.endswith(" s)") and "/20 contexts" in line for line in lines[1:])


def test_murmur_eval_prints_progress_and_states_the_standard_error(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", str(run), "--set", "eval.ranking_examples=10", "--set", "eval.canary_candidates=20",
                 "--set", "eval.prompts=['hi there']", "--set", "eval.max_new_tokens=4",
                 "--set", "eval.checkpoints=latest"]) == 0
    out = capsys.readouterr().out
    order = ["eval: bits per byte on", "eval: reply ranking of up to 10", "eval: reply ranking: 1/10 contexts",
             "eval: reply ranking hits@1", "eval: 2 samples", "eval: privacy probes"]  # 2 seeds
    positions = [out.find(line) for line in order]
    assert -1 not in positions and positions == sorted(positions), out
    results = json.loads((run / "eval" / "results.json").read_text())
    se = results["ranking"]["pmi"]["se"]["hits@1"]
    assert math.isfinite(se) and f"± {se:.3f}" in out
    report = (run / "report" / "report.md").read_text()
    assert f"{results['ranking']['pmi']['hits@1']:.3f} ± {se:.3f}" in report
