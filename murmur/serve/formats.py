"""How chat completions and text completions show a generation, in OpenAI's shapes: the `ResponseFormat`s
the generation service fills (choices, streamed chunk choices, logprobs).
"""

from __future__ import annotations

from typing import Any

from murmur.infer.engine import StepOutput
from murmur.infer.sampling import TokenChoice


class ChatFormat:
    """`chat.completion`: a message per choice; a stream opens each choice with the assistant's role."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, logprobs: bool):
        self.tokenizer = tokenizer
        self.logprobs = logprobs

    def choice(self, index: int, text: str, final: StepOutput, logprobs: list[TokenChoice]) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self._logprobs(logprobs) if self.logprobs else None,
                "finish_reason": final.finish_reason}

    def opening(self, n: int) -> list[dict[str, Any]]:
        return [self._delta(index, {"role": "assistant", "content": ""}) for index in range(n)]

    def deltas(self, index: int, out: StepOutput) -> list[dict[str, Any]]:
        lp = self._logprobs(out.logprobs) if self.logprobs and out.logprobs else None
        chunks = [self._delta(index, {"content": out.text}, lp=lp)] if out.text or lp else []
        if out.finished:
            chunks.append(self._delta(index, {}, out.finish_reason))
        return chunks

    @staticmethod
    def _delta(index: int, delta: dict, finish: str | None = None, lp=None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def _logprobs(self, choices: list[TokenChoice]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = self.tokenizer.decode([token_id])
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in (c.top or [])]}
                            for c in choices], "refusal": None}


class CompletionFormat:
    """`text_completion`: text per choice; logprobs' text offsets count from the start of each choice."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, logprobs: bool):
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # characters streamed so far per choice

    def choice(self, index: int, text: str, final: StepOutput, logprobs: list[TokenChoice]) -> dict[str, Any]:
        return {"index": index, "text": text, "finish_reason": final.finish_reason,
                "logprobs": self._logprobs(logprobs, 0) if self.logprobs else None}

    def opening(self, n: int) -> list[dict[str, Any]]:
        return []

    def deltas(self, index: int, out: StepOutput) -> list[dict[str, Any]]:
        offset = self.offsets.get(index, 0)
        lp = self._logprobs(out.logprobs, offset) if self.logprobs and out.logprobs else None
        self.offsets[index] = offset + len(out.text)
        if not (out.text or lp or out.finished):
            return []
        return [{"index": index, "text": out.text, "logprobs": lp,
                 "finish_reason": out.finish_reason if out.finished else None}]

    def _logprobs(self, choices: list[TokenChoice], offset: int) -> dict[str, Any]:
        tokens = [self.tokenizer.decode([c.token]) for c in choices]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [c.logprob for c in choices],
                "top_logprobs": [{self.tokenizer.decode([t]): lp for t, lp in (c.top or [])} for c in choices],
                "text_offset": offsets}
