"""The OpenAI-compatible API: GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Each generation route checks its body (text, the server's limits, its own field rules), turns it into a
`GenerationRequest` and a `ResponseFormat`, and hands both to the one `GenerationService`. Every refusal
is decided before the first byte is sent; a client that disconnects cancels its generation.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from murmur.infer.engine import Engine
from murmur.serve.cancellation import with_cancellation
from murmur.serve.checks import check_text, check_work
from murmur.serve.errors import APIError
from murmur.serve.formats import ChatFormat, CompletionFormat
from murmur.serve.generation import GenerationRequest, GenerationService, sampling_params
from murmur.serve.retrieval import ground_chat
from murmur.serve.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from murmur.serve.state import ServerState, authorize, server_state
from murmur.serve.structured import response_grammar
from murmur.serve.tools import plan_tools

PREFIX = "/v1"
router = APIRouter(prefix=PREFIX, dependencies=[Depends(authorize)])


def begin(state: ServerState, body: ChatCompletionRequest | CompletionRequest) -> Engine:
    """The checks both generation routes make first; returns the engine to generate with."""
    check_text(body)
    engine = state.require_engine(detailed=bool(state.access.keys))  # with keys, only key holders got here
    state.check_model(body.model)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return engine


def engine_message(message: ChatMessage) -> dict:
    """A request's chat message as the chat template takes it: role, text, and any tool calls or call id."""
    from murmur.tokenizer import message_text

    content = message_text([p.model_dump() for p in message.content] if isinstance(message.content, list)
                           else message.content)
    out = {"role": "system" if message.role == "developer" else message.role, "content": content}
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        out["name"] = message.name
    return out


def message_chars(message: dict) -> int:
    return len(message["content"]) + sum(len(c["function"]["arguments"]) for c in message.get("tool_calls", ()))


def include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.get("/models")
async def list_models(request: Request):
    """The one model this server serves."""
    state = server_state(request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "murmur",
                                        "max_model_len": state.engine.max_seq_len if state.engine else None}]}


@router.post("/chat/completions")
@with_cancellation
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Answer a conversation as the assistant (OpenAI's Chat Completions)."""
    state = server_state(request)
    engine = begin(state, body)
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    messages = [engine_message(m) for m in body.messages]
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens
    check_work(state.settings, prompts=1, n=body.n, chars=sum(message_chars(m) for m in messages),
               max_tokens=max_tokens, prompt_param="messages", max_param=max_param, messages=len(messages))
    tools = plan_tools(engine, body)
    grammar = tools.grammar if tools and tools.grammar else response_grammar(engine, body.response_format)
    generation = GenerationRequest(
        prompts=[messages], n=body.n, stream=body.stream, include_usage=include_usage(body),
        sampling=sampling_params(body, max_tokens, body.logprobs, body.top_logprobs or 0, grammar),
        fields={"prompt": "messages", "max_tokens": max_param}, tools=tools.definitions if tools else None)
    generation, fmt = await ground_chat(state, body.retrieval, engine, generation, ChatFormat(
        engine.tokenizer, body.logprobs, read_calls=bool(tools and tools.read_calls)))  # posts and citations
    return await GenerationService(engine, state.settings, state.model_name).respond(generation, fmt)


@router.post("/completions")
@with_cancellation
async def completions(body: CompletionRequest, request: Request):
    """Continue text (OpenAI's legacy Completions): a prompt, several prompts, or token ids."""
    state = server_state(request)
    engine = begin(state, body)
    prompt = body.prompt
    # Token ids: one prompt (a list of ids) or several (a list of such lists, as vLLM takes them).
    token_ids = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)
    id_prompts = ([prompt] if isinstance(prompt[0], int) else prompt) if token_ids else []
    texts = [] if token_ids else [prompt] if isinstance(prompt, str) else prompt
    check_work(state.settings, prompts=len(id_prompts) if token_ids else len(texts), n=body.n,
               chars=sum(len(t) for t in texts), max_tokens=body.max_tokens, prompt_param="prompt",
               max_param="max_tokens")
    if not token_ids and not texts:
        raise APIError(400, "prompt is an empty list; send at least one prompt", param="prompt")
    logprobs = body.logprobs is not None
    prompts = id_prompts if token_ids else texts
    # Echoed, each choice starts with its prompt's text (choices are prompt-major: n per prompt).
    echo = [engine.tokenizer.decode(p) if token_ids else p for p in prompts for _ in range(body.n)] \
        if body.echo else None
    generation = GenerationRequest(
        prompts=prompts, n=body.n, stream=body.stream, include_usage=include_usage(body),
        sampling=sampling_params(body, body.max_tokens, logprobs, body.logprobs or 0,
                                 response_grammar(engine, body.response_format),
                                 prompt_logprobs=body.logprobs if body.echo and logprobs else None),
        fields={"prompt": "prompt", "max_tokens": "max_tokens"})
    return await GenerationService(engine, state.settings, state.model_name).respond(
        generation, CompletionFormat(engine.tokenizer, logprobs, echo))
