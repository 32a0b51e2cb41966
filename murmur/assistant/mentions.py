"""Answering @mentions: an X API v2 post object in, a reply post with citations out (or a reason not to).

    desk = MentionDesk(assistant)
    plan = desk.plan(post_object)      # MentionError (bad input), a Skip (no answer), Answered, or a Plan
    text = <generate from plan.messages, at most settings.reply_max_tokens>
    reply = desk.compose(plan, text)   # {"text", "reply": {"in_reply_to_tweet_id"}, "annotations"}
    desk.remember(plan, reply)         # in the index: the same mention delivered again gets `Answered`

The same desk serves `POST /v1/mentions` and `murmur assistant --follow`. It never answers:
- its own posts (`user_id`), so two assistants, or one and its own replies, cannot loop;
- a mention, or a thread, that was deleted (the mention, its author, the post it replies to, the
  conversation's root: any tombstoned; looked up by id, never by reading every deletion);
- a mention it has answered before (the index's record of answered mentions, kept on disk or in the
  PostgreSQL server: a platform's retry, or a replayed stream, gets the first reply back, never a second);
- an author over `replies_per_author` in `rate_window_s`.
Bad input (not an object, no id, no author, no text besides mentions, a reply into a conversation the index
does not know) is a MentionError with the field at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from murmur.assistant.citations import cite
from murmur.assistant.grounding import ground
from murmur.assistant.service import Assistant
from murmur.assistant.thread import reply_chain, thread_messages
from murmur.errors import MurmurError
from murmur.index.base import IndexedPost
from murmur.index.events import MAX_ID_CHARS

MAX_MENTION_CHARS = 25_000  # X's longest post
LEADING_MENTIONS_RE = re.compile(r"^(?:\s*@\w{1,30})+\s*")
SYSTEM = ("You are @{handle}, an assistant on a social network. Someone mentioned you in a thread: reply to "
          "their latest post in at most {chars} characters.")


class MentionError(MurmurError):
    """A post that cannot be answered as sent: `status` (4xx), the field at fault, a code."""

    def __init__(self, message: str, param: str, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class Mention:
    id: str
    author_id: str
    text: str  # what was said, without the leading @mentions
    conversation_id: str | None
    reply_to: str | None


@dataclass(frozen=True)
class Skip:
    """No answer, and why: own_post, deleted, rate_limited, not_mentioned."""

    mention_id: str
    reason: str


@dataclass(frozen=True)
class Answered:
    """A mention answered before: the record `MentionDesk.remember` kept then (text, retrieved, ...)."""

    mention: Mention
    record: dict


@dataclass
class Plan:
    """What to generate for a mention: the grounded messages, and the posts they show."""

    mention: Mention
    messages: list[dict]
    posts: list[IndexedPost] = field(default_factory=list)


def _id(value, param: str, required: bool = True) -> str | None:
    if value is None or value == "":
        if required:
            raise MentionError(f"the post has no {param}; send the X API v2 post object with its {param}",
                               param=param)
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise MentionError(f"{param} must be a string (or an integer), not {type(value).__name__}", param=param)
    text = str(value).strip()
    if not text or len(text) > MAX_ID_CHARS or not text.isprintable():
        raise MentionError(f"{param} is not an id: at most {MAX_ID_CHARS} printable characters", param=param)
    return text


def mentions_handle(post: dict, handle: str) -> bool:
    """Whether the post mentions @handle: in `entities.mentions`, or in its text."""
    entities = post.get("entities")
    listed = entities.get("mentions") if isinstance(entities, dict) else None
    for item in listed if isinstance(listed, list) else []:
        if isinstance(item, dict) and str(item.get("username", "")).lower() == handle.lower():
            return True
    text = post.get("text")
    return isinstance(text, str) and re.search(rf"(?<![\w@])@{re.escape(handle)}(?!\w)", text, re.I) is not None


def parse_mention(document, handle: str | None) -> Mention:
    """The mention in an X API v2 post object (bare, or as a stream message's `data`). MentionError when it
    is not one."""
    post = document.get("data") if isinstance(document, dict) and isinstance(document.get("data"), dict) \
        else document
    if not isinstance(post, dict):
        raise MentionError("a mention is an X API v2 post object (a JSON object with id, text, author_id)",
                           param="body")
    ident = _id(post.get("id"), "id")
    author = _id(post.get("author_id"), "author_id")
    text = post.get("text")
    if not isinstance(text, str):
        raise MentionError("the post has no text", param="text")
    if len(text) > MAX_MENTION_CHARS:
        raise MentionError(f"the text has {len(text):,} characters; a post has at most {MAX_MENTION_CHARS:,}",
                           param="text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MentionError("the text holds a lone surrogate code point, which is not text", param="text") from None
    said = LEADING_MENTIONS_RE.sub("", text).strip()
    if not said:
        raise MentionError("the mention has no text besides @mentions: nothing to answer", param="text",
                           code="empty_mention")
    if handle and not mentions_handle(post, handle):
        raise MentionError(f"the post does not mention @{handle}", param="text", code="not_a_mention")
    reply_to = None
    references = post.get("referenced_tweets")
    if references is not None and not isinstance(references, list):
        raise MentionError("referenced_tweets must be a list of {type, id}", param="referenced_tweets")
    for ref in (references or [])[:16]:
        if isinstance(ref, dict) and ref.get("type") == "replied_to":
            reply_to = _id(ref.get("id"), "referenced_tweets.id")
    conversation = _id(post.get("conversation_id"), "conversation_id", required=False)
    return Mention(ident, author, said, conversation, reply_to)


class MentionDesk:
    """Decides whether and how to answer mentions, over one `Assistant` (index, settings, rate limiter)."""

    def __init__(self, assistant: Assistant):
        self.assistant = assistant
        self.settings = assistant.settings

    def plan(self, document, *, now: float | None = None, fits=None) -> Plan | Skip | Answered:
        """What to generate for a mention, or why not to answer it, or its earlier answer. MentionError for
        bad input; the rate limit is counted only for mentions that would be answered. `fits(messages)`:
        whether a prompt leaves room for the reply (retrieved posts are dropped until it does)."""
        mention = parse_mention(document, self.settings.handle)
        if self.settings.user_id and mention.author_id == self.settings.user_id:
            return Skip(mention.id, "own_post")
        index = self.assistant.index
        root = mention.conversation_id if mention.conversation_id != mention.id else None
        if self._deleted(mention, root):
            return Skip(mention.id, "deleted")
        record = index.answer_of(mention.id)
        if record is not None:
            return Answered(mention, record)
        chain = reply_chain(index, mention.reply_to, self.settings.thread_posts)
        if mention.reply_to and not chain:
            raise MentionError(f"the mention replies to post {mention.reply_to}, which the index does not hold "
                               f"(conversation {mention.conversation_id or 'unknown'}); index the thread first "
                               "(POST /v1/posts, or murmur index --follow)", param="referenced_tweets",
                               code="unknown_conversation", status=404)
        if root and not mention.reply_to and not index.conversation(root, limit=1):
            raise MentionError(f"conversation {root} is not in the index; index the thread first (POST /v1/posts, "
                               "or murmur index --follow)", param="conversation_id", code="unknown_conversation",
                               status=404)
        if not self.assistant.allow_author(mention.author_id):
            return Skip(mention.id, "rate_limited")
        handle = self.settings.handle or "assistant"

        def conversation(chain):
            return [{"role": "system", "content": SYSTEM.format(handle=handle, chars=self.settings.reply_chars)},
                    *thread_messages(chain, self.settings.user_id),
                    {"role": "user", "content": f"@{mention.author_id}: {mention.text}"}]

        messages = conversation(chain)
        while chain and fits is not None and not fits(messages):  # a long thread: its oldest posts go first
            chain = chain[1:]
            messages = conversation(chain)
        grounded = ground(messages, index, self.assistant.index_settings, self.settings, query=mention.text,
                          now=now, exclude={mention.id, *(post.id for post in chain)},
                          fits=fits)
        return Plan(mention, grounded.messages, grounded.posts)

    def _deleted(self, mention: Mention, root: str | None) -> bool:
        index = self.assistant.index
        posts = {mention.id, *(p for p in (mention.reply_to, root) if p)}
        # Point lookups of these few ids: the tombstone tables grow with every deletion ever made.
        return bool(index.tombstoned("post", posts)) or bool(index.tombstoned("account", [mention.author_id]))

    def compose(self, plan: Plan, text: str) -> dict | None:
        """The reply post (X's create-post body plus OpenAI-shaped `annotations`), or None for an empty reply.
        Cut to `reply_chars` at a word boundary; citations are of posts still in the index."""
        text = cut(text.strip(), self.settings.reply_chars)
        return self._reply(plan.mention.id, text, [p.id for p in plan.posts]) if text else None

    def remember(self, plan: Plan, reply: dict, **extra) -> bool:
        """Record in the index that the mention was answered with `reply` (its text and the posts shown, plus
        `extra`); False when it had been answered already (by another server or follower meanwhile)."""
        record = {"text": reply["text"], "retrieved": [p.id for p in plan.posts], **extra}
        return self.assistant.index.record_answer(plan.mention.id, plan.mention.author_id, record)

    def replay(self, answered: Answered) -> dict:
        """The reply post of a mention answered before, as it was sent; its citations are computed again, of
        the shown posts still in the index (a post deleted since is not cited, and its title not kept)."""
        record = answered.record
        return self._reply(answered.mention.id, str(record.get("text", "")), list(record.get("retrieved", [])))

    def _reply(self, mention_id: str, text: str, shown: list[str]) -> dict:
        present = self.assistant.index.get(shown) if shown else {}
        annotations = cite(text, [present[i] for i in shown if i in present], self.settings.citation_url,
                           min_overlap_words=self.settings.min_overlap_words, title_words=self.settings.title_words)
        return {"text": text, "reply": {"in_reply_to_tweet_id": mention_id}, "annotations": annotations}


def cut(text: str, limit: int) -> str:
    """`text` in at most `limit` characters: whole words and an ellipsis when it is longer."""
    if len(text) <= limit:
        return text
    head = text[:limit - 1]
    space = head.rfind(" ")
    if space > limit // 2:
        head = head[:space]
    return head.rstrip() + "…"
