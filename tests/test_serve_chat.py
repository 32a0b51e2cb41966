"""`murmur chat`: streaming multi-turn conversation in the terminal, over an exported Hugging Face directory."""

from __future__ import annotations

import io

import pytest
from serve_fixtures import make_model, make_tokenizer

from murmur.commands.chat import chat_loop
from murmur.hf import save_hf_model
from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = make_tokenizer(root / "tok")
    return save_hf_model(make_model(tokenizer.vocab_size, max_seq_len=128), root / "model", tokenizer_dir=root / "tok")


def test_chat_loop_streams_replies_and_obeys_commands(model_dir):
    engine = Engine.from_source(model_dir, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=8)
    lines = iter(["/system You are terse.", "hello", "/bogus", "/reset", "hello", "/quit", "never read"])
    written = io.StringIO()
    replies = chat_loop(engine, params, lambda prompt: next(lines), written.write)
    out = written.getvalue()
    assert replies == 2
    assert "(system prompt set; new conversation)" in out and "unknown command /bogus" in out
    assert "(new conversation)" in out
    expected = engine.generate([[{"role": "system", "content": "You are terse."},
                                 {"role": "user", "content": "hello"}]], params)[0].text
    assert expected and out.count(expected) >= 1
    assert next(lines) == "never read"
    assert engine.num_running == 0


def test_chat_loop_second_turn_sees_the_first(model_dir):
    engine = Engine.from_source(model_dir, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    lines = iter(["hello", "and then?"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written = io.StringIO()
    assert chat_loop(engine, params, read, written.write) == 2
    first = engine.generate([[{"role": "user", "content": "hello"}]], params)[0].text
    second = engine.generate([[{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                               {"role": "user", "content": "and then?"}]], params)[0].text
    assert written.getvalue() == f"{first}\n{second}\n\n"


def test_context_overflow_asks_for_reset(model_dir):
    engine = Engine.from_source(model_dir, device="cpu")
    lines = iter(["word " * 200, "/quit"])
    written = io.StringIO()
    assert chat_loop(engine, SamplingParams(max_tokens=4), lambda p: next(lines), written.write) == 0
    assert "/reset" in written.getvalue()
