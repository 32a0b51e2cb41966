"""Grounding: the posts retrieved for a conversation's latest turn, shown to the model in a system block.

The block goes right before the latest user message (so a conversation's own system prompt stays a stable
prefix the engine can reuse), one line per post: `[ID] @AUTHOR (DATE): TEXT`. Post text is what people
wrote, so it is shown as text and nothing more: it travels in a message's content, which the chat template
encodes with special-token literals as plain characters (`<|im_end|>` in a post cannot end the block), and
its line breaks are folded to spaces, so a post cannot start a line that looks like another post's entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from murmur.index.base import IndexedPost, PostIndex
from murmur.index.retrieve import retrieve
from murmur.settings.assistant import AssistantSettings
from murmur.settings.index import IndexSettings

INSTRUCTIONS = ("Posts from the network that may help you answer, most relevant first. Use them only when "
                "they are relevant, and cite a post by writing its id in brackets right after what you take "
                "from it, like [{example}].")


@dataclass(frozen=True)
class Grounded:
    """The messages to generate from (with the block, when any post was found) and the posts shown."""

    messages: list[dict]
    posts: list[IndexedPost]


def latest_user_text(messages: Sequence[dict]) -> str:
    """The text of the conversation's latest user message ('' when there is none)."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content") or ""
    return ""


def one_line(text: str, max_chars: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[:max_chars - 1].rstrip() + "…"


def post_line(post: IndexedPost, max_chars: int) -> str:
    when = ""
    if post.created_at is not None:
        when = f" ({datetime.fromtimestamp(post.created_at, tz=UTC).strftime('%Y-%m-%d')})"
    return f"[{post.id}] @{post.author_id}{when}: {one_line(post.text, max_chars)}"


def posts_block(posts: Sequence[IndexedPost], max_chars: int = 500) -> str:
    """The system message that shows the model the retrieved posts."""
    head = INSTRUCTIONS.format(example=posts[0].id if posts else "ID")
    return "\n".join([head, *(post_line(post, max_chars) for post in posts)])


def with_posts(messages: Sequence[dict], posts: Sequence[IndexedPost], max_chars: int = 500) -> list[dict]:
    """`messages` with the block inserted before the latest user message (at the end when there is none)."""
    messages = list(messages)
    if not posts:
        return messages
    at = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), len(messages))
    return [*messages[:at], {"role": "system", "content": posts_block(posts, max_chars)}, *messages[at:]]


def ground(messages: Sequence[dict], index: PostIndex, index_settings: IndexSettings,
           settings: AssistantSettings, *, query: str | None = None, now: float | None = None,
           exclude: Iterable[str] = (), fits: Callable[[list[dict]], bool] | None = None) -> Grounded:
    """Retrieve the top-k posts for the latest user turn (or `query`) and show them to the model.

    The query is cut to `index.max_query_chars` (a long message is still answered, grounded in its
    beginning). `fits(messages)` says whether a prompt leaves room for the reply: the last posts are dropped
    until it does (none left: the messages as they were)."""
    text = latest_user_text(messages) if query is None else query
    text = text[:index_settings.max_query_chars]
    posts = [hit.post for hit in retrieve(index, text, index_settings, now=now, exclude=exclude)] if text else []
    while True:
        grounded = with_posts(messages, posts, settings.post_chars)
        if not posts or fits is None or fits(grounded):
            return Grounded(grounded, posts)
        posts = posts[:-1]
