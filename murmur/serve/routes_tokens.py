"""The tokenizer over HTTP, in vLLM's shapes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Clients that count or score tokens themselves (lm-evaluation-harness's remote tokenizer, prompt
builders) use the served model's own tokenizer through these instead of downloading it. A text prompt
is tokenized as /v1/completions tokenizes it, chat messages as /v1/chat/completions renders them (with
the generation prompt by default), so the ids are exactly those a generation request would use.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import Field, StrictBool, StrictStr

from murmur.errors import MurmurError
from murmur.serve.checks import check_text, check_work
from murmur.serve.errors import APIError, api_error
from murmur.serve.schemas import ChatMessage, Strict, Tool
from murmur.serve.state import authorize, server_state
from murmur.tokenizer import CHATML_TEMPLATE

router = APIRouter(dependencies=[Depends(authorize)])


class TokenizeRequest(Strict):
    """Either `prompt` (text) or `messages` (a chat), as vLLM takes them."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool = Field(False, description="accepted for vLLM's clients; Murmur's tokenizers "
                                           "add no special tokens to a text")
    return_token_strs: StrictBool = False


class DetokenizeRequest(Strict):
    model: StrictStr | None = None
    tokens: list[int] = Field(..., max_length=1_000_000)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    """Token ids of a text or a chat: {"count", "max_model_len", "tokens", "token_strs"}."""
    from murmur.serve.routes_openai import engine_message

    state = server_state(request)
    check_text(body)
    engine = state.require_engine(detailed=bool(state.access.keys))
    state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send either prompt (a text) or messages (a chat), not both or neither",
                       param="prompt", code="invalid_value")
    if body.prompt is not None:
        check_work(state.settings, prompts=1, n=1, chars=len(body.prompt), max_tokens=None, prompt_param="prompt",
                   max_param="max_tokens")
        ids = engine.tokenizer.encode(body.prompt)
    else:
        messages = [engine_message(m) for m in body.messages]
        check_work(state.settings, prompts=1, n=1, chars=sum(len(m["content"]) for m in messages), max_tokens=None,
                   prompt_param="messages", max_param="max_tokens", messages=len(messages))
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        try:
            ids = engine.tokenizer.render_chat(messages, add_generation_prompt=body.add_generation_prompt,
                                               tools=tools)
        except MurmurError as err:
            raise api_error(err, {"prompt": "messages"}) from None
    out = {"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids, "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = [engine.tokenizer.tokenizer.id_to_token(i) for i in ids]  # vocabulary entries
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    """The text of token ids: {"prompt"}."""
    state = server_state(request)
    engine = state.require_engine(detailed=bool(state.access.keys))
    state.check_model(body.model)
    vocab = engine.model.settings.vocab_size
    if body.tokens and (min(body.tokens) < 0 or max(body.tokens) >= vocab):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
    return {"prompt": engine.tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    """The tokenizer's special tokens and chat template, as vLLM describes its tokenizer."""
    state = server_state(request)
    engine = state.require_engine(detailed=bool(state.access.keys))
    tokenizer = engine.tokenizer
    eos = tokenizer.decode([tokenizer.eos_id])
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": None, "pad_token": eos,
            "unk_token": None, "chat_template": tokenizer.chat_template or CHATML_TEMPLATE, "model_max_length":
            engine.max_seq_len, "vocab_size": tokenizer.vocab_size}
