"""Tool calling: `tools`, `tool_choice` and `parallel_tool_calls` of a chat request, and the calls in its reply.

The chat template shows the tools to the model (`murmur.tokenizer`: Hermes/Qwen-style, a call written as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`). `tool_choice` "auto" lets the model
decide and reads any calls out of its text; "required" and a named function force the output through a
grammar of calls whose arguments are valid under each function's parameters schema, so they always parse;
"none" shows the tools but reads no calls. `ToolCallReader` turns a reply (whole or streamed) into
content and OpenAI `tool_calls` with ids.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from murmur.errors import MurmurError
from murmur.infer.engine import Engine
from murmur.infer.grammar import JSON_OPTIONS
from murmur.serve.checks import MAX_TOOLS, MAX_TOOLS_BYTES, check_json_size
from murmur.serve.errors import APIError, api_error
from murmur.serve.schemas import ChatCompletionRequest
from murmur.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass
class ToolPlan:
    """What a request's tools come to: the definitions to render, the grammar forcing calls (or None),
    and whether calls are read out of the reply."""

    definitions: list[dict[str, Any]]
    grammar: Any = None
    read_calls: bool = False


def plan_tools(engine: Engine, body: ChatCompletionRequest) -> ToolPlan | None:
    """Check a request's tools and decide how they are used; None when it has none."""
    if not body.tools:
        if body.tool_choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools: send the function definitions in tools",
                           param="tool_choice", code="invalid_value")
        return None
    if len(body.tools) > MAX_TOOLS:
        raise APIError(400, f"tools holds {len(body.tools)} functions; this server takes at most {MAX_TOOLS}",
                       param="tools", code="invalid_value")
    definitions = [tool.model_dump(by_alias=True, exclude_none=True) for tool in body.tools]
    check_json_size(definitions, param="tools", max_bytes=MAX_TOOLS_BYTES, what="tools")
    names = [tool.function.name for tool in body.tools]
    if len(set(names)) < len(names):
        raise APIError(400, "tools names a function twice; each function name must be unique", param="tools",
                       code="invalid_value")
    if not engine.tokenizer.renders_tools:
        raise APIError(400, "this model's chat template does not show tools to the model; serve a model whose "
                            "template renders tools (Murmur's own does)", param="tools", code="invalid_value")
    choice = body.tool_choice or "auto"
    if choice == "none":
        return ToolPlan(definitions)
    if body.response_format is not None and body.response_format.type != "text" and choice != "auto":
        raise APIError(400, "response_format cannot be combined with a tool_choice that forces a call",
                       param="response_format", code="invalid_value")
    if choice == "auto":
        return ToolPlan(definitions, read_calls=True)
    forced = names if choice == "required" else [choice.function.name]
    if forced[0] not in names:
        raise APIError(400, f"tool_choice names the function {forced[0][:64]!r}, which is not in tools",
                       param="tool_choice", code="invalid_value")
    by_name = {tool.function.name: tool.function for tool in body.tools}
    try:
        grammar = engine.grammars.lark(call_grammar([(name, by_name[name].parameters) for name in forced],
                                                    parallel=body.parallel_tool_calls and choice == "required"),
                                       "tools' parameters schemas", "tools")
    except MurmurError as err:
        raise api_error(err) from None
    return ToolPlan(definitions, grammar=grammar, read_calls=True)


def call_grammar(functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> str:
    """A Lark grammar of one tool call (or several, one per line, when `parallel`) to one of `functions`,
    each call's arguments valid under its parameters schema."""
    variants = [{"type": "object", "properties": {"name": {"const": name},
                                                  "arguments": parameters or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for name, parameters in functions]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**schema, "x-guidance": JSON_OPTIONS}  # compact JSON, as in response_format
    call = f'"{TOOL_CALL_OPEN}\\n" %json {json.dumps(schema)} "\\n{TOOL_CALL_CLOSE}"'
    repeat = ' ("\\n" call)*' if parallel else ""
    return f"start: call{repeat}\ncall: {call}\n"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Splits a reply into content and tool calls, whole or as it streams.

    `feed` takes the next text and returns (content safe to show now, calls completed now); text that may
    be the start of a call is held back until it is one or cannot be. A call that does not parse as
    `{"name": ..., "arguments": {...}}` stays in the content, as the model wrote it."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls = 0
        self.after_call = False  # newlines right after a call separate it from what follows: not content

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self.buffer += text
        if self.after_call:
            self.buffer = self.buffer.lstrip("\n")
            self.after_call = not self.buffer
        content, calls = [], []
        while True:
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                # Hold back what may begin a call, and the newlines that would go before one.
                ready = self.buffer[:len(self.buffer) - partial_suffix(self.buffer, TOOL_CALL_OPEN)]
                ready = ready.rstrip("\n")
                content.append(ready)
                self.buffer = self.buffer[len(ready):]
                break
            end = self.buffer.find(TOOL_CALL_CLOSE, start)
            if end < 0:
                before = self.buffer[:start].rstrip("\n")
                content.append(before)
                self.buffer = self.buffer[len(before):]
                break
            before, rest = self.buffer[:start], self.buffer[end + len(TOOL_CALL_CLOSE):]
            call = self._parse(self.buffer[start + len(TOOL_CALL_OPEN):end])
            if call is None:
                content.append(self.buffer[:end + len(TOOL_CALL_CLOSE)])
                self.buffer = rest
            else:
                content.append(before.rstrip("\n"))
                calls.append(call)
                self.buffer = rest.lstrip("\n")
                self.after_call = not self.buffer
        return "".join(content), calls

    def flush(self) -> str:
        """What is left at the end: an unfinished call is content."""
        rest, self.buffer = self.buffer, ""
        return rest

    def _parse(self, text: str) -> dict[str, Any] | None:
        try:
            call = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            return None
        arguments = call["arguments"]
        index, self.calls = self.calls, self.calls + 1
        return {"index": index, "id": new_call_id(), "type": "function",
                "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                             else json.dumps(arguments, ensure_ascii=False)}}


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
