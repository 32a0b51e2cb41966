"""Structured outputs: a request's `response_format` as the grammar its output is decoded in.

`{"type": "text"}` (or none) leaves the output free; `json_object` allows any one JSON object;
`json_schema` allows exactly the JSON documents valid under its schema, whatever the model's weights:
the constraint is applied to every token (`murmur.infer.grammar`), so the output parses unless it is cut
short by max_tokens (finish_reason "length") or a stop string.
"""

from __future__ import annotations

from murmur.errors import MurmurError
from murmur.infer.engine import Engine
from murmur.serve.checks import MAX_SCHEMA_BYTES, check_json_size
from murmur.serve.errors import APIError, api_error
from murmur.serve.schemas import ResponseFormat

PARAM = "response_format"


def response_grammar(engine: Engine, response_format: ResponseFormat | None):
    """The `Grammar` a response format asks for, or None for free text; a refusal names response_format."""
    if response_format is None or response_format.type == "text":
        return None
    try:
        if response_format.type == "json_object":
            return engine.grammars.json_object(PARAM)
        spec = response_format.json_schema
        if spec is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema object with a name and "
                                "a schema", param=f"{PARAM}.json_schema", code="invalid_value")
        schema = spec.schema_ if spec.schema_ is not None else {}
        check_json_size(schema, param=f"{PARAM}.json_schema.schema", max_bytes=MAX_SCHEMA_BYTES,
                        what="response_format's JSON schema")
        return engine.grammars.json_schema(schema, PARAM)
    except MurmurError as err:
        raise api_error(err) from None
