"""The assistant's routes: `POST /v1/posts` (add posts and deletions to the live index) and `POST /v1/mentions`
(answer an @mention with a reply post and its citations). docs/assistant.md.

Both bodies come from a platform, so both are read as hostile: the body's size is bounded by the server
(`serve.max_body_bytes`), its nesting before it is parsed (`index.max_json_depth`), and a post is checked as a
followed stream's line is (`murmur.index.events`). Every refusal comes in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request

from murmur.assistant.mentions import Answered, MentionDesk, MentionError, Skip, parse_mention
from murmur.data.sources import nests_deeper_than
from murmur.errors import MurmurError
from murmur.index.base import Changes
from murmur.index.events import EventReader
from murmur.infer.sampling import SamplingParams
from murmur.serve.cancellation import with_cancellation
from murmur.serve.errors import APIError, unavailable
from murmur.serve.formats import ChatFormat
from murmur.serve.generation import GenerationRequest, GenerationService
from murmur.serve.retrieval import prompt_fits
from murmur.serve.state import authorize, server_state

log = logging.getLogger("murmur.serve")
router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

# Why a record could not be indexed, in words (the reasons of murmur.index.events).
REASONS = {
    "no_id": "the post has no id", "no_text": "the post has no text", "no_author": "the post has no author_id "
    "(an account deletion could never reach it)", "bad_id": "an id is over 256 characters or unprintable",
    "bad_unicode": "the text holds a lone surrogate code point", "malformed_json": "the body is not valid JSON",
    "not_a_json_object": "the body (or an item of data) is not a JSON object", "not_utf8": "the body is not UTF-8",
    "too_deep": "the JSON nests too deeply", "too_large": "the record is over index.max_record_bytes",
    "no_post_id": "a post deletion event names no post id", "no_account_id": "an account event names no id",
    "bad_deletion_event": "a deletion event is malformed", "no_data": "a stream message without data",
}


def assistant_of(request: Request):
    state = server_state(request)
    if state.assistant is None:
        raise APIError(404, "this server has no post index; start it with `murmur serve RUN --index ...` (or "
                            "serve a run that has one)", code="no_index")
    return state.assistant


async def json_document(request: Request) -> Any:
    """The body as JSON, refused (400) when it nests too deeply to parse safely or is not JSON."""
    body = await request.body()
    depth = assistant_of(request).index_settings.max_json_depth
    if nests_deeper_than(body, depth):
        raise APIError(400, f"the body nests more than {depth} levels of objects and arrays "
                            "(index.max_json_depth)", param="body", code="invalid_value")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.",
                       param="body", code="invalid_value") from None


@router.post("/posts")
async def add_posts(request: Request):
    """Add a post (an X API v2 post, stream message or bare post object) or apply a deletion or restore event
    to the live index: searchable, or gone from every result, as soon as this answers."""
    state = server_state(request)
    assistant = assistant_of(request)
    if not state.access.keys:
        raise APIError(403, "adding posts needs an API key: start the server with --api-key (or serve.api_keys)",
                       type="permission_error", code="api_key_required")
    body = await request.body()
    reader = EventReader(assistant.index_settings, assistant.data_settings)
    changes = Changes()
    reader.read(body.replace(b"\n", b" ").replace(b"\r", b" "), "http:/v1/posts", None, changes)
    refused = [value for event, value in changes.events if event == "quarantine"]
    if refused:
        reason = refused[0][2]
        raise APIError(400, f"the record cannot be indexed: {REASONS.get(reason, reason)} ({reason}). A post is "
                            "an object with id, text and author_id (or an X API v2 stream message); docs/index.md "
                            "lists the events", param="body", code=reason)
    try:
        counts = await asyncio.to_thread(assistant.index.apply, changes)
    except MurmurError as err:
        log.error("POST /v1/posts: the index refused the change: %s", err)
        raise unavailable("the post index cannot be written now; retry later", "index_unavailable") from None
    shown = {key: counts.get(key, 0) for key in ("added", "replaced", "deleted", "restored", "refused_deleted")}
    return {"object": "murmur.posts", **shown, "dropped": dict(reader.dropped), "ignored": reader.ignored}


@router.post("/mentions")
@with_cancellation
async def answer_mention(request: Request, document: Any = Depends(json_document)):
    """Answer an X API v2 post that mentions the assistant: a reply post (X's create-post body) with
    `annotations` citing the posts it was grounded in, or `reply: null` and the reason it gets none. Idempotent
    on the mention's id: a mention delivered again (a platform's retry) gets the first reply back, marked
    `"replayed": true`, and nothing is generated or counted against its author."""
    state = server_state(request)
    assistant = assistant_of(request)
    engine = state.require_engine(detailed=bool(state.access.keys))
    try:
        mention_id = parse_mention(document, assistant.settings.handle).id
    except MentionError as err:
        raise APIError(err.status, str(err), param=err.param, code=err.code) from None
    async with assistant.answering.hold(mention_id):  # the same mention twice at once: the second waits
        return await _answer(state, assistant, engine, document)


async def _answer(state, assistant, engine, document) -> dict:
    settings = assistant.settings
    desk = MentionDesk(assistant)
    fits = prompt_fits(engine, settings.reply_max_tokens)
    try:
        plan = await asyncio.to_thread(desk.plan, document, fits=fits)
    except MentionError as err:
        raise APIError(err.status, str(err), param=err.param, code=err.code) from None
    except MurmurError as err:
        log.error("POST /v1/mentions: the index cannot be read: %s", err)
        raise unavailable("the post index cannot be read now; retry later", "index_unavailable") from None
    head = {"id": f"mention-{uuid.uuid4().hex}", "object": "murmur.mention_reply", "created": int(time.time()),
            "model": state.model_name}
    if isinstance(plan, Answered):
        return await _replayed(desk, plan, head)
    if isinstance(plan, Skip):
        if plan.reason == "rate_limited":
            raise APIError(429, f"author has had {settings.replies_per_author} replies in the last "
                                f"{settings.rate_window_s:g} s (serve.assistant.replies_per_author); no reply now",
                           type="rate_limit_exceeded", param="author_id", code="rate_limit_exceeded")
        return {**head, "mention_id": plan.mention_id, "reply": None, "skipped": plan.reason, "usage": None,
                "replayed": False}
    generation = GenerationRequest(
        prompts=[plan.messages], sampling=SamplingParams(temperature=settings.temperature, top_p=settings.top_p,
                                                         max_tokens=settings.reply_max_tokens),
        fields={"prompt": "text", "max_tokens": "text"})
    answer = await GenerationService(engine, state.settings, state.model_name).respond(
        generation, ChatFormat(engine.tokenizer, logprobs=False))
    reply = desk.compose(plan, answer["choices"][0]["message"]["content"] or "")
    body = {**head, "mention_id": plan.mention.id, "reply": reply, "skipped": None if reply else "empty_reply",
            "retrieved": [post.id for post in plan.posts], "usage": answer["usage"], "replayed": False}
    if reply is not None:
        try:
            first = await asyncio.to_thread(desk.remember, plan, reply, response={**head, "usage": body["usage"]})
        except MurmurError as err:  # the reply is sent all the same; a retry of it could be answered again
            log.error("POST /v1/mentions: the answer to mention %s could not be recorded: %s", plan.mention.id, err)
            first = True
        if not first:  # answered meanwhile by another server or follower on the same index: that answer stands
            record = await asyncio.to_thread(assistant.index.answer_of, plan.mention.id)
            if record is not None:
                return await _replayed(desk, Answered(plan.mention, record), head)
    return body


async def _replayed(desk: MentionDesk, answered: Answered, head: dict) -> dict:
    """The response to a mention answered before: the first reply, with the first response's id when this
    server sent it (citations computed again, of the posts still indexed)."""
    record = answered.record
    reply = await asyncio.to_thread(desk.replay, answered)
    first = record.get("response") if isinstance(record.get("response"), dict) else {}
    return {**head, **{k: first[k] for k in ("id", "created", "model") if k in first},
            "mention_id": answered.mention.id, "reply": reply, "skipped": None,
            "retrieved": list(record.get("retrieved", [])), "usage": first.get("usage"), "replayed": True}
