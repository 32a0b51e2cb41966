"""Settings of the post index (`murmur index`): where it lives, how it ranks, and what one input may cost."""

from pydantic import Field, field_validator

from murmur.settings.base import Section

SPLITS = ("train", "validation", "test")


class IndexSettings(Section):
    """A full-text index of the curated posts with BM25 ranking, kept live by `murmur index --follow`."""

    url: str | None = Field(None, description="postgresql://USER@HOST/DB for a PostgreSQL index (the password "
                            "from PGPASSWORD or ~/.pgpass, never from here); default SQLite in RUN/index/")
    pg_schema: str = Field("murmur_index", pattern=r"^[a-z_][a-z0-9_]{0,40}$",
                           description="PostgreSQL schema the index's tables live in (one per index)")
    splits: list[str] = Field(default_factory=lambda: list(SPLITS),
                              description="splits of posts.parquet indexed at build time")
    batch_size: int = Field(5000, ge=1, description="posts per transaction when building or following")

    # Ranking
    top_k: int = Field(8, ge=1, le=100, description="posts retrieved for a query")
    candidates: int = Field(100, ge=1, le=1000, description="BM25 best matches the recency term re-ranks")
    recency_weight: float = Field(0.1, ge=0, description="score = bm25 / best bm25 + weight x 2^(-age / "
                                  "half-life); 0 = BM25 alone")
    recency_half_life_hours: float = Field(72.0, gt=0, description="age at which a post's recency term halves")

    # Bounds on hostile input
    max_query_chars: int = Field(2000, ge=1, description="longer queries are refused")
    max_query_terms: int = Field(32, ge=1, le=256, description="distinct words of a query searched; later "
                                 "ones are ignored")
    max_record_bytes: int = Field(65536, ge=256, description="a longer line of a followed stream is quarantined")
    max_json_depth: int = Field(64, ge=1, le=256, description="JSON nested deeper than this is quarantined")
    poll_interval_s: float = Field(0.1, gt=0, le=5, description="how often --follow looks for new lines")

    # Evaluation
    recall_examples: int = Field(1000, ge=0, description="held-out replies whose parent retrieval is scored")

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split {unknown[0]!r}; choose from {', '.join(SPLITS)}")
        return value

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("an index url starts with postgresql:// (leave it unset for SQLite in RUN/index/)")
        if value is not None and url_has_password(value):
            raise ValueError("the index url holds a password, which would end up in logs and build records; "
                             "give it in PGPASSWORD or ~/.pgpass instead")
        return value


def url_has_password(url: str) -> bool:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return parts.password is not None or "password=" in parts.query.lower()
    except ValueError:
        return False
