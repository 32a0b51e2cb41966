"""Request bodies of the OpenAI-compatible API, as pydantic models (they also make /openapi.json).

Fields follow OpenAI's names and ranges; `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`
are extras in the manner of vLLM. Unknown fields are ignored, as OpenAI-compatible servers do.
Limits that depend on the server's settings (n, prompts, characters, max_tokens) are checked by the
handlers (`murmur.serve.checks`), before any work, not here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
)

INT64 = 2**63 - 1


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = Field(None, description="the served model's name (see GET /v1/models)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64)
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 16 strings that end the output")
    n: int = Field(1, ge=1, le=INT64, description="choices to generate; at most serve.max_n (default 16)")
    seed: int | None = Field(None, ge=-INT64, le=INT64)
    user: StrictStr | None = None
    top_k: int | None = Field(None, ge=0, le=INT64)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[int] = Field(..., description="text, texts, or token ids")
    logprobs: int | None = Field(None, ge=0, le=5)
