"""What the assistant works with: the post index, how it ranks and cites, and the per-author reply limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from murmur.index.base import PostIndex
from murmur.serve.access import RateLimiter
from murmur.settings.assistant import AssistantSettings
from murmur.settings.data import DataSettings
from murmur.settings.index import IndexSettings


@dataclass
class Assistant:
    """The index answers are grounded in, its ranking settings, the assistant's settings, the data settings
    posts added live are cleaned with, and the limiter of replies per author."""

    index: PostIndex
    index_settings: IndexSettings = field(default_factory=IndexSettings)
    settings: AssistantSettings = field(default_factory=AssistantSettings)
    data_settings: DataSettings = field(default_factory=DataSettings)
    limiter: RateLimiter | None = None

    def __post_init__(self):
        if self.limiter is None:
            self.limiter = RateLimiter(self.settings.replies_per_author, max_keys=self.settings.max_authors)
            self.limiter.WINDOW_S = self.settings.rate_window_s  # the limiter's window, per author

    def allow_author(self, author_id: str) -> bool:
        """Whether the author may get one more reply now (and count it)."""
        return self.limiter.allow(f"author:{author_id}")
