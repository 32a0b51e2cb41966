"""A scripted engine for the assistant's tests: the real tiny model's tokenizer, prompt encoding and checks,
but replies written by the test, so citations and replies can be checked exactly."""

from __future__ import annotations

import pytest
from serve_fixtures import make_model

from murmur.infer.engine import Engine, StepOutput


@pytest.fixture(scope="module")
def model(tokenizer):
    """The tiny model behind the scripted engine, with room for a prompt of retrieved posts."""
    return make_model(tokenizer.vocab_size, max_seq_len=1024)


class ScriptedEngine(Engine):
    """Answers every request with `self.reply` (streamed in a few pieces); keeps each prompt's text."""

    reply = "hello"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts: list[str] = []

    def submit(self, prompt_ids, params, sink, request_id=None, prefix_len=0) -> str:
        self.check_prompt(prompt_ids, params)
        self.prompts.append(self.tokenizer.decode(prompt_ids))
        request_id = request_id or f"scripted-{len(self.prompts)}"
        text = self.reply
        pieces = [text[i:i + 7] for i in range(0, len(text), 7)] or [""]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            sink(StepOutput(request_id, text=piece, finished=last, finish_reason="stop" if last else None,
                            prompt_tokens=len(prompt_ids), completion_tokens=len(pieces) if last else 0))
        return request_id
