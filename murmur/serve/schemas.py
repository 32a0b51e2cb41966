"""Request bodies of the OpenAI-compatible API, as pydantic models (they also make /openapi.json).

Fields follow OpenAI's names and ranges; `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`
are extras in the manner of vLLM (`MURMUR_EXTENSIONS`). No field is silently ignored: an OpenAI
parameter Murmur does not implement (`UNSUPPORTED`) and any unknown field are refused with a 400
naming it (`murmur.serve.errors`). Limits that depend on the server's settings (n, prompts, characters,
max_tokens) and the size of schemas and tools are checked by the handlers (`murmur.serve.checks`),
before any work, not here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
)

from murmur.infer.sampling import MAX_LOGIT_BIAS

INT64 = 2**63 - 1

# OpenAI parameters Murmur does not implement, and why: a request naming one is refused, never half-served.
UNSUPPORTED = {
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "store": "stored completions are not supported", "metadata": "stored completions are not supported",
    "service_tier": "there is one service tier", "reasoning_effort": "the model has no reasoning mode",
    "verbosity": "the model has no verbosity setting", "functions": "deprecated by OpenAI: use tools",
    "function_call": "deprecated by OpenAI: use tool_choice", "prompt_cache_key": "prompt caching is automatic",
    "prompt_cache_retention": "prompt caching is automatic", "safety_identifier": "not supported",
    "suffix": "insertion (suffix) is not supported", "best_of": "best_of is not supported; use n",
}
# Fields Murmur adds to OpenAI's, in the manner of vLLM.
MURMUR_EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "retrieval")


class Strict(BaseModel):
    """Every request model refuses fields it does not know."""

    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"] = "text"
    text: StrictStr


class FunctionCall(Strict):
    name: StrictStr = Field(..., max_length=64)
    arguments: StrictStr = Field(..., description="the arguments as JSON text")


class ToolCall(Strict):
    id: StrictStr = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class URLCitation(Strict):
    url: StrictStr = Field(..., max_length=2048)
    title: StrictStr | None = Field(None, max_length=1024)
    start_index: int = Field(..., ge=0, le=INT64)
    end_index: int = Field(..., ge=0, le=INT64)


class Annotation(Strict):
    """A citation in an answer (docs/assistant.md), as a client sends the answer back in the history."""

    type: Literal["url_citation"] = "url_citation"
    url_citation: URLCitation


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls, sent back with the history")
    tool_call_id: StrictStr | None = Field(None, max_length=256, description="the call a tool message answers")
    # Fields of an assistant message as the API returned it, which SDKs send back unchanged.
    refusal: StrictStr | None = None
    annotations: list[Annotation] | None = Field(None, max_length=256, description="an answer's citations, sent "
                                                  "back with the history (not shown to the model)")
    audio: None = None  # only as the SDK echoes it back: null
    function_call: None = None


class StreamOptions(Strict):
    include_usage: StrictBool = False


class JSONSchemaFormat(Strict):
    name: StrictStr = Field(..., max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (JSON valid under the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class FunctionDefinition(Strict):
    name: StrictStr = Field(..., max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(Strict):
    name: StrictStr


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class SamplingFields(Strict):
    """Fields shared by chat and text completions."""

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
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description=f"token id -> bias in [-100, 100]; at most "
                                                f"{MAX_LOGIT_BIAS} entries")
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"holds {len(value)} entries; at most {MAX_LOGIT_BIAS}")
        for key, bias in value.items():
            if not key.isdigit() or len(key) > 12:
                raise ValueError(f"keys are token ids (decimal integers >= 0), got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} is {bias}; biases are in [-100, 100]")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    retrieval: StrictBool | None = Field(None, description="Murmur: ground the answer in the post index and cite "
                                         "posts (default: on when the server has an index)")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True


class CompletionRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[int] | list[list[int]] = Field(
        ..., description="text, texts, token ids, or lists of token ids")
    logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token (OpenAI: up to 5)")
    echo: StrictBool = Field(False, description="the prompt before the completion (with its logprobs when asked)")
