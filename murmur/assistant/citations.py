"""Which retrieved posts a reply cites, and where: OpenAI's `url_citation` annotations.

The rule, in order:

1. **Markers.** The model is asked to cite a post by writing its id in brackets, `[1234]`, after what it
   took from it. Each marker naming a post it was given is one citation; its span is the marker's own
   characters (as OpenAI's spans cover the citation's link text). A marker naming anything else (an id the
   model made up, a post deleted since) cites nothing.
2. **Overlap.** A reply without a single valid marker (a model never taught to cite) cites each given post
   with which it shares a run of at least `min_overlap_words` consecutive words (words as the index sees
   them: letters and digits, case and accents folded); the span is the longest such run in the reply.

Spans are Python string indices (code points) into the reply's text: `text[start_index:end_index]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from urllib.parse import quote

from murmur.index.base import IndexedPost
from murmur.index.text import WORD_RE, words

MARKER_RE = re.compile(r"\[([^\[\]\s]{1,256})\]")
MAX_REPLY_WORDS = 4096  # words of a reply compared with each post (a reply is bounded by its tokens anyway)


def post_url(template: str, post_id: str) -> str:
    """The url of a post: the template with {id} replaced by the url-quoted id (nothing else is expanded)."""
    return template.replace("{id}", quote(post_id, safe=""))


def post_title(text: str, max_words: int = 8, max_chars: int = 100) -> str:
    """A post's first words, with an ellipsis when there are more."""
    parts = text.split()
    title = " ".join(parts[:max_words])
    if len(title) > max_chars:
        title = title[:max_chars - 1].rstrip()
        return title + "…"
    return title + ("…" if len(parts) > max_words else "")


def annotation(post: IndexedPost, start: int, end: int, url_template: str, title_words: int = 8) -> dict:
    return {"type": "url_citation", "url_citation": {"url": post_url(url_template, post.id),
                                                     "title": post_title(post.text, title_words),
                                                     "start_index": start, "end_index": end}}


def marker_spans(text: str, ids: Iterable[str]) -> list[tuple[str, int, int]]:
    """(post id, start, end) of every `[id]` marker in `text` that names one of `ids`."""
    known = set(ids)
    return [(m.group(1), m.start(), m.end()) for m in MARKER_RE.finditer(text) if m.group(1) in known]


def _folded_words(text: str) -> list[tuple[str, int, int]]:
    """The words of `text` (folded as the index folds them) with their character spans."""
    found = []
    for match in WORD_RE.finditer(text):
        folded = "".join(words(match.group()))
        if folded:
            found.append((folded, match.start(), match.end()))
            if len(found) >= MAX_REPLY_WORDS:
                break
    return found


def longest_shared_run(reply: list[tuple[str, int, int]], post_words: Sequence[str]) -> tuple[int, int, int]:
    """(length, first, last) of the longest run of reply words appearing consecutively in the post: the
    classic longest-common-substring table, over words, one row at a time."""
    best = (0, 0, 0)
    previous = [0] * (len(post_words) + 1)
    for i, (word, _, _) in enumerate(reply):
        current = [0] * (len(post_words) + 1)
        for j, other in enumerate(post_words):
            if word == other:
                current[j + 1] = previous[j] + 1
                if current[j + 1] > best[0]:
                    best = (current[j + 1], i - current[j + 1] + 1, i)
        previous = current
    return best


def overlap_spans(text: str, posts: Sequence[IndexedPost], min_words: int) -> list[tuple[str, int, int]]:
    """(post id, start, end) of the longest run of at least `min_words` words each post shares with `text`."""
    reply = _folded_words(text)
    spans = []
    for post in posts:
        length, first, last = longest_shared_run(reply, words(post.text)[:MAX_REPLY_WORDS])
        if length >= min_words:
            spans.append((post.id, reply[first][1], reply[last][2]))
    return spans


def cite(text: str, posts: Sequence[IndexedPost], url_template: str, *, min_overlap_words: int = 4,
         title_words: int = 8) -> list[dict]:
    """The `url_citation` annotations of a reply grounded in `posts` (the rule in the module docstring),
    ordered by where they start in the reply."""
    by_id = {post.id: post for post in posts}
    spans = marker_spans(text, by_id) or overlap_spans(text, posts, min_overlap_words)
    spans.sort(key=lambda span: (span[1], span[2]))
    return [annotation(by_id[pid], start, end, url_template, title_words) for pid, start, end in spans]
