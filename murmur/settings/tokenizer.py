"""Settings of the tokenizer and tokenize stages."""

from pydantic import Field

from murmur.settings.base import Section


class TokenizerSettings(Section):
    """Byte-level BPE training and token-shard writing."""

    vocab_size: int = Field(4096, gt=0)
    pretrained: str | None = None
