"""The one path from an OpenAI request to engine work and back, shared by chat and text completions:
encode -> check -> sampling parameters -> submit -> stream or collect.

A route describes what to generate as a `GenerationRequest` (prompts in any form `Engine.encode_prompt`
takes, `n`, one `SamplingParams`) and how to show it as a `ResponseFormat` (the choice and chunk shapes
of its API); `GenerationService.respond` does the rest. Every prompt is checked by the engine's own
`check_prompt` before anything is submitted, and a refusal names the request's field (`fields` maps the
engine's "prompt" / "max_tokens" to e.g. "messages" / "max_completion_tokens").

Where a feature plugs in without another copy of this flow:
- what shapes each token (a logits processor, a grammar constraint, a penalty) is per request and
  travels in `GenerationRequest.sampling`, which the engine's sampler reads for every choice;
- what the response carries besides text (annotations such as citations, echoed prompts, logprobs) is
  the `ResponseFormat`'s: it builds every choice and every streamed chunk choice, and sees each output.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

from murmur.errors import MurmurError
from murmur.infer.engine import Engine, Prompt, StepOutput
from murmur.infer.sampling import SamplingParams, TokenChoice
from murmur.serve.cancellation import EventStream
from murmur.serve.errors import APIError, api_error, failure_of
from murmur.serve.schemas import SamplingFields
from murmur.settings.serve import ServeSettings


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: bool, top_logprobs: int,
                    grammar: Any = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's sampling parameters for a request's body; max_tokens None: the server's default;
    grammar: the `Grammar` its output must match (response_format, forced tool calls), or None."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # the smallest possible nucleus: the most likely token
        temperature, top_p = 0.0, 1.0
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
                          repetition_penalty=body.repetition_penalty or 1.0, seed=body.seed, max_tokens=max_tokens,
                          stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
                          presence_penalty=body.presence_penalty or 0.0,
                          frequency_penalty=body.frequency_penalty or 0.0,
                          logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
                          grammar=grammar, prompt_logprobs=prompt_logprobs)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling of choice `index`: with a seed, choice i draws with seed + i (distinct, reproducible)."""
    return params if params.seed is None else replace(params, seed=params.seed + index)


@dataclass
class GenerationRequest:
    """What one API request asks the engine for: `n` choices for each prompt."""

    prompts: Sequence[Prompt]
    sampling: SamplingParams  # choice i of a prompt draws with seed + i
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    fields: dict[str, str] = field(default_factory=dict)  # engine param -> the request's field, for refusals
    tools: list[dict[str, Any]] | None = None  # function definitions the chat template shows the model


class ResponseFormat(Protocol):
    """How an API shows a generation: the objects' names and every choice, whole or streamed."""

    id_prefix: str  # "chatcmpl", "cmpl"
    object: str  # of a whole response
    chunk_object: str  # of a streamed chunk

    def choice(self, index: int, text: str, final: StepOutput, logprobs: list[TokenChoice],
               prompt_logprobs: list[TokenChoice] | None = None) -> dict[str, Any]:
        """Choice `index` of a whole response: its text, its last output, every token's logprobs (and the
        prompt's, when they were asked for)."""

    def opening(self, n: int) -> list[dict[str, Any]]:
        """The chunk choices a stream starts with, before any token."""

    def deltas(self, index: int, out: StepOutput) -> list[dict[str, Any]]:
        """The chunk choices for one engine output of choice `index`."""


class Planned(NamedTuple):
    """One engine request: a prompt's ids, its reusable prefix length, and one choice's sampling."""

    ids: list[int]
    prefix_len: int
    params: SamplingParams


