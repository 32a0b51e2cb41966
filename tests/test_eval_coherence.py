"""Coherence of samples (perplexity under the other models, distinct-2) and the side-by-side report card."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from eval_fixtures import make_run, tiny_model, tokenizer, tokenizer_dir

from murmur.cli import main
from murmur.eval.coherence import Judge, coherence_matrix, distinct_n, judged_perplexity
from murmur.eval.compare import side_by_side
from murmur.eval.scoring import sequence_logprobs
from murmur.settings.eval import EvalSettings

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(ranking_examples=6, canary_candidates=20, prompts=["hi there", "what is up?"], sample_seeds=[0],
             max_new_tokens=6, checkpoints="latest")


def test_distinct_2_counts_distinct_word_bigrams():
    assert distinct_n(["A b a b", "a B"]) == pytest.approx(2 / 4)  # (a b) three times, (b a) once
    assert distinct_n(["one two three", "four five"]) == 1.0
    assert distinct_n(["yes", ""]) is None  # no bigram at all


def test_judged_perplexity_is_the_judge_likelihood_of_the_replies_given_their_prompts():
    tok = tokenizer()
    judge = Judge("judge", tiny_model(tok.vocab_size, seed=3), tok)
    samples = [{"prompt": "hi there", "reply": "hello to you"}, {"prompt": "hi there", "reply": "so what"},
               {"prompt": "how are you", "reply": "fine thanks"}, {"prompt": "how are you", "reply": "  "}]
    result = judged_perplexity(judge, samples)
    nats, tokens = 0.0, 0
    for sample in samples[:3]:  # the blank reply is skipped
        prefix = tok.render_chat([{"role": "user", "content": sample["prompt"]}], add_generation_prompt=True)
        reply = tok.encode(sample["reply"], specials_as_text=True)
        logps = sequence_logprobs(judge.model, [prefix + reply], [len(prefix)])[0]
        nats -= float(logps.sum())
        tokens += len(reply)
    assert result["tokens"] == tokens and result["replies"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)


def test_no_model_judges_itself_and_repetition_shows_in_distinct_2():
    tok = tokenizer()
    judges = {"small": Judge("small", tiny_model(tok.vocab_size, seed=1), tok),
              "big": Judge("big", tiny_model(tok.vocab_size, seed=2, dim=64), tok)}
    samples = {"small": [{"prompt": "hi", "reply": "nice to meet you, I like tea"}],
               "big": [{"prompt": "hi", "reply": "yes yes yes yes yes yes"}]}
    matrix = coherence_matrix(samples, judges)
    assert matrix["primary_judge"] == "big"
    assert matrix["models"]["small"]["perplexity"]["small"] is None
    assert matrix["models"]["big"]["perplexity"]["big"] is None
    assert matrix["models"]["small"]["judge"] == "big" and matrix["models"]["big"]["judge"] == "small"
    assert matrix["models"]["small"]["judged_perplexity"] == matrix["models"]["small"]["perplexity"]["big"] > 1
    assert matrix["models"]["big"]["distinct_2"] == pytest.approx(1 / 5)
    assert matrix["models"]["small"]["distinct_2"] == 1.0


def test_side_by_side_card_reads_runs_evaluates_models_and_judges_every_sample(tmp_path):
    overrides = [arg for key, value in SMALL.items()
                 for arg in ("--set", f"eval.{key}={value!r}" if isinstance(value, list) else f"eval.{key}={value}")]
    run = make_run(tmp_path / "a")
    other = make_run(tmp_path / "b")
    assert main(["eval", str(run), *overrides]) == 0
    assert main(["eval", str(other), *overrides]) == 0
    base = tmp_path / "base"
    from murmur.hf import save_hf_model

    save_hf_model(tiny_model(tokenizer().vocab_size, seed=7), base, tokenizer_dir=tokenizer_dir())
    settings = EvalSettings(**SMALL)
    lines: list[str] = []
    page = side_by_side(run, [("base", base), ("scratch", other)], settings, label="finetuned", progress=lines.append)
    report = page.read_text()
    assert "| metric | finetuned | base | scratch |" in report
    assert "## Replies side by side" in report and "| hi there |" in report
    assert "samples: perplexity judged by base" in report
    compare = json.loads((run / "eval" / "compare.json").read_text())
    rows = compare["coherence"]["models"]
    assert set(rows) == {"finetuned", "base", "scratch"}
    assert all(rows[name]["perplexity"][name] is None for name in rows)
    assert (run / "compare" / "base" / "eval" / "results.json").is_file()  # the model was evaluated on run's data
    assert any(line.startswith("eval: base (") for line in lines)
    # A second card reuses the base's results while the eval settings are the same.
    lines.clear()
    side_by_side(run, [("base", base), ("scratch", other)], settings, label="finetuned", progress=lines.append)
    assert not any(line.startswith("eval: base (") for line in lines)
    shutil.rmtree(other / "eval")
    with pytest.raises(Exception, match="has no eval/results.json"):
        side_by_side(run, [("scratch", other)], settings)
