"""Tool calling through the `openai` SDK: tools rendered by the chat template, tool_choice none / auto /
required / named, calls with ids (streamed as OpenAI streams them), and a full round trip."""

from __future__ import annotations

import json

import openai
import pytest
from serve_fixtures import LiveServer, make_model, tokenizer  # noqa: F401 (tokenizer: a fixture)

from murmur.infer.engine import Engine
from murmur.serve.app import create_app
from murmur.serve.tools import ToolCallReader
from murmur.settings.serve import ServeSettings
from murmur.tokenizer import IM_END

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "tiny-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99}},
                                  "required": ["a"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def live(tokenizer):
    engine = Engine(make_model(tokenizer.vocab_size, max_seq_len=1536), tokenizer, max_batch_size=8)
    with LiveServer(create_app(ServeSettings(default_max_tokens=120), engine=engine, model_name=MODEL)) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0, timeout=60)


def test_the_template_shows_tools_calls_and_results(tokenizer):
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": f"sunny {IM_END}"}]
    text, _ = tokenizer.render_chat_text(messages, add_generation_prompt=True, tools=[WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert f"<|im_start|>user\n<tool_response>\nsunny {IM_END}\n</tool_response>{IM_END}" in text
    # A tool's result cannot close its turn: its <|im_end|> literal is text, not the control token.
    ids = tokenizer.render_chat(messages, add_generation_prompt=True, tools=[WEATHER])
    assert ids.count(tokenizer.im_end_id) == text.count(IM_END) - 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_calls_always_parse_and_fit_the_schema(client, choice):
    for seed in range(4):
        reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                                               seed=seed, parallel_tool_calls=False)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        assert finish == "tool_calls" and message.content is None and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        arguments = json.loads(call.function.arguments)
        if call.function.name == "add":
            assert 0 <= arguments["a"] <= 99
        else:
            assert choice == "required" and arguments["unit"] in ("c", "f") and len(arguments["city"]) <= 12


def test_streamed_calls_arrive_whole_with_ids(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 seed=3, stream=True, parallel_tool_calls=False))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) >= 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments)["unit"] in "cf"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_a_round_trip_call_result_answer(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           seed=0, parallel_tool_calls=False)
    message = first.choices[0].message
    history = [*ASK, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny, 21 degrees"}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=5, seed=0, extra_body={"ignore_eos": True})  # a random model may stop early
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_auto_reads_calls_out_of_free_text():
    reader = ToolCallReader()
    pieces = ["Let me check.\n<tool", "_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 2}}\n</tool_call>", "\n"]
    content, calls = "", []
    for piece in pieces:
        text, new = reader.feed(piece)
        content, calls = content + text, calls + new
    content += reader.flush()
    assert content == "Let me check." and [c["function"] for c in calls] == [{"name": "add", "arguments": '{"a": 2}'}]
    reader = ToolCallReader()
    text, calls = reader.feed("<tool_call>\nnot json\n</tool_call> done")
    assert calls == [] and text + reader.flush() == "<tool_call>\nnot json\n</tool_call> done"


def test_tool_requests_are_checked_and_bounded(client):
    def refused(**kw):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=ASK, **kw)
        return caught.value.body["param"]

    assert refused(tool_choice="required") == "tool_choice"
    assert refused(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}) == "tool_choice"
    assert refused(tools=[WEATHER, WEATHER]) == "tools"
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    assert refused(tools=many) == "tools"
    big = {"type": "function", "function": {"name": "big", "parameters": {
        "type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 500} for i in range(600)}}}}
    assert refused(tools=[big]) == "tools"
    assert refused(tools=[{"type": "function", "function": {"name": "bad name!"}}]).startswith("tools")
    assert refused(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}) == \
        "response_format"
