"""Settings of the data curation stage (`murmur data`)."""

from pydantic import Field

from murmur.settings.base import Section


class DataSettings(Section):
    """Where posts come from and how they are curated."""

    sources: list[str] = Field(default_factory=list, description="FORMAT:PATH entries, e.g. 'x-api:posts/*.json'")
    deletions: str | None = None
    executor: str = "local"
