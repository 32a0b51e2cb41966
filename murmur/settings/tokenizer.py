"""Settings of the tokenizer and tokenize stages."""

from typing import Literal

from pydantic import Field

from murmur.settings.base import Section


class ChatSource(Section):
    """A JSONL file of conversations in OpenAI's `messages` format, mixed into chat finetuning."""

    path: str
    weight: float = Field(1.0, ge=0, description="times each conversation appears (fractions: a seeded share)")


class TokenizerSettings(Section):
    """Byte-level BPE training and token-shard writing."""

    vocab_size: int = Field(4096, gt=0)
    pretrained: str | None = Field(None, description="a local Hugging Face tokenizer/model directory to use "
                                   "instead of training one")
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to become a merge")
    sft_roles: Literal["both", "second"] = Field(
        "both", description="which speakers of a thread become the assistant: 'both' renders each thread once "
        "per replying speaker so every reply is trained; 'second' only the speaker of the first reply")
    thread_weight: float = Field(1.0, ge=0, description="weight of the platform's threads in chat finetuning")
    chat_sources: list[ChatSource] = Field(default_factory=list)
    shard_tokens: int = Field(1 << 26, gt=0, description="tokens per shard file (the last one is shorter)")
    seed: int = 0
