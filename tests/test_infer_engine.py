"""The engine: exact greedy decoding (alone and in a continuous batch), seeds, stops, streaming text, aborts."""

from __future__ import annotations

import pytest
import torch
from serve_fixtures import make_model, make_tokenizer, naive_greedy, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.errors import MurmurError
from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams, filter_logits, sample
from murmur.infer.text import IncrementalDetokenizer, StopMatcher


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer.vocab_size, max_seq_len=96)


PROMPTS = ["hello world", "naïve café 日本語 🙂 and more words here"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_greedy_single_requests_equal_naive_decoder(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4)
    for prompt in PROMPTS + [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]]:
        ids, _ = engine.encode_prompt(prompt)
        [result] = engine.generate([prompt], GREEDY)
        assert result.token_ids == naive_greedy(model, ids, 16)
        assert result.finish_reason == "length" and result.prompt_tokens == len(ids)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_greedy_inside_a_mixed_continuous_batch_equals_naive_decoder(model, tokenizer, compiled):
    # The batch runs full (3 rows) and drains to 1 row: both compiled graphs (several rows, one row) run.
    engine = Engine(model, tokenizer, max_batch_size=3, compile=compiled)
    outputs: dict[str, list] = {}
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=9, seed=5, ignore_eos=True)
    plan = [("hello world", GREEDY), ("coffee", sampled), ("the quick brown fox jumps over", GREEDY)]
    late = [("naïve café 日本語 🙂 and more words here", GREEDY),
            ("rain", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)), ("dog", sampled)]
    ids_of = {}

    def submit(prompt, params):
        ids, _ = engine.encode_prompt(prompt)
        request_id = engine.submit(ids, params, lambda out: outputs.setdefault(out.request_id, []).append(out))
        ids_of[request_id] = (ids, params)

    for prompt, params in plan:
        submit(prompt, params)
    batch_sizes = []
    for step in range(200):
        if step in (3, 4, 6):  # join while others are mid-decode
            submit(*late[(3, 4, 6).index(step)])
        if not engine.step() and step > 6:
            break
        batch_sizes.append(engine.num_running)
    assert max(batch_sizes) == 3 and engine.num_waiting == 0 and engine.num_running == 0
    assert len(outputs) == 6
    for request_id, (ids, params) in ids_of.items():
        tokens = [t for out in outputs[request_id] for t in out.token_ids]
        assert outputs[request_id][-1].finished
        assert len(tokens) == params.max_tokens
        if params.greedy:
            assert tokens == naive_greedy(model, ids, params.max_tokens)


def test_seeded_sampling_is_reproducible_alone_and_batched(model, tokenizer):
    params = [SamplingParams(temperature=1.2, top_k=50, seed=s, max_tokens=12, ignore_eos=True) for s in range(4)]
    solo = [Engine(model, tokenizer, max_batch_size=1).generate(["hello"], p)[0].token_ids for p in params]
    batched = Engine(model, tokenizer, max_batch_size=4).generate(["hello"] * 4, params)
    assert [r.token_ids for r in batched] == solo
    assert len({tuple(s) for s in solo}) > 1  # different seeds, different samples


def test_prefix_reuse_for_a_shared_system_prompt_gives_the_same_tokens(model, tokenizer):
    chats = [[{"role": "system", "content": "You are terse and kind."}, {"role": "user", "content": q}]
             for q in ("hello", "what about coffee?", "hello")]
    plain = Engine(model, tokenizer).generate(chats, GREEDY)
    cached_engine = Engine(model, tokenizer, prefix_cache=4)
    cached = [cached_engine.generate([chat], GREEDY)[0] for chat in chats]
    assert [r.token_ids for r in cached] == [r.token_ids for r in plain]
    assert cached_engine.prefixes.hits == 2
    # One batched prefill of prompts of different lengths, two starting after the cached prefix, one from 0.
    mixed = [*chats[:2], [{"role": "user", "content": "a prompt without the system message, longer"}]]
    together = cached_engine.generate(mixed, GREEDY)
    assert cached_engine.prefixes.hits == 4
    for chat, result in zip(mixed, together):
        ids, _ = cached_engine.encode_prompt(chat)
        assert result.token_ids == naive_greedy(model, ids, GREEDY.max_tokens)


def test_stop_strings_and_tokens_end_the_output(model, tokenizer):
    engine = Engine(model, tokenizer)
    [free] = engine.generate(["hello world"], GREEDY)
    assert len(free.text) > 6
    stop = free.text[3:6]
    [stopped] = engine.generate(["hello world"], SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                                                ignore_eos=True))
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.index(stop)]
    token = free.token_ids[4]
    [by_token] = engine.generate(["hello world"], SamplingParams(temperature=0, max_tokens=16,
                                                                 stop_token_ids=[token], ignore_eos=True))
    first = free.token_ids.index(token)
    assert by_token.finish_reason == "stop" and by_token.token_ids == free.token_ids[:first + 1]


