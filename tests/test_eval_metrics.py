"""Bits per byte, reply ranking and canary exposure on tiny models built here."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import (
    sentence,
    tiny_model,
    tokenizer,
    write_conversations,
    write_posts,
)

from murmur.errors import MurmurError
from murmur.eval.bpb import bits_per_byte, document_windows, read_split_posts
from murmur.eval.privacy import (
    canary_exposure,
    exposure_from_scores,
    greedy_extraction,
    scan_for_pii,
    secret_candidates,
)
from murmur.eval.ranking import (
    ModelReplyScorer,
    RankingExample,
    build_examples,
    chance_metrics,
    evaluate_ranking,
    rank_metrics,
    read_conversations,
)
from murmur.eval.scoring import continuation_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bpb_from_mean_loss_matches_direct_summation():
    tok = tokenizer()
    # A short context forces the long post into several windows.
    model = tiny_model(tok.vocab_size, max_seq_len=16)
    rng = random.Random(1)
    texts = [sentence(rng) for _ in range(9)] + [" ".join(sentence(rng) for _ in range(6)), "héllo ünïcode ✓"]
    result = bits_per_byte(model, tok, texts, batch_size=4)

    # Direct: every post one unbatched forward pass per window, bits summed token by token.
    bits, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tok.eos_id, *tok.encode(text), tok.eos_id]
            for window in document_windows(ids, 16):
                logits = model(torch.tensor([window[:-1]]))[0]
                logp = torch.log_softmax(logits.double(), -1)
                for pos, target in enumerate(window[1:]):
                    bits -= float(logp[pos, target]) / math.log(2)
                    tokens += 1
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert result.tokens == tokens == sum(len(tok.encode(t)) + 1 for t in texts)
    assert result.bytes == n_bytes
    assert result.bpb == pytest.approx(bits / n_bytes, rel=1e-5)
    # And from the trainer's view: mean cross-entropy × tokens / (ln 2 × bytes).
    assert result.loss * result.tokens / (math.log(2) * result.bytes) == pytest.approx(bits / n_bytes, rel=1e-5)
    # A random model is near-uniform over the vocabulary: loss close to ln(V).
    assert abs(result.loss - math.log(tok.vocab_size)) < 0.5


def test_document_windows_predict_every_token_once():
    ids = list(range(23))
    windows = document_windows(ids, 8)
    assert all(len(w) <= 8 for w in windows)
    predicted = [t for w in windows for t in w[1:]]
    assert predicted == ids[1:]


def test_empty_eval_split_is_a_clear_error(tmp_path):
    write_posts(tmp_path, {"train": 5, "validation": 0})
    with pytest.raises(MurmurError, match="no posts in the 'validation' split"):
        read_split_posts(tmp_path, "validation", 100)
    assert len(read_split_posts(tmp_path, "train", 3)) == 3


def test_ranking_metrics_perfect_and_uniform_and_random():
    n, c = 50, 20
    rng = np.random.default_rng(0)
    true_index = rng.integers(0, c, size=n)
    perfect = np.zeros((n, c))
    perfect[np.arange(n), true_index] = 1.0
    assert rank_metrics(perfect, true_index) == {"hits@1": 1.0, "hits@5": 1.0, "mrr": 1.0,
                                                 "se": {"hits@1": 0.0, "hits@5": 0.0, "mrr": 0.0}}
    uniform = rank_metrics(np.zeros((n, c)), true_index)
    chance = chance_metrics(c)
    assert chance["hits@1"] == pytest.approx(0.05) and chance["hits@5"] == pytest.approx(0.25)
    for key in chance:
        assert uniform[key] == pytest.approx(chance[key])
    random_scores = rank_metrics(rng.normal(size=(4000, c)), rng.integers(0, c, size=4000))
    assert random_scores["hits@1"] == pytest.approx(0.05, abs=0.015)
    assert random_scores["mrr"] == pytest.approx(chance["mrr"], abs=0.02)
    worst = -perfect
    assert rank_metrics(worst, true_index)["hits@5"] == 0.0


def test_evaluate_ranking_with_an_oracle_and_a_uniform_scorer(tmp_path):
    write_conversations(tmp_path, {"test": 40})
    examples = build_examples(read_conversations(tmp_path, "test"), 30, 19, seed=3)
    assert len(examples) == 30 and all(len(e.candidates) == 20 for e in examples)
    assert all(len(set(e.candidates)) == 20 for e in examples)
    assert examples == build_examples(read_conversations(tmp_path, "test"), 30, 19, seed=3)  # fixed seed

    def oracle(exs: list[RankingExample]) -> dict[str, np.ndarray]:
        scores = np.zeros((len(exs), 20))
        scores[np.arange(len(exs)), [e.true_index for e in exs]] = 1.0
        return {"ll": scores}

    result = evaluate_ranking(examples, oracle)
    assert result["ll"] == {"hits@1": 1.0, "hits@5": 1.0, "mrr": 1.0,
                            "se": {"hits@1": 0.0, "hits@5": 0.0, "mrr": 0.0}}
    uniform = evaluate_ranking(examples, lambda exs: {"ll": np.ones((len(exs), 20))})
    assert {k: v for k, v in uniform["ll"].items() if k != "se"} == pytest.approx(uniform["chance"])


def test_too_few_conversations_for_distractors_is_a_clear_error(tmp_path):
    write_conversations(tmp_path, {"test": 3})
    with pytest.raises(MurmurError, match="lower eval.distractors"):
        build_examples(read_conversations(tmp_path, "test"), 10, 19, seed=0)


def test_model_scorer_matches_full_sequence_scoring(tmp_path):
    tok = tokenizer()
    model = tiny_model(tok.vocab_size, seed=2)
    write_conversations(tmp_path, {"test": 30})
    examples = build_examples(read_conversations(tmp_path, "test"), 2, 19, seed=0)
    scorer = ModelReplyScorer(model, tok, max_context_tokens=40, max_reply_tokens=12, batch_size=7)
    scores = scorer(examples)
    example = examples[1]
    context = tok.render_chat(example.context, add_generation_prompt=True)[-40:]
    prompt = tok.render_chat([], add_generation_prompt=True)
    for j in (0, example.true_index, 19):
        reply = scorer.reply_ids(example.candidates[j])
        assert reply[-1] == tok.im_end_id
        with torch.no_grad():
            def total(prefix, reply=reply):
                seq = torch.tensor([prefix + reply])
                logp = F.log_softmax(model(seq)[0, :-1].double(), -1)
                return sum(float(logp[len(prefix) - 1 + i, t]) for i, t in enumerate(reply))
            assert scores["ll"][1, j] == pytest.approx(total(context), abs=1e-3)
            assert scores["pmi"][1, j] == pytest.approx(total(context) - total(prompt), abs=1e-3)


def test_continuation_logprobs_handles_empty_and_single_token_continuations():
    tok = tokenizer()
    model = tiny_model(tok.vocab_size)
    out = continuation_logprobs(model, [tok.eos_id, 5], [[], [7], [7, 8, 9]], batch_size=2)
    assert [len(x) for x in out] == [0, 1, 3]
    assert out[1][0] == pytest.approx(out[2][0], abs=1e-5)


def test_exposure_formula():
    candidates = np.arange(999, dtype=float)  # the true score beats all of them
    top = exposure_from_scores(1e6, candidates)
    assert top["rank"] == 1 and top["exposure"] == pytest.approx(math.log2(1000))
    assert top["exposure_estimated"] > top["exposure"]
    bottom = exposure_from_scores(-1.0, candidates)
    assert bottom["exposure"] == pytest.approx(0.0) and bottom["exposure_estimated"] < 0.1
    assert len(set(secret_candidates("ab-12", 50, 0))) == 50
    assert all(len(c) == 5 and c[2] == "-" and c[3:].isdigit() for c in secret_candidates("ab-12", 50, 0))


def test_pii_scan_flags_exactly_what_the_scrubber_replaces():
    from murmur.data.clean import Cleaner
    from murmur.settings.data import DataSettings

    texts = ["mail me at jo@example.com or call +1 415 555 0123", "room +12 34 56, card 4111 1111 1111 1111",
             "server 10.0.0.1", "card 4111 1111 1111 1112 fails the Luhn check", "nothing here"]
    scan = scan_for_pii(texts)
    assert scan["matches"] == {"email": 1, "card": 1, "ip": 1, "phone": 1, "iban": 0, "ssn": 0}
    assert scan["texts_with_pii"] == 3
    cleaner = Cleaner(DataSettings(sources=["text:x"]))
    replaced = sum(cleaner._scrub(t)[1] for t in texts)
    # "+12 34 56" (too few digits for a phone) and the card failing Luhn are left alone by both.
    assert replaced == sum(scan["matches"].values())


def test_canary_exposure_high_when_memorised_and_low_when_never_seen():
    tok = tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size, max_seq_len=64, dim=48).train()
    planted = ("my code is ", "7203")
    rng = random.Random(5)
    # Training text: the canary repeated many times among ordinary posts.
    docs = [planted[0] + planted[1]] * 40 + [sentence(rng) for _ in range(40)]
    sequences = [[tok.eos_id, *tok.encode(d), tok.eos_id] for d in docs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(90):
        batch = random.Random(step).sample(sequences, 16)
        width = max(len(s) for s in batch)
        x = torch.full((16, width), tok.eos_id)
        for row, s in enumerate(batch):
            x[row, :len(s)] = torch.tensor(s)
        targets = x[:, 1:].clone()
        for row, s in enumerate(batch):
            targets[row, len(s) - 1:] = -100
        loss = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), targets, ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    seen = canary_exposure(model, tok, *planted, n_candidates=500, seed=0, separator="")
    unseen = [canary_exposure(model, tok, "my pin is", secret, n_candidates=500, seed=0)["exposure"]
              for secret in ("5551", "8086", "3149")]
    assert seen["rank"] == 1 and seen["exposure"] == pytest.approx(seen["max_exposure"])
    assert seen["exposure_estimated"] > 10
    assert np.mean(unseen) < 4.0  # random ranks average about 1.44 bits out of ~9
    assert greedy_extraction(model, tok, planted[0], planted[1])  # the attack exposure warns of
    assert not greedy_extraction(model, tok, "my pin is ", "5551")


def test_samples_fit_replies_into_the_context_left():
    from murmur.eval.samples import generate_samples

    tok = tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=64)
    long_prompt = " ".join(["word"] * 200)
    prompt = tok.decode(tok.encode(long_prompt)[:40])  # most of the 64-token context
    [sample] = generate_samples(model, tok, [prompt], seeds=[0], max_new_tokens=48)
    assert 1 <= sample["tokens"] <= 64 - len(tok.render_chat([{"role": "user", "content": prompt}], True))
