"""A mention's thread, rebuilt from the index: the posts it replies to, up the reply chain, oldest first.

The chain is walked one `get` at a time from the post the mention replies to, so the work is bounded by
`limit` whatever the conversation's size, and a reply cycle in hostile data ends the walk. A deleted post's
replies have lost their `in_reply_to_id` (the index clears references to deleted posts), so a chain never
walks through a deleted post; whether the thread itself was deleted is the caller's check.
"""

from __future__ import annotations

from murmur.index.base import IndexedPost, PostIndex


def reply_chain(index: PostIndex, parent_id: str | None, limit: int) -> list[IndexedPost]:
    """The posts from the conversation's first known post down to `parent_id`, at most `limit` (the latest)."""
    chain: list[IndexedPost] = []
    seen: set[str] = set()
    current = parent_id
    while current and current not in seen and len(chain) < limit:
        seen.add(current)
        post = index.get([current]).get(current)
        if post is None:
            break
        chain.append(post)
        current = post.in_reply_to_id
    chain.reverse()
    return chain


def thread_messages(chain: list[IndexedPost], assistant_id: str | None) -> list[dict]:
    """The thread as chat messages: the assistant's own posts as its turns, everyone else's as user turns
    signed with the author's pseudonym."""
    return [{"role": "assistant", "content": post.text} if assistant_id and post.author_id == assistant_id
            else {"role": "user", "content": f"@{post.author_id}: {post.text}"} for post in chain]
