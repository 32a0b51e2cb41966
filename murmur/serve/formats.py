"""How chat completions and text completions show a generation, in OpenAI's shapes: the `ResponseFormat`s
the generation service fills (choices, streamed chunk choices, logprobs, tool calls, echoed prompts).
"""

from __future__ import annotations

from typing import Any

from murmur.infer.engine import StepOutput
from murmur.infer.sampling import TokenChoice
from murmur.serve.tools import ToolCallReader


class ChatFormat:
    """`chat.completion`: a message per choice; a stream opens each choice with the assistant's role.

    With `read_calls`, tool calls in the reply become the message's `tool_calls` (finish_reason
    "tool_calls"); streamed, each call goes out whole in one chunk once its text is complete."""

    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, tokenizer, logprobs: bool, read_calls: bool = False):
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.read_calls = read_calls
        self.readers: dict[int, ToolCallReader] = {}  # per streamed choice

    def choice(self, index: int, text: str, final: StepOutput, logprobs: list[TokenChoice],
               prompt_logprobs: list[TokenChoice] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        finish = final.finish_reason
        if self.read_calls:
            reader = ToolCallReader()
            content, calls = reader.feed(text)
            content += reader.flush()
            if calls:
                message["content"] = content or None
                message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in calls]
                finish = "tool_calls" if finish == "stop" else finish
        return {"index": index, "message": message,
                "logprobs": self._logprobs(logprobs) if self.logprobs else None, "finish_reason": finish}

    def opening(self, n: int) -> list[dict[str, Any]]:
        return [self._delta(index, {"role": "assistant", "content": ""}) for index in range(n)]

    def deltas(self, index: int, out: StepOutput) -> list[dict[str, Any]]:
        lp = self._logprobs(out.logprobs) if self.logprobs and out.logprobs else None
        if not self.read_calls:
            chunks = [self._delta(index, {"content": out.text}, lp=lp)] if out.text or lp else []
            if out.finished:
                chunks.append(self._delta(index, {}, out.finish_reason))
            return chunks
        reader = self.readers.setdefault(index, ToolCallReader())
        content, calls = reader.feed(out.text)
        if out.finished:
            content += reader.flush()
        chunks = [self._delta(index, {"content": content}, lp=lp)] if content or lp else []
        chunks += [self._delta(index, {"tool_calls": [call]}) for call in calls]
        if out.finished:
            finish = "tool_calls" if reader.calls and out.finish_reason == "stop" else out.finish_reason
            chunks.append(self._delta(index, {}, finish))
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
    """`text_completion`: text per choice; logprobs' text offsets count from the start of each choice.

    With `echo` (the prompt text of each choice), a choice's text and logprobs start with its prompt's:
    the first prompt token has no log-probability (null), as in OpenAI's API."""

    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, logprobs: bool, echo: list[str] | None = None):
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.echo = echo
        self.offsets: dict[int, int] = {}  # characters streamed so far per choice

    def choice(self, index: int, text: str, final: StepOutput, logprobs: list[TokenChoice],
               prompt_logprobs: list[TokenChoice] | None = None) -> dict[str, Any]:
        if self.echo is not None:
            text = self.echo[index] + text
            logprobs = [*(prompt_logprobs or []), *logprobs]
        return {"index": index, "text": text, "finish_reason": final.finish_reason,
                "logprobs": self._logprobs(logprobs, 0) if self.logprobs else None}

    def opening(self, n: int) -> list[dict[str, Any]]:
        return []

    def deltas(self, index: int, out: StepOutput) -> list[dict[str, Any]]:
        text, logprobs = out.text, out.logprobs
        if self.echo is not None and index not in self.offsets:  # the choice's first output
            text = self.echo[index] + text
            logprobs = [*(out.prompt_logprobs or []), *logprobs]
        offset = self.offsets.get(index, 0)
        lp = self._logprobs(logprobs, offset) if self.logprobs and logprobs else None
        self.offsets[index] = offset + len(text)
        if not (text or lp or out.finished):
            return []
        return [{"index": index, "text": text, "logprobs": lp,
                 "finish_reason": out.finish_reason if out.finished else None}]

    def _logprobs(self, choices: list[TokenChoice], offset: int) -> dict[str, Any]:
        tokens = [self.tokenizer.decode([c.token]) for c in choices]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [c.logprob for c in choices],
                "top_logprobs": [None if c.top is None and c.logprob is None else
                                 {self.tokenizer.decode([t]): lp for t, lp in (c.top or [])} for c in choices],
                "text_offset": offsets}