class Generation:
    """The engine requests behind one HTTP request (one per choice), read as an async stream."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.request_ids: list[str] = []
        self.unfinished: set[int] = set()

    def _sink(self, index: int) -> Callable[[StepOutput], None]:
        def put(out: StepOutput) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass
        return put

    def submit(self, planned: Sequence[Planned]) -> Generation:
        """Submit every choice, or none: an engine refusal part-way aborts what was already queued, then
        propagates (EngineBusy, EngineClosed, RequestError)."""
        try:
            for index, (ids, prefix_len, params) in enumerate(planned):
                self.request_ids.append(self.engine.submit(ids, params, self._sink(index), prefix_len=prefix_len))
                self.unfinished.add(index)
        except MurmurError:
            self.abort()
            raise
        return self

    def abort(self) -> None:
        """Cancel the choices still running (their slots are freed before the next decode step)."""
        for index in list(self.unfinished):
            self.engine.abort(self.request_ids[index])
        self.unfinished.clear()

    async def events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        while self.unfinished:
            index, out = await self.queue.get()
            if out.finished:
                self.unfinished.discard(index)
            yield index, out

    async def collect(self) -> list[tuple[str, StepOutput, list[TokenChoice], list[TokenChoice] | None]]:
        """Each choice's whole text, last output, logprobs and prompt logprobs (None unless asked), in order."""
        n = len(self.request_ids)
        texts: list[list[str]] = [[] for _ in range(n)]
        logprobs: list[list[TokenChoice]] = [[] for _ in range(n)]
        prompt_logprobs: list[list[TokenChoice] | None] = [None] * n
        finals: list[StepOutput | None] = [None] * n
        async with aclosing(self.events()) as events:
            async for index, out in events:
                texts[index].append(out.text)
                logprobs[index].extend(out.logprobs)
                if out.prompt_logprobs is not None:
                    prompt_logprobs[index] = out.prompt_logprobs
                if out.finished:
                    finals[index] = out
        return [("".join(t), f, lp, plp) for t, f, lp, plp in zip(texts, finals, logprobs, prompt_logprobs)]


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class GenerationService:
    """Answers a `GenerationRequest` in a `ResponseFormat`, over one engine."""

    def __init__(self, engine: Engine, settings: ServeSettings, model_name: str):
        self.engine = engine
        self.settings = settings
        self.model_name = model_name

    async def respond(self, request: GenerationRequest, fmt: ResponseFormat) -> dict[str, Any] | EventStream:
        """The whole response, or the event stream of a streamed request. Every refusal is raised (as an
        APIError) before anything is submitted or sent; a client that leaves aborts the generation."""
        planned, prompt_tokens = self.plan(request)
        try:
            generation = Generation(self.engine).submit(planned)
        except MurmurError as err:
            raise api_error(err, request.fields) from None
        head = {"id": f"{fmt.id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.model_name,
                "system_fingerprint": None}
        if request.stream:
            return EventStream(self._events(generation, head, fmt, prompt_tokens, request.include_usage),
                               on_close=generation.abort)
        try:  # cancelled here when the client leaves (`with_cancellation`): the engine requests go with it
            result = await generation.collect()
        finally:
            generation.abort()
        choices, completion_tokens = [], 0
        for index, (text, final, logprobs, prompt_logprobs) in enumerate(result):
            error = failure_of(final, head["id"])
            if error:
                raise error
            completion_tokens += final.completion_tokens
            choices.append(fmt.choice(index, text, final, logprobs, prompt_logprobs))
        return {**head, "object": fmt.object, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    def plan(self, request: GenerationRequest) -> tuple[list[Planned], int]:
        """Encode and check every prompt, then the sampling of each choice; returns the engine requests and
        the prompt tokens counted once per prompt."""
        planned, prompt_tokens = [], 0
        for prompt in request.prompts:
            try:
                ids, prefix_len = self.engine.encode_prompt(prompt, request.tools)
                self.engine.check_prompt(ids, request.sampling)
            except MurmurError as err:
                raise api_error(err, request.fields) from None
            params = request.sampling
            if params.max_tokens is None:
                params = replace(params, max_tokens=self.default_max_tokens(len(ids)))
            planned += [Planned(ids, prefix_len, choice_params(params, i)) for i in range(request.n)]
            prompt_tokens += len(ids)
        return planned, prompt_tokens

    def default_max_tokens(self, prompt_len: int) -> int:
        """Reply length for a request that gives none: the configured default, capped by the room left and by
        the most any request may ask for."""
        room = min(self.engine.max_seq_len - prompt_len, self.settings.max_reply_tokens)
        return min(self.settings.default_max_tokens, room) if self.settings.default_max_tokens else room

    async def _events(self, generation: Generation, head: dict, fmt: ResponseFormat, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
        """The SSE body: the format's opening chunks, its chunks for each engine output, the usage chunk when
        asked, and `[DONE]`. A failure becomes an error event, then `[DONE]`."""
        extra = {"usage": None} if include_usage else {}

        def chunk(choice: dict[str, Any]) -> bytes:
            return sse({**head, "object": fmt.chunk_object, "choices": [choice], **extra})

        for choice in fmt.opening(len(generation.request_ids)):
            yield chunk(choice)
        completion_tokens = 0
        async with aclosing(generation.events()) as events:
            async for index, out in events:
                error = failure_of(out, head["id"]) if out.finished else None
                if error:
                    generation.abort()
                    yield sse(error.body())
                    yield sse("[DONE]")
                    return
                for choice in fmt.deltas(index, out):
                    yield chunk(choice)
                if out.finished:
                    completion_tokens += out.completion_tokens
        if include_usage:
            yield sse({**head, "object": fmt.chunk_object, "choices": [], "usage": usage(prompt_tokens,
                                                                                          completion_tokens)})
        yield sse("[DONE]")
