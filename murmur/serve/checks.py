"""What a request body must satisfy before any of its work is done: its strings are text, and the work it
asks for (prompts, messages, choices, characters, reply tokens) is within the server's settings.

Checks against the model (a prompt too long for the context) are the engine's own, through the
generation service; these need no tokenizing at all.
"""

from __future__ import annotations

import json
from typing import Any

from murmur.serve.errors import APIError
from murmur.serve.schemas import SamplingFields
from murmur.settings.serve import ServeSettings


def surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string in `value` holding a lone surrogate code point (not text), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = surrogate_at(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def check_text(body: SamplingFields) -> None:
    where = surrogate_at(body.model_dump(), "")
    if where:
        raise APIError(400, f"{where} holds a lone surrogate code point (an unpaired \\ud800-\\udfff escape), "
                            "which is not text: send the character itself or a valid surrogate pair.",
                       param=where, code="invalid_value")


def check_work(settings: ServeSettings, *, prompts: int, n: int, chars: int, max_tokens: int | None,
               prompt_param: str, max_param: str, messages: int = 0) -> None:
    """Refuse a request asking for more work than the settings allow, before any is done."""
    if messages > settings.max_messages:
        raise APIError(400, f"messages holds {messages} messages; this server takes at most "
                            f"{settings.max_messages} per request (serve.max_messages).",
                       param="messages", code="invalid_value")
    if n > settings.max_n:
        raise APIError(400, f"n is {n}; this server gives at most {settings.max_n} choices per request "
                            "(serve.max_n).", param="n", code="invalid_value")
    if prompts > settings.max_prompts:
        raise APIError(400, f"prompt holds {prompts} prompts; this server takes at most {settings.max_prompts} "
                            "per request (serve.max_prompts). Send them in several requests.",
                       param="prompt", code="invalid_value")
    if prompts * n > settings.max_choices:
        raise APIError(400, f"{prompts} prompts x n={n} asks for {prompts * n} completions; this server makes at "
                            f"most {settings.max_choices} per request (serve.max_choices).",
                       param="n", code="invalid_value")
    if chars > settings.max_prompt_chars:
        raise APIError(400, f"{prompt_param} holds {chars} characters; this server takes at most "
                            f"{settings.max_prompt_chars} per request (serve.max_prompt_chars).",
                       param=prompt_param, code="invalid_value")
    if max_tokens is not None and max_tokens > settings.max_reply_tokens:
        raise APIError(400, f"{max_param} is {max_tokens}; this server generates at most "
                            f"{settings.max_reply_tokens} tokens per choice (serve.max_reply_tokens).",
                       param=max_param, code="invalid_value")


# Schemas and tools come from requests: their size and nesting are bounded before any grammar is built
# (the grammar library then bounds its own work, `murmur.infer.grammar`). OpenAI allows 128 tools.
MAX_SCHEMA_BYTES = 65_536  # a response_format schema, as compact JSON
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays in a schema or a tool's parameters
MAX_TOOLS = 128
MAX_TOOLS_BYTES = 262_144  # every tool definition of a request together, as compact JSON


def json_depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json_size(value: Any, *, param: str, max_bytes: int, what: str) -> None:
    """Refuse a schema-like value that is too large or too deeply nested to compile."""
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if size > max_bytes:
        raise APIError(400, f"{what} is {size} bytes as JSON; this server takes at most {max_bytes}. Simplify it.",
                       param=param, code="invalid_value")
    depth = json_depth(value)
    if depth > MAX_SCHEMA_DEPTH:
        raise APIError(400, f"{what} nests {depth} levels of objects and arrays; this server takes at most "
                            f"{MAX_SCHEMA_DEPTH}. Flatten it.", param=param, code="invalid_value")
