"""What the assistant works with: the post index, how it ranks and cites, the per-author reply limit, and
which mentions are being answered right now."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from murmur.index.base import PostIndex
from murmur.serve.access import RateLimiter
from murmur.settings.assistant import AssistantSettings
from murmur.settings.data import DataSettings
from murmur.settings.index import IndexSettings


class MentionLocks:
    """One lock per mention id being answered, so a mention delivered twice at once is generated once: the
    second delivery waits, then finds the first's answer in the index. An id's lock lives only while a request
    holds or awaits it, so memory is bounded by the requests in flight, not by the mentions ever seen."""

    def __init__(self):
        self._held: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, mention_id: str) -> AsyncIterator[None]:
        lock, users = self._held.get(mention_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._held[mention_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._held[mention_id]
            if users == 1:
                del self._held[mention_id]
            else:
                self._held[mention_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._held)


@dataclass
class Assistant:
    """The index answers are grounded in, its ranking settings, the assistant's settings, the data settings
    posts added live are cleaned with, the limiter of replies per author, and the mentions being answered."""

    index: PostIndex
    index_settings: IndexSettings = field(default_factory=IndexSettings)
    settings: AssistantSettings = field(default_factory=AssistantSettings)
    data_settings: DataSettings = field(default_factory=DataSettings)
    limiter: RateLimiter | None = None
    answering: MentionLocks = field(default_factory=MentionLocks)

    def __post_init__(self):
        if self.limiter is None:
            self.limiter = RateLimiter(self.settings.replies_per_author, max_keys=self.settings.max_authors)
            self.limiter.WINDOW_S = self.settings.rate_window_s  # the limiter's window, per author

    def allow_author(self, author_id: str) -> bool:
        """Whether the author may get one more reply now (and count it)."""
        return self.limiter.allow(f"author:{author_id}")
