"""Structured outputs: response_format json_object and json_schema, through the engine and the `openai` SDK.

A random-weight model knows nothing of JSON, so every valid output here is the grammar's doing."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from serve_fixtures import LiveServer, make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.infer.engine import Engine
from murmur.infer.sampling import SamplingParams
from murmur.serve.app import create_app
from murmur.settings.serve import ServeSettings

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-json"

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                  "admin": {"type": "boolean"}},
                 "required": ["name", "admin"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "enums": {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "meh"]},
                                               "level": {"enum": [1, 2, 3]}},
              "required": ["mood", "level"], "additionalProperties": False},
    "arrays": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                         "minItems": 1, "maxItems": 3}},
               "required": ["tags"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                 # A fraction's digits are unbounded in JSON: a random model
                                                 # would write them until max_tokens; multipleOf bounds them.
                                                 "score": {"type": "number", "minimum": -1.5, "maximum": 2.5,
                                                           "multipleOf": 0.25}},
                "required": ["age", "score"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(make_model(tokenizer.vocab_size, max_seq_len=256), tokenizer, max_batch_size=16)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_fifty_samples_per_schema_all_validate(engine, name):
    schema = SCHEMAS[name]
    grammar = engine.grammars.json_schema(schema)
    params = [SamplingParams(seed=i, max_tokens=96, grammar=grammar) for i in range(50)]
    completions = engine.generate([[{"role": "user", "content": "give me JSON"}]] * 50, params)
    for completion in completions:
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
    assert len({c.text for c in completions}) >= 4  # sampled, not one forced string


def test_unconstrained_output_of_the_same_model_is_not_json(engine):
    texts = [c.text for c in engine.generate(["give me JSON"] * 8, [SamplingParams(seed=i, max_tokens=24)
                                                                     for i in range(8)])]
    assert not any(text.startswith("{") and text.endswith("}") for text in texts)


@pytest.fixture(scope="module")
def live(engine):
    app = create_app(ServeSettings(default_max_tokens=96), engine=engine, model_name=MODEL)
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=60)


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)
    names: list[Annotated[str, Field(max_length=8)]] = Field(max_length=2)


def test_the_sdks_parse_with_a_pydantic_model(client):
    for seed in range(3):
        reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "a pet"}],
                                              response_format=Pet, seed=seed, max_tokens=200)
        assert isinstance(reply.choices[0].message.parsed, Pet), reply.choices[0].message.content


def test_the_sdks_stream_with_a_pydantic_model(client):
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "a pet"}],
                                        response_format=Pet, seed=1, max_tokens=200) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Pet)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_on_chat_and_completions(client, stream):
    kw = dict(model=MODEL, extra_body={"response_format": {"type": "json_object"}}, n=3, seed=4, max_tokens=200,
              stream=stream)
    if stream:
        chunks = list(client.completions.create(prompt="JSON:", **kw))
        texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    else:
        texts = [c.text for c in client.completions.create(prompt="JSON:", **kw).choices]
        texts += [c.message.content for c in client.chat.completions.create(
            messages=[{"role": "user", "content": "JSON"}], **kw).choices]
    assert all(isinstance(json.loads(text), dict) for text in texts)


def test_bad_and_oversized_schemas_are_refused(client):
    def refused(response_format):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                           response_format=response_format)
        return caught.value.body

    deep: dict = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    body = refused({"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}})
    assert body["param"].startswith("response_format") and "nests" in body["message"]
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                             for i in range(700)}}
    body = refused({"type": "json_schema", "json_schema": {"name": "wide", "schema": wide}})
    assert body["param"].startswith("response_format") and "bytes" in body["message"]
    body = refused({"type": "json_schema", "json_schema": {"name": "odd", "schema": {"type": "sparkly"}}})
    assert body["param"] == "response_format"
    assert refused({"type": "xml"})["param"] == "response_format.type"
