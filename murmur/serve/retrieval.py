"""The grounding step of chat completions: retrieve posts for the latest user turn, show them to the model,
and cite them in the answer as OpenAI's `url_citation` annotations (docs/assistant.md).

`ground_chat` is called by the chat route between building its `GenerationRequest` and responding: it swaps
in the grounded messages and wraps the route's `ResponseFormat` in a `CitingFormat`, which adds
`message.annotations` to each choice, and to the final chunk of each streamed choice
(`delta.annotations`, beside the `finish_reason`). Citations are computed against the posts that are still
in the index when the answer ends: a post deleted while the model was writing is never cited.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from murmur.assistant.citations import cite
from murmur.assistant.grounding import ground
from murmur.errors import MurmurError
from murmur.index.base import IndexedPost
from murmur.serve.errors import APIError, unavailable
from murmur.serve.generation import GenerationRequest, ResponseFormat

log = logging.getLogger("murmur.serve")


class CitingFormat:
    """A chat `ResponseFormat` plus citations of the posts the model was shown (the rule of
    `murmur.assistant.citations`). Everything else is the wrapped format's."""

    def __init__(self, inner: ResponseFormat, posts: list[IndexedPost], assistant):
        self.inner = inner
        self.id_prefix, self.object, self.chunk_object = inner.id_prefix, inner.object, inner.chunk_object
        self.posts = posts
        self.assistant = assistant
        self.streamed: dict[int, list[str]] = {}  # content sent so far, per streamed choice

    def annotations(self, text: str) -> list[dict[str, Any]]:
        if not self.posts or not text:
            return []
        present = self.assistant.index.get(p.id for p in self.posts)  # deleted meanwhile: not cited
        settings = self.assistant.settings
        return cite(text, [p for p in self.posts if p.id in present], settings.citation_url,
                    min_overlap_words=settings.min_overlap_words, title_words=settings.title_words)

    def choice(self, index, text, final, logprobs, prompt_logprobs=None) -> dict[str, Any]:
        choice = self.inner.choice(index, text, final, logprobs, prompt_logprobs)
        choice["message"]["annotations"] = self.annotations(choice["message"].get("content") or "")
        return choice

    def opening(self, n: int) -> list[dict[str, Any]]:
        return self.inner.opening(n)

    def deltas(self, index, out) -> list[dict[str, Any]]:
        chunks = self.inner.deltas(index, out)
        sent = self.streamed.setdefault(index, [])
        for chunk in chunks:
            sent.append(chunk["delta"].get("content") or "")
            if chunk.get("finish_reason") is not None:
                chunk["delta"] = {**chunk["delta"], "annotations": self.annotations("".join(sent))}
        return chunks


def retrieval_wanted(state, asked: bool | None) -> bool:
    """Whether to ground this request: as asked, else the server's default (on when it has an index)."""
    if asked and state.assistant is None:
        raise APIError(400, "retrieval is true but this server has no post index; start it with "
                            "`murmur serve RUN --index ...`, or leave retrieval out", param="retrieval",
                       code="invalid_value")
    if asked is None:
        return state.assistant is not None and state.assistant.settings.retrieval
    return asked


def prompt_fits(engine, reply_tokens: int, tools: list[dict] | None = None):
    """Whether chat messages (shown `tools`) leave `reply_tokens` of the context for the reply."""
    def fits(messages: list[dict]) -> bool:
        ids, _ = engine.encode_prompt(messages, tools)
        return len(ids) + reply_tokens < engine.max_seq_len
    return fits


async def ground_chat(state, asked: bool | None, engine, request: GenerationRequest,
                      fmt: ResponseFormat) -> tuple[GenerationRequest, ResponseFormat]:
    """The request with its conversation grounded in the post index, and a format that cites; unchanged when
    retrieval is off. A 503 when the index cannot be read."""
    if not retrieval_wanted(state, asked):
        return request, fmt
    assistant = state.assistant
    settings = state.settings
    reply_tokens = request.sampling.max_tokens or settings.default_max_tokens or max(1, engine.max_seq_len // 4)
    try:
        grounded = await asyncio.to_thread(ground, request.prompts[0], assistant.index, assistant.index_settings,
                                           assistant.settings, fits=prompt_fits(engine, reply_tokens, request.tools))
    except MurmurError as err:  # the reason (a path, a server's address) goes to the log, not to the client
        log.error("chat: the post index cannot be read: %s", err)
        raise unavailable("the post index cannot be read now; retry later, or send \"retrieval\": false",
                          "index_unavailable") from None
    return replace(request, prompts=[grounded.messages]), CitingFormat(fmt, grounded.posts, assistant)
