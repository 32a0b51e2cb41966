"""The lm-eval adapter runs a local task (YAML over a JSONL file written here) end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_fixtures import tiny_model, tokenizer  # noqa: F401 (fixtures)

pytest.importorskip("lm_eval")

from murmur.eval.lm_eval_adapter import MurmurLM, run_lm_eval

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    {"question": "the cat sat on the", "choices": [" mat", " rain", " coffee"], "answer": 0},
    {"question": "we talked about", "choices": [" books", " hills"], "answer": 1},
    {"question": "rain fell over", "choices": [" quiet hills", " trains", " the cat"], "answer": 2},
    {"question": "coffee and", "choices": [" music", " food", " code", " bikes"], "answer": 1},
]


def _write_task(folder, data_file):
    (folder / "murmur_local_choice.yaml").write_text(f"""
task: murmur_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")
    (folder / "murmur_local_gen.yaml").write_text(f"""
task: murmur_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""")


def _choice_logprob(model, tok, question, choice):
    ids = tok.encode(question + choice)
    context = [tok.eos_id, *tok.encode(question)]
    seq = [tok.eos_id, *ids]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].double(), -1)
    return sum(float(logp[i - 1, seq[i]]) for i in range(len(context), len(seq)))


def test_local_task_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_file = tmp_path / "questions.jsonl"
    data_file.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    _write_task(tmp_path, data_file)
    tok = tokenizer()
    model = tiny_model(tok.vocab_size, seed=4)
    lm = MurmurLM(model=model, tokenizer=tok, batch_size=4)
    results = run_lm_eval(lm, ["murmur_local_choice", "murmur_local_gen"], include_path=tmp_path,
                          include_defaults=False)

    # Accuracy is what the model's own likelihoods say it should be.
    expected = sum(max(range(len(q["choices"])), key=lambda j: _choice_logprob(model, tok, q["question"],
                                                                              q["choices"][j])) == q["answer"]
                   for q in QUESTIONS) / len(QUESTIONS)
    assert results["murmur_local_choice"]["acc,none"] == pytest.approx(expected)
    assert 0.0 <= results["murmur_local_gen"]["exact_match,none"] <= 1.0


def test_loglikelihood_and_rolling_agree_with_direct_scoring():
    tok = tokenizer()
    model = tiny_model(tok.vocab_size, seed=5, max_seq_len=12)
    lm = MurmurLM(model=model, tokenizer=tok, batch_size=3)

    class Req:
        def __init__(self, *args):
            self.args = args

    (ll, _), = lm.loglikelihood([Req("the cat sat on the ", "mat")])
    assert ll == pytest.approx(_choice_logprob(model, tok, "the cat sat on the", " mat"), abs=1e-4)
    text = "the cat sat on a mat while rain fell over quiet hills and we talked about books"  # > 12 tokens
    rolling, = lm.loglikelihood_rolling([Req(text)])
    ids = [tok.eos_id, *tok.encode(text)]
    assert len(ids) > 13
    model_full = tiny_model(tok.vocab_size, seed=5, max_seq_len=256)  # same weights, longer context
    with torch.no_grad():
        logp = torch.log_softmax(model_full(torch.tensor([ids[:-1]]))[0].double(), -1)
    full = sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))
    assert rolling < 0 and math.isfinite(rolling)
    assert rolling != pytest.approx(full, abs=1e-6)  # windows lose context, so they differ a little
    assert rolling == pytest.approx(full, rel=0.2)
