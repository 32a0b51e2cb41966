"""Words as the index sees them, one definition for both backends, and the bounded parse of a user's query.

A word is a run of letters and digits, lower-cased, with accents removed (`Café` -> `cafe`): the words SQLite's
FTS5 `unicode61 remove_diacritics 2` tokenizer makes. The PostgreSQL backend stores exactly these words, so
the two backends count the same terms and rank alike.

A query is never passed to a query language: it is cut into words, and each word is searched as a quoted
literal, so `"a" OR NEAR(` searches the words a, or and near, and cannot be a syntax error.
"""

from __future__ import annotations

import re
import unicodedata

from murmur.errors import MurmurError

WORD_RE = re.compile(r"[^\W_]+")
# PostgreSQL refuses lexemes of 2 KiB or more; a longer "word" is no search term anyway.
MAX_WORD_BYTES = 2000


class QueryError(MurmurError):
    """A query the index refuses (too long); the message says what the limit is."""


def words(text: str) -> list[str]:
    """The words of a text, in order, repeats kept (their count is the term frequency)."""
    text = text.lower()
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    return WORD_RE.findall(text)


def query_terms(query: str, max_chars: int, max_terms: int) -> list[str]:
    """The distinct words of a query, in order of first appearance, at most `max_terms` of them.

    A query longer than `max_chars` is refused before any work on it (QueryError), so the work per query is
    bounded whatever a caller sends."""
    if not isinstance(query, str):
        raise QueryError(f"a query is text, not {type(query).__name__}")
    if len(query) > max_chars:
        raise QueryError(f"query of {len(query):,} characters is longer than index.max_query_chars "
                         f"({max_chars:,}); send the words that matter, or raise the setting")
    seen: dict[str, None] = {}
    for word in words(query):
        if len(word.encode("utf-8")) <= MAX_WORD_BYTES:
            seen.setdefault(word)
            if len(seen) == max_terms:
                break
    return list(seen)
