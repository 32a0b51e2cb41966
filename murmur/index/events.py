"""One line of a followed stream -> changes to the index: new posts, deletions, restores, or a quarantine row.

A line is one JSON object, any of:

- an X API v2 stream message, `{"data": {post}, "includes": {"tweets": [...]}}` (`data` may be a list);
- an X API v2 compliance event, with or without `data`: `{"delete": {"tweet": {"id": ...}}}`, `drop`/`undrop`
  for a post, `user_delete`, `user_suspend`, `user_protect` (and their `user_un...` restores) for an account;
- a bare post object: `id`, `text`, `author_id`, optional `created_at`, `conversation_id`, `in_reply_to_id` or
  `referenced_tweets`;
- a deletion event in the form deletion lists use: `{"post": "ID"}`, `{"account": "ID", "action": "restore"}`.

A new post is cleaned and filtered as the data stage would (personal data scrubbed, control tokens removed,
retweets and spam dropped), so a live post meets the same bar as a curated one. What cannot be used is
quarantined with a reason and its offset, never with its text.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime

from murmur.data.clean import Cleaner
from murmur.data.compliance import parse_deletion_events
from murmur.data.filters import PostFilter
from murmur.data.records import Post
from murmur.data.sources import nests_deeper_than
from murmur.errors import MurmurError
from murmur.index.base import Changes, IndexedPost
from murmur.settings.data import DataSettings
from murmur.settings.index import IndexSettings

MAX_ID_CHARS = 256  # an X id is 19 digits; a longer "id" is not one, and bounds what a row may hold
POST_EVENTS = {"delete": False, "drop": False, "undrop": True}  # event -> is a restore
ACCOUNT_EVENTS = {"user_delete": False, "user_suspend": False, "user_protect": False,
                  "user_undelete": True, "user_unsuspend": True, "user_unprotect": True}
DELETION_KEYS = {"post", "account", "action", "note"}


class Unusable(Exception):
    """A record that cannot be used; `reason` is its quarantine reason."""

    def __init__(self, reason: str, record_id: str | None = None):
        super().__init__(reason)
        self.reason, self.record_id = reason, record_id


class EventReader:
    """Reads stream lines into `Changes`. Posts are cleaned and filtered with the data stage's settings."""

    def __init__(self, settings: IndexSettings | None = None, data: DataSettings | None = None):
        self.settings = settings or IndexSettings()
        data = data or DataSettings()
        self.cleaner, self.filter = Cleaner(data), PostFilter(data)
        self.dropped: Counter = Counter()  # posts the filters turned away, by reason
        self.ignored = 0  # events that change nothing here (a withheld notice, a profile edit)

    def read(self, line: bytes, source: str, offset: int, changes: Changes) -> None:
        """Add what `line` (read at byte `offset` of `source`) means to `changes`."""
        before = len(changes)
        try:
            self._read(line, changes)
        except Unusable as bad:
            del changes.events[before:]  # a line is used whole or not at all
            changes.quarantine(source, offset, bad.reason, bad.record_id)

    def _read(self, line: bytes, changes: Changes) -> None:
        line = line.strip()
        if not line:
            return
        if len(line) > self.settings.max_record_bytes:
            raise Unusable("too_large")
        if nests_deeper_than(line, self.settings.max_json_depth):
            raise Unusable("too_deep")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise Unusable("not_utf8") from None
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            raise Unusable("malformed_json") from None
        if not isinstance(document, dict):
            raise Unusable("not_a_json_object")
        if document.keys() <= DELETION_KEYS and document.keys() & {"post", "account"}:
            try:
                events = parse_deletion_events(text, "stream", json_only=True)
            except MurmurError:
                raise Unusable("bad_deletion_event") from None
            for event in events:
                (changes.restore if event.restore else changes.delete)(event.kind, event.id)
            return
        if "data" in document or "includes" in document:
            data = document.get("data")
            items = data if isinstance(data, list) else [data] if data is not None else []
            includes = document.get("includes")
            if isinstance(includes, dict) and isinstance(includes.get("tweets"), list):
                items = items + includes["tweets"]
            if not items:
                raise Unusable("no_data")
        else:
            items = [document]
        for item in items:
            self._item(item, changes)

    def _item(self, item, changes: Changes) -> None:
        if not isinstance(item, dict):
            raise Unusable("not_a_json_object")
        for name, restore in POST_EVENTS.items():
            if name in item:
                self._compliance(item[name], "tweet", "post", restore, changes)
                return
        for name, restore in ACCOUNT_EVENTS.items():
            if name in item:
                self._compliance(item[name], "user", "account", restore, changes)
                return
        if "text" not in item and "note_tweet" not in item and any(k.startswith(("user_", "tweet_")) or k == "withheld"
                                                                    for k in item):
            self.ignored += 1  # another compliance notice: nothing to index or remove
            return
        post = self._post(item)
        if post is not None:
            changes.add(post)

    def _compliance(self, event, key: str, kind: str, restore: bool, changes: Changes) -> None:
        target = event.get(key) if isinstance(event, dict) else None
        ident = _id(target.get("id")) if isinstance(target, dict) else None
        if ident is None:
            raise Unusable(f"no_{kind}_id")
        (changes.restore if restore else changes.delete)(kind, ident)

    def _post(self, item: dict) -> IndexedPost | None:
        ident = _id(item.get("id"))
        if ident is None:
            raise Unusable("no_id")
        note = item.get("note_tweet")
        text = note.get("text") if isinstance(note, dict) and isinstance(note.get("text"), str) else item.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Unusable("no_text", ident)
        author = _id(item.get("author_id"))
        if author is None:
            # Without its author, an account deletion could never find the post.
            raise Unusable("no_author", ident)
        reply_to = _id(item.get("in_reply_to_id"))
        retweet_of = None
        references = item.get("referenced_tweets")
        for ref in references if isinstance(references, list) else []:
            if isinstance(ref, dict) and ref.get("type") == "replied_to":
                reply_to = _id(ref.get("id")) or reply_to
            elif isinstance(ref, dict) and ref.get("type") == "retweeted":
                retweet_of = _id(ref.get("id"))
        if not _encodable(text):
            raise Unusable("bad_unicode", ident)
        post = Post(id=ident, author_id=author, text=text, source="stream", created_at=_time(item.get("created_at")),
                    lang=item.get("lang") if isinstance(item.get("lang"), str) else None,
                    conversation_id=_id(item.get("conversation_id")), in_reply_to_id=reply_to,
                    retweet_of_id=retweet_of)
        cleaned = self.cleaner.clean(post)
        reason = self.filter.reason(post, cleaned)
        if reason:
            self.dropped[reason] += 1
            return None
        created = post.created_at.timestamp() if post.created_at else None
        return IndexedPost(ident, author, cleaned.text, created, post.conversation_id, post.in_reply_to_id)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return True


def _id(value) -> str | None:
    """An id as text: a string or an integer (a float has lost digits; a bool or object is no id). Raises
    Unusable for an id no record may have."""
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    if not text:
        return None
    if len(text) > MAX_ID_CHARS or not _encodable(text) or not text.isprintable():
        raise Unusable("bad_id")
    return text


def _time(value) -> datetime | None:
    """ISO 8601 (as the X API writes it) or epoch seconds; None when unreadable."""
    try:
        if isinstance(value, str) and len(value) <= 64:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value, tz=UTC)
        else:
            return None
    except (ValueError, OverflowError, OSError):
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
