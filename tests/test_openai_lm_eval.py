"""lm-evaluation-harness as a client: its `local-completions` model (prompt logprobs through echo, the remote
tokenizer through /tokenize) and `local-chat-completions` run local YAML tasks against a live uvicorn server,
and the served log-likelihoods equal Murmur's own lm-eval model (`murmur eval --lm-eval`) on the same task."""

from __future__ import annotations

import json

import pytest
from serve_fixtures import LiveServer, make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.eval.lm_eval_adapter import MurmurLM
from murmur.infer.engine import Engine
from murmur.serve.app import create_app
from murmur.settings.serve import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-eval"
CONTEXT = 256
DOCS = [{"text": "the quick brown fox jumps over the lazy dog", "good": "coffee in the morning",
         "bad": "morning the in coffee", "question": "hello world, how are", "answer": " you"},
        {"text": "music at night, and a long walk in the rain", "good": "I am fine, thanks",
         "bad": "fine am I thanks,", "question": "the lazy", "answer": " dog"},
        {"text": "héllo wörld, naïve café, déjà vu", "good": "a long walk in the rain",
         "bad": "rain the in walk long a", "question": "coffee in the", "answer": " morning"}]

TASKS = """
task: murmur_api_{name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
{body}
metadata:
  version: 1.0
"""
BODIES = {
    # Whole documents: both sides condition each on <|endoftext|> (lm-eval's prefix token for this tokenizer).
    "rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
               "metric_list:\n  - metric: word_perplexity",
    # Sentence pairs scored from an empty context, as BLiMP is.
    "pairs": 'output_type: multiple_choice\ndoc_to_text: ""\ntarget_delimiter: ""\n'
             'doc_to_choice: "{{[good, bad]}}"\ndoc_to_target: 0\nmetric_list:\n  - metric: acc',
    "gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
           'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match',
}


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in BODIES.items():
        (tmp_path / f"murmur_api_{name}.yaml").write_text(TASKS.format(name=name, data=data, body=body))
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tmp_path), include_defaults=False)


def scores(model, tasks, names: list[str], **kw) -> dict[str, list]:
    """Each task's per-request answers (log-likelihoods, generations), in document order."""
    import lm_eval.models.openai_completions  # noqa: F401 (registers local-completions and local-chat-completions)
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=model, tasks=names, task_manager=tasks, log_samples=True, bootstrap_iters=0,
                          **kw)
    return {name: [sample["resps"] for sample in sorted(samples, key=lambda s: s["doc_id"])]
            for name, samples in out["samples"].items()}


def flat(values) -> list[float]:
    """The numbers inside lm-eval's nested responses ([[(-3.2, False)], ...] or [[-12.5]])."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return [float(values)]
    if isinstance(values, (list, tuple)):
        return [x for v in values for x in flat(v)]
    return []


def test_local_completions_scores_equal_murmurs_own_lm_eval(tokenizer, tasks):
    model = make_model(tokenizer.vocab_size, max_seq_len=CONTEXT, seed=3)
    engine = Engine(model, tokenizer, max_batch_size=4)
    with LiveServer(create_app(ServeSettings(), engine=engine, model_name=MODEL)) as server:
        served = scores("local-completions", tasks, ["murmur_api_rolling", "murmur_api_pairs"],
                        model_args=f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                                   f"max_length={CONTEXT},num_concurrent=1,max_retries=1,batch_size=2")
        served_tokens = engine.counters["prompt_tokens"]
    local = scores(MurmurLM(model=model, tokenizer=tokenizer, batch_size=4), tasks,
                   ["murmur_api_rolling", "murmur_api_pairs"])
    assert served_tokens > 0  # the scores came through the server
    for name in local:
        assert len(flat(served[name])) == len(flat(local[name])) > 0
        assert flat(served[name]) == pytest.approx(flat(local[name]), abs=1e-3), name


def test_local_chat_completions_generates_through_the_server(tokenizer, tasks):
    engine = Engine(make_model(tokenizer.vocab_size, max_seq_len=CONTEXT), tokenizer, max_batch_size=4)
    with LiveServer(create_app(ServeSettings(), engine=engine, model_name=MODEL)) as server:
        got = scores("local-chat-completions", tasks, ["murmur_api_gen"], apply_chat_template=True,
                     model_args=f"model={MODEL},base_url={server.url}/v1/chat/completions,num_concurrent=1,"
                                "max_retries=1,tokenizer_backend=None")
        finished = engine.counters["finished"]
    assert finished == len(DOCS)
    replies = [r[0][0] if isinstance(r[0], list) else r[0] for r in got["murmur_api_gen"]]
    assert len(replies) == len(DOCS) and all(isinstance(reply, str) for reply in replies)
