"""Settings of the server (`murmur serve`)."""

from pydantic import Field

from murmur.settings.base import Section


class ServeSettings(Section):
    """Where to listen and how many requests to run at once."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