def test_streamed_text_adds_up_and_never_splits_a_character(tokenizer):
    text = "naïve café 日本語のテキスト 🙂🎉 déjà vu"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len([p for p in pieces if p])  # some characters did span several tokens


def test_stop_matcher_holds_back_a_possible_stop_string():
    matcher = StopMatcher(["END!"])
    assert matcher.feed("abc E") == ("abc ", False)  # "E" could start "END!"
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("D! tail") == ("", True)
    assert StopMatcher(["END!"]).feed("ENx") == ("ENx", False)
    free = StopMatcher(["xyz"])
    assert free.feed("abxy") == ("ab", False) and free.flush() == "xy"


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.5, 5.0, 0.1]])
    greedy = [0, 2]
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=0.01), SamplingParams(min_p=1.0)):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        assert [c.token for c in sample(logits, [params] * 2, gens)] == greedy
    kept = filter_logits(logits[:1], [SamplingParams(top_k=2)])
    assert torch.isinf(kept[0, 2:]).all() and torch.isfinite(kept[0, :2]).all()
    nucleus = filter_logits(logits[:1], [SamplingParams(top_p=0.7)])  # p = .64, .24, ...: two tokens reach 0.7
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    ties = filter_logits(torch.tensor([[0.0, 2.0, 2.0, 2.0]]), [SamplingParams(top_k=1)])
    assert torch.isinf(ties[0, 0]) and torch.isfinite(ties[0, 1:]).all()  # every token tied with the last kept
    mixed = filter_logits(logits, [SamplingParams(top_k=2), SamplingParams(top_p=0.5)])  # each row its own filter
    assert torch.isfinite(mixed).sum(-1).tolist() == [2, 1]
    seen = torch.tensor([[True, False, False, False]])
    penalised = sample(logits[:1], [SamplingParams(temperature=0, repetition_penalty=100.0)], [None], seen)
    assert penalised[0].token == 1
    with_logprobs = sample(logits[:1], [SamplingParams(temperature=0, logprobs=True, top_logprobs=2)], [None])[0]
    assert with_logprobs.logprob == pytest.approx(float(logits[0].log_softmax(-1)[0]))
    assert [t for t, _ in with_logprobs.top] == [0, 1]


def test_abort_frees_the_slot_and_reports_abort(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2)
    outs = []
    ids = tokenizer.encode("hello")
    request_id = engine.submit(ids, GREEDY, outs.append)
    waiting_id = engine.submit(ids, GREEDY, outs.append)
    engine.submit(ids, GREEDY, outs.append)  # queued behind the two slots
    engine.step()
    engine.abort(request_id)
    engine.abort(waiting_id)
    engine.step()
    finals = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert finals == {request_id: "abort", waiting_id: "abort"}
    assert engine.num_running == 1 and not engine.has_request(request_id)
    while engine.step():
        pass
    assert engine.num_running == 0 and engine.counters["aborted"] == 2


def test_stream_closed_early_aborts(model, tokenizer):
    engine = Engine(model, tokenizer)
    stream = engine.stream("hello", GREEDY)
    next(stream)
    stream.close()
    assert engine.num_running == 0 and engine.counters["aborted"] == 1


def test_bad_requests_are_refused(model, tokenizer):
    engine = Engine(model, tokenizer)
    with pytest.raises(MurmurError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(MurmurError, match="context"):
        engine.generate([[1] * 96], GREEDY)
    with pytest.raises(MurmurError, match="max_tokens"):
        engine.generate(["hello"], SamplingParams(max_tokens=1000))
    with pytest.raises(MurmurError, match="empty"):
        engine.generate([""], GREEDY)


def test_context_limit_ends_with_length(model, tokenizer):
    engine = Engine(model, tokenizer, max_seq_len=20)
    [result] = engine.generate([[5] * 15], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    assert result.finish_reason == "length" and result.completion_tokens == 5


def test_compile_without_a_cpu_compiler_serves_eager_and_says_why(model, tokenizer, monkeypatch, caplog):
    from murmur import accel

    monkeypatch.setattr(accel, "cpu_compile_unavailable", lambda: "no C++ compiler (test)")
    engine = Engine(model, tokenizer, max_batch_size=2, compile=True)
    assert not engine.compiled and "no C++ compiler (test)" in caplog.text
    engine.warmup()  # nothing to compile
    ids, _ = engine.encode_prompt("hello world")
    assert engine.generate(["hello world"], GREEDY)[0].token_ids == naive_greedy(model, ids, 16)
