"""Reply trees to conversations: root-to-leaf paths between alternating speakers.

Consecutive posts of one author merge into one turn; speakers are named user1, user2, ... in order of
appearance, consistently within a conversation. A tree gives at most `max_paths_per_tree` conversations,
longer paths are cut into pieces of `max_turns` turns; paths shorter than `min_turns` turns are not conversations.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from murmur.data.records import Conversation, Turn
from murmur.data.split import split_of

MERGE_SEPARATOR = "\n"


@dataclass(slots=True)
class ThreadPost:
    """What thread building needs of a post. `order` sorts siblings (earliest reply first)."""

    id: str
    parent_id: str | None
    author_id: str
    text: str
    order: int


def conversation_id(post_ids: list[str]) -> str:
    """A stable id derived from the posts a conversation is made of."""
    return "c" + hashlib.blake2b("\x1f".join(post_ids).encode("utf-8"), digest_size=10).hexdigest()


def tree_conversations(root_id: str, posts: list[ThreadPost], split: str, min_turns: int, max_turns: int,
                       max_paths: int) -> list[Conversation]:
    """The conversations of one reply tree (all `posts` share `root_id`; parents outside it are ignored)."""
    by_id = {p.id: p for p in posts}
    children: dict[str, list[ThreadPost]] = defaultdict(list)
    for post in posts:
        if post.parent_id in by_id and post.id != root_id:
            children[post.parent_id].append(post)
    for siblings in children.values():
        siblings.sort(key=lambda p: p.order)
    if root_id not in by_id:
        return []
    conversations: list[Conversation] = []
    seen: set[tuple[str, ...]] = set()
    # Depth-first, iteratively (threads can be thousands deep); a visited set guards against reply cycles.
    # Each stack entry carries the path so far and its number of turns, so turns are merged once per emit.
    stack: list[tuple[ThreadPost, list[ThreadPost], int]] = [(by_id[root_id], [], 0)]
    visited: set[str] = set()
    while stack and len(conversations) < max_paths:
        post, path, n_turns = stack.pop()
        if post.id in visited:
            continue
        visited.add(post.id)
        if not path or path[-1].author_id != post.author_id:
            n_turns += 1
        if n_turns > max_turns:
            # A long thread becomes several conversations of at most max_turns turns.
            _emit(conversations, seen, _conversation(_turns(path), root_id, split), min_turns)
            path, n_turns = [], 1
        path = path + [post]
        kids = [c for c in children.get(post.id, []) if c.id not in visited]
        if not kids:
            _emit(conversations, seen, _conversation(_turns(path), root_id, split), min_turns)
            continue
        for kid in reversed(kids):
            stack.append((kid, path, n_turns))
    return conversations


def _emit(conversations: list[Conversation], seen: set, conversation: Conversation, min_turns: int) -> None:
    key = tuple(conversation.post_ids)
    if len(conversation.turns) >= min_turns and key not in seen:
        seen.add(key)
        conversations.append(conversation)


def _turns(path: list[ThreadPost]) -> list[tuple[str, list[ThreadPost]]]:
    """Merge consecutive posts by one author into turns."""
    turns: list[tuple[str, list[ThreadPost]]] = []
    for post in path:
        if turns and turns[-1][0] == post.author_id:
            turns[-1][1].append(post)
        else:
            turns.append((post.author_id, [post]))
    return turns


def path_conversation(path: list[ThreadPost], root_id: str, split: str) -> Conversation:
    """The conversation of one reply path (posts in reply order): its turns merged and speakers named as
    thread building does. `murmur data purge` builds the pieces of a cut thread with it."""
    return _conversation(_turns(path), root_id, split)


def _conversation(turns: list[tuple[str, list[ThreadPost]]], root_id: str, split: str) -> Conversation:
    pseudonyms: dict[str, str] = {}
    result = []
    for author, posts in turns:
        speaker = pseudonyms.setdefault(author, f"user{len(pseudonyms) + 1}")
        result.append(Turn(speaker, MERGE_SEPARATOR.join(p.text for p in posts), [p.id for p in posts]))
    post_ids = [pid for turn in result for pid in turn.post_ids]
    return Conversation(conversation_id(post_ids), root_id, split, result)


def bucket_conversations(table: pa.Table, settings) -> tuple[list[dict], int, Counter]:
    """The conversations of a bucket of posts (columns id, parent_id, author_id, text, root_id, order; whole
    trees, sorted by root_id then order): their rows, their number of turns, and how many in each split.
    Both executors build conversations with it, one bucket at a time."""
    rows, n_turns, splits = [], 0, Counter()
    for root, posts in group_by_root(table):
        if len(posts) < settings.min_turns:
            continue
        split = split_of(root, settings.validation_fraction, settings.test_fraction, settings.seed)
        for conversation in tree_conversations(root, posts, split, settings.min_turns, settings.max_turns,
                                               settings.max_paths_per_tree):
            rows.append(conversation.row())
            n_turns += len(conversation.turns)
            splits[split] += 1
    return rows, n_turns, splits


def group_by_root(table: pa.Table) -> Iterator[tuple[str, list[ThreadPost]]]:
    """The posts of a table sorted by root_id, a tree at a time."""
    columns = [table.column(name).to_pylist() for name in ("id", "parent_id", "author_id", "text", "root_id", "order")]
    current, posts = None, []
    for pid, parent, author, text, root, order in zip(*columns):
        if root != current:
            if posts:
                yield current, posts
            current, posts = root, []
        posts.append(ThreadPost(pid, parent, author, text, order))
    if posts:
        yield current, posts


def kept_parent(post_id: str, reply_to: str | None, conversation: str | None, root: str) -> str | None:
    """The parent a kept post records: none for its thread's root, else what it replied to (or its thread)."""
    if post_id == root:
        return None
    return reply_to or conversation


def without_deleted(column, deleted: set[str]):
    """The column with references to deleted posts blanked: no deleted id may remain in any output."""
    if not deleted:
        return column
    return pa.array([None if v in deleted else v for v in column.to_pylist()], pa.string())
