"""The model card of an exported folder: what the run really did (curation counts, deletions, evaluation),
read back through huggingface_hub.ModelCard as the Hub reads it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_corpus import thread_tweets, tweet

from murmur.config import Settings
from murmur.data import pipeline
from murmur.export import run_stage as export_stage
from murmur.model import Transformer
from murmur.model_card import write_model_card
from murmur.settings.data import DataSettings
from murmur.settings.model import ModelSettings
from murmur.train import checkpoint as ckpt

RESULTS = {"bpb": {"validation": {"bpb": 2.3456, "loss": 1.6}, "test": {"bpb": 2.4012, "loss": 1.7}},
           "ranking": {"ll": {"hits@1": 0.25, "mrr": 0.4}, "pmi": {"hits@1": 0.5, "mrr": 0.625}},
           "privacy": {"canaries": [{"inserted": True, "exposure": 3.5}, {"inserted": True, "exposure": 7.25},
                                    {"inserted": False, "exposure": 19.0}],
                       "pii_scan": {"texts_with_pii": 1}},
           "lm_eval": {"my_task": {"acc": 0.75, "acc_stderr": 0.1}}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder whose data stage really ran on a tiny corpus with a deletion list."""
    root = tmp_path_factory.mktemp("card")
    posts = root / "private-folder" / "posts.jsonl"
    posts.parent.mkdir()
    extra = [tweet(7001, "Alice also says the farmers market opens at eight on Saturdays", author="alice"),
             tweet(7002, "A completely separate note about the library's new opening hours", author="dave")]
    posts.write_text("\n".join(json.dumps(t) for t in thread_tweets() + extra) + "\n")
    deletions = root / "deletions.txt"
    deletions.write_text("post:1000000000000000002\naccount:carol\naccount:dave\nrestore account:dave\n")
    run = root / "run"
    pipeline.run(DataSettings(sources=[f"x-api:{posts}"], workers=1, deletions=str(deletions)), run / "data",
                 progress=False)
    return run


def settings(**model) -> Settings:
    return Settings(run={"name": "cafe"}, model={"preset": "tiny-cpu", **model})


def test_the_card_tells_what_the_run_did(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "results.json").write_text(json.dumps(RESULTS))
    try:
        path = write_model_card(tmp_path / "model", run_dir, settings())
    finally:
        (run_dir / "eval" / "results.json").unlink()
    card = ModelCard.load(path)
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert card.data.license == "other" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model is None
    text = card.text
    assert "# cafe" in text and "pretrained from scratch (preset `tiny-cpu`)" in text
    # Curation counts, exactly as the data stage recorded them.
    assert f"| posts read | {stats['in']:,} |" in text and f"| posts kept | {stats['kept']:,} |" in text
    assert f"| removed for a deletion | {stats['deleted']} |" in text and stats["deleted"] > 0
    assert "`x-api:posts.jsonl`" in text and "private-folder" not in text  # the source, not where it lies
    # Four events: one post and one account stay deleted (dave was restored by the last one).
    assert "4 deletion events, leaving 1 posts and 1 accounts deleted" in text
    # The evaluation's headline numbers; a canary that was never planted is not a measure of memorisation.
    for row in ("| bits per byte, validation (lower is better) | 2.346 |", "| reply ranking MRR (pmi) | 0.625 |",
                "| max canary exposure, bits (memorisation of planted secrets) | 7.25 |",
                "| sampled replies with personal data | 1 |", "| lm-eval my_task acc | 0.75 |"):
        assert row in text
    assert "acc_stderr" not in text
    for section in ("## Intended use", "## Limitations", "## Licence", "## Deletions honoured"):
        assert section in text


def test_a_card_before_evaluation_says_so_and_links_a_hub_base_model(run_dir, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(write_model_card(tmp_path / "m", run_dir, settings(base="HuggingFaceTB/SmolLM2-135M")))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "finetuned from `HuggingFaceTB/SmolLM2-135M`" in card.text
    assert "Not evaluated yet" in card.text
    local = ModelCard.load(write_model_card(tmp_path / "n", run_dir, settings(base=str(tmp_path))))
    assert local.data.base_model is None  # a local folder is no base model the Hub can link


def test_the_export_stage_writes_the_card_beside_the_weights(tmp_path):
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    model_settings = ModelSettings(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                   max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(model_settings)
    model.init_weights()
    meta = {"model": model_settings.model_dump(mode="json"), "stage": "pretrain", "step": 1, "tokens": 0,
            "tokenizer_dir": None}
    ckpt.Checkpointer(run / "pretrain", keep=1).save(1, model, [], meta, {})
    summary = export_stage(settings(), run)
    card = ModelCard.load(Path(summary["model_dir"]) / "README.md")
    assert (Path(summary["model_dir"]) / "config.json").is_file()
    assert "# cafe" in card.text and "No curation record" in card.text and "Not evaluated yet" in card.text
