"""The OpenAI-compatible HTTP API and the web chat page, over one `Engine`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics,
GET / (chat page), GET /report (the evaluation report of a run folder, when there is one).

Every request is validated, and its generation submitted to the engine, before the first byte of
the response is sent, so all refusals carry a proper status in OpenAI's error shape. The work a
request asks for (prompts, choices, characters, reply tokens) is checked against the settings before
any of it is done. A client that disconnects (or presses stop in the page) aborts its requests in the
engine at once.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from murmur.errors import MurmurError
from murmur.infer.engine import Engine, EngineBusy, EngineClosed, StepOutput
from murmur.infer.sampling import SamplingParams
from murmur.serve.metrics import Metrics
from murmur.serve.middleware import AllowedHosts, ServerMiddleware
from murmur.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from murmur.settings.serve import ServeSettings

log = logging.getLogger("murmur.serve")

UI_DIR = Path(__file__).parent / "ui"
# ServerMiddleware adds the Content-Security-Policy every HTML response carries.
PAGE_HEADERS = {"Cache-Control": "no-cache"}
REPORT_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.(png|md)$")
MAX_REPORT_FILE_BYTES = 50_000_000


class APIError(Exception):
    """A refusal sent as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class RateLimiter:
    """At most `per_minute` requests in any sliding 60-second window, per key.

    Keys are client addresses or valid API keys, never anything a caller can make up. The table holds
    at most `max_keys`: keys idle for a minute are dropped, and beyond that the least recently seen.
    """

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.max_keys = max_keys
        self.clock = clock
        self.windows: OrderedDict[str, deque[float]] = OrderedDict()  # least recently seen first
        self.lock = threading.Lock()

    @staticmethod
    def client_key(host: str) -> str:
        """The key of a client address: the address, or its /64 network for IPv6 (which one host may own)."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host
        if address.version == 6:
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)

    def allow(self, key: str) -> bool:
        if self.per_minute <= 0:
            return True
        now = self.clock()
        with self.lock:
            while self.windows:  # forget keys idle for a whole window
                oldest = next(iter(self.windows.values()))
                if oldest and now - oldest[-1] <= self.WINDOW_S:
                    break
                self.windows.popitem(last=False)
            window = self.windows.pop(key, None) or deque()
            self.windows[key] = window
            while window and now - window[0] > self.WINDOW_S:
                window.popleft()
            while len(self.windows) > self.max_keys:
                self.windows.popitem(last=False)
            if len(window) >= self.per_minute:
                return False
            window.append(now)
            return True


class ServerState:
    """What the handlers share: the engine (None while loading), settings, keys, limits, metrics."""

    def __init__(self, settings: ServeSettings, model_name: str, engine: Engine | None,
                 loader: Callable[[], Engine] | None, report_dir: Path | None):
        self.settings = settings
        self.model_name = model_name
        self.engine = engine
        self.loader = loader
        self.load_error: str | None = None
        self.report_dir = report_dir
        self.keys = [key.encode() for key in dict.fromkeys(settings.api_keys)]
        self.limiter = RateLimiter(settings.rate_limit_per_minute, max_keys=settings.rate_limit_max_clients)
        self.metrics = Metrics()
        self.created = int(time.time())
        if engine is not None:
            self._attach(engine)

    def _attach(self, engine: Engine) -> None:
        engine.on_finish = self.metrics.observe_generation
        engine.start()
        self.engine = engine

    def load(self) -> None:
        try:
            self._attach(self.loader())
        except Exception as err:  # noqa: BLE001 - reported by /health and every request
            self.load_error = f"{type(err).__name__}: {err}"
            log.error("the model failed to load: %s", self.load_error)

    def valid_key(self, key: str) -> bool:
        """Whether `key` is a configured API key; every key is compared, each in constant time."""
        given = key.encode()
        matches = [hmac.compare_digest(known, given) for known in self.keys]
        return any(matches)

    def authenticated(self, request: Request) -> bool:
        """Whether the request carries a valid API key (never true on a server without keys)."""
        return bool(self.keys) and self.valid_key(bearer_key(request))

    def require_engine(self, detailed: bool = False) -> Engine:
        """The engine, or 503. Why it failed to load (paths, exception text) is told to `detailed` callers only."""
        if self.engine is None:
            if self.load_error is None:
                raise APIError(503, "the model is still loading; retry in a few seconds",
                               type="service_unavailable", code="model_loading")
            reason = (f": {self.load_error}" if detailed
                      else "; the server's log says why (so does /health, asked with an API key)")
            raise APIError(503, f"the model failed to load{reason}", type="service_unavailable",
                           code="model_failed")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")


def bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


# ---- checks of a request's body, before any work -----------------------------------------------

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


def read_report_file(report_dir: Path, name: str) -> bytes | None:
    """The bytes of report file `name`: a regular file directly in `report_dir`, not a link, folder or pipe."""
    if not REPORT_FILE.match(name):
        return None
    try:
        fd = os.open(report_dir / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_REPORT_FILE_BYTES:
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as file:
        return file.read(MAX_REPORT_FILE_BYTES)


# ---- conversions between API bodies and engine calls -------------------------------------------

def sampling_params(body: SamplingFields, max_tokens: int | None, default_max_tokens: int | None, seed_offset: int,
                    logprobs: bool, top_logprobs: int) -> SamplingParams:
    """Engine sampling parameters for choice number `seed_offset` of a request."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0:  # the smallest possible nucleus: the most likely token
        temperature, top_p = 0.0, 1.0
    seed = None if body.seed is None else body.seed + seed_offset
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
                          repetition_penalty=body.repetition_penalty or 1.0, seed=seed,
                          max_tokens=max_tokens or default_max_tokens, stop=stop, ignore_eos=body.ignore_eos,
                          logprobs=logprobs, top_logprobs=top_logprobs)


def check_lengths(engine: Engine, prompt_len: int, max_tokens: int | None, prompt_param: str,
                  max_param: str) -> int | None:
    """Refuse a prompt too long for the context, or a max_tokens that cannot fit; return max_tokens to use."""
    context = engine.max_seq_len
    if prompt_len == 0:
        raise APIError(400, "the prompt is empty; send some text", param=prompt_param)
    if prompt_len >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, your prompt has "
                            f"{prompt_len} tokens (at least one must be left for the reply). Please shorten it.",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and prompt_len + max_tokens > context:
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                            f"completion). Please reduce the prompt or {max_param}.",
                       param=max_param, code="context_length_exceeded")
    return max_tokens


class Generation:
    """The engine requests behind one HTTP request (one per choice), read as an async stream."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue()
        self.request_ids: list[str] = []
        self.unfinished: set[int] = set()

    def _sink(self, index: int) -> Callable[[StepOutput], None]:
        def put(out: StepOutput) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass
        return put

    def submit(self, prompts: list[tuple[list[int], int]], params: list[SamplingParams]) -> None:
        """Submit every choice, or none: a refusal part-way aborts what was already queued."""
        try:
            for index, ((ids, prefix_len), p) in enumerate(zip(prompts, params)):
                self.request_ids.append(self.engine.submit(ids, p, self._sink(index), prefix_len=prefix_len))
                self.unfinished.add(index)
        except EngineBusy as err:
            self.abort()
            raise APIError(429, str(err), type="rate_limit_exceeded", code="queue_full") from None
        except EngineClosed as err:
            self.abort()
            raise APIError(503, str(err), type="service_unavailable", code="shutting_down") from None
        except MurmurError as err:
            self.abort()
            raise APIError(400, str(err)) from None

    def abort(self) -> None:
        for index in list(self.unfinished):
            self.engine.abort(self.request_ids[index])
        self.unfinished.clear()

    async def events(self) -> AsyncIterator[tuple[int, StepOutput]]:
        while self.unfinished:
            index, out = await self.queue.get()
            if out.finished:
                self.unfinished.discard(index)
            yield index, out


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client has gone away (the body was already read, so only disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, generation: Generation, work) -> Any:
    """Await `work` unless the client disconnects first, in which case abort the generation."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        generation.abort()
        task.cancel()
        return None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            generation.abort()


def failure_of(out: StepOutput) -> APIError | None:
    """The error to report for an output that ended without a reply."""
    if out.finish_reason == "error":
        return APIError(500, out.error or "generation failed", type="server_error", code="generation_failed")
    if out.finish_reason == "abort":
        return APIError(503, "the request was cancelled because the server is shutting down",
                        type="service_unavailable", code="cancelled")
    return None


def sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def chat_logprobs(engine: Engine, choices) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = engine.tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in (c.top or [])]}
                        for c in choices], "refusal": None}


def completion_logprobs(engine: Engine, choices, offset: int) -> dict[str, Any]:
    tokens = [engine.tokenizer.decode([c.token]) for c in choices]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": [c.logprob for c in choices],
            "top_logprobs": [{engine.tokenizer.decode([t]): lp for t, lp in (c.top or [])} for c in choices],
            "text_offset": offsets}


# ---- the app -----------------------------------------------------------------------------------

def create_app(settings: ServeSettings | None = None, engine: Engine | None = None, model_name: str = "murmur",
               loader: Callable[[], Engine] | None = None, report_dir: Path | None = None) -> FastAPI:
    """The FastAPI app over `engine`, or over the engine `loader` builds in the background (503 until then)."""
    settings = settings or ServeSettings()
    if engine is None and loader is None:
        raise ValueError("create_app needs an engine or a loader")
    state = ServerState(settings, model_name, engine, loader, report_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=state.load, name="murmur-load", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, 0.0)

    # No /docs or /redoc: their pages run inline scripts from a CDN, which the pages' CSP forbids.
    app = FastAPI(title="Murmur", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat and text completions over a Murmur model.")
    app.state.murmur = state
    if settings.allowed_origins:  # inside ServerMiddleware: a preflight passes the Host check first
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(ServerMiddleware, metrics=state.metrics, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s, max_connections=settings.max_connections,
                       allowed_hosts=AllowedHosts(settings.host, settings.allowed_hosts))

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError):
        problems = err.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "We could not parse the JSON body of your request: it is not valid JSON.").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                            for e in problems[:5])
        return APIError(400, f"Invalid request: {message}", param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, err: Exception):
        return APIError(500, f"internal error: {type(err).__name__}", type="server_error").response()

    def limit(who: str) -> None:
        if not state.limiter.allow(who):
            raise APIError(429, f"Rate limit reached: {state.limiter.per_minute} requests per minute. Retry later.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded")

    async def authorize(request: Request) -> None:
        """401 without a valid key (when keys are configured); 429 over the rate limit.

        The limit is kept per valid key, or per client address: never per a value the caller made up,
        which would let each made-up value start a fresh allowance. Wrong keys count against the address.
        """
        address = RateLimiter.client_key(request.client.host if request.client else "unknown")
        if not state.keys:
            limit(address)
            return
        key = bearer_key(request)
        if not state.valid_key(key):
            limit(address)
            what = "a wrong API key was given" if key else "no API key was given"
            raise APIError(401, f"Incorrect API key: {what}. Send 'Authorization: Bearer YOUR_KEY'.",
                           code="invalid_api_key")
        limit(f"key:{key}")

    def begin(body: ChatCompletionRequest | CompletionRequest) -> Engine:
        """The checks both generation routes make first; returns the engine to generate with."""
        check_text(body)
        engine = state.require_engine(detailed=bool(state.keys))  # with keys, `authorize` let only key holders in
        state.check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        return engine

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        """The one model this server serves."""
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "murmur",
                                            "max_model_len": state.engine.max_seq_len if state.engine else None}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Answer a conversation as the assistant (OpenAI's Chat Completions)."""
        engine = begin(body)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        from murmur.tokenizer import message_text

        messages = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(
            [p.model_dump() for p in m.content] if isinstance(m.content, list) else m.content)}
            for m in body.messages]
        max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        check_work(state.settings, prompts=1, n=body.n, chars=sum(len(m["content"]) for m in messages),
                   max_tokens=body.max_completion_tokens or body.max_tokens, prompt_param="messages",
                   max_param=max_param, messages=len(messages))
        try:
            ids, prefix_len = engine.encode_prompt(messages)
        except MurmurError as err:
            raise APIError(400, str(err), param="messages") from None
        max_tokens = check_lengths(engine, len(ids), body.max_completion_tokens or body.max_tokens,
                                   "messages", max_param)
        default_max = _default_max(engine, len(ids), state.settings)
        params = [sampling_params(body, max_tokens, default_max, i, body.logprobs, body.top_logprobs or 0)
                  for i in range(body.n)]
        generation = Generation(engine)
        generation.submit([(ids, prefix_len)] * body.n, params)
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": reply_id, "created": int(time.time()), "model": state.model_name, "system_fingerprint": None}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(request, generation, _chat_chunks(engine, generation, head, body.n, len(ids),
                                                                     body.logprobs, usage))
        result = await run_until_disconnect(request, generation, _collect(generation, body.n))
        if result is None:
            return Response(status_code=499)
        choices, completion_tokens = _choices(result, lambda index, text, final, logprob_choices: {
            "index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": chat_logprobs(engine, logprob_choices) if body.logprobs else None,
            "finish_reason": final.finish_reason})
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": _usage(len(ids), completion_tokens)}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        """Continue text (OpenAI's legacy Completions): a prompt, several prompts, or token ids."""
        engine = begin(body)
        prompts = body.prompt
        token_ids = isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        texts = [] if token_ids else [prompts] if isinstance(prompts, str) else prompts
        check_work(state.settings, prompts=1 if token_ids else len(texts), n=body.n,
                   chars=sum(len(t) for t in texts), max_tokens=body.max_tokens, prompt_param="prompt",
                   max_param="max_tokens")
        if token_ids:
            vocab = engine.model.settings.vocab_size
            if any(not 0 <= t < vocab for t in prompts):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            encoded = [list(prompts)]
        else:
            if not texts:
                raise APIError(400, "prompt is an empty list; send at least one prompt", param="prompt")
            encoded = [engine.tokenizer.encode(t) for t in texts]
        requested = []
        for ids in encoded:
            max_tokens = check_lengths(engine, len(ids), body.max_tokens, "prompt", "max_tokens")
            want = body.logprobs is not None
            default_max = _default_max(engine, len(ids), state.settings)
            for i in range(body.n):
                requested.append(((ids, 0), sampling_params(body, max_tokens, default_max, i, want,
                                                            body.logprobs or 0)))
        generation = Generation(engine)
        generation.submit([r[0] for r in requested], [r[1] for r in requested])
        prompt_tokens = sum(len(ids) for ids in encoded)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name,
                "system_fingerprint": None}
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream_response(request, generation, _completion_chunks(
                engine, generation, head, len(requested), prompt_tokens, body.logprobs is not None, usage))
        result = await run_until_disconnect(request, generation, _collect(generation, len(requested)))
        if result is None:
            return Response(status_code=499)
        choices, completion_tokens = _choices(result, lambda index, text, final, logprob_choices: {
            "index": index, "text": text, "finish_reason": final.finish_reason,
            "logprobs": completion_logprobs(engine, logprob_choices, 0) if body.logprobs is not None else None})
        return {**head, "object": "text_completion", "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)}

    @app.get("/health")
    async def health(request: Request):
        """200 when the engine answers a one-token probe in time; 503 while loading, failed or stuck.
        Why it failed (paths, exception text) is told only to a request with a valid API key."""
        detailed = state.authenticated(request)
        engine = state.require_engine(detailed)
        if engine.is_stuck():
            raise APIError(503, f"the engine has made no progress for {engine.stuck_after_s:.0f}s",
                           type="service_unavailable", code="engine_stuck")
        generation = Generation(engine)
        probe = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        try:
            generation.submit([([engine.tokenizer.eos_id], 0)], [probe])
        except APIError as err:
            if err.status != 429:  # a full queue is busy, not broken
                raise
        else:
            try:
                result = await asyncio.wait_for(_collect(generation, 1), timeout=state.settings.health_timeout_s)
            except TimeoutError:
                generation.abort()
                raise APIError(503, f"the engine did not answer a one-token probe in "
                                    f"{state.settings.health_timeout_s:g}s", type="service_unavailable",
                               code="engine_stuck") from None
            if result[0][1].finish_reason == "error":
                reason = f": {result[0][1].error}" if detailed else "; the server's log says why"
                raise APIError(503, f"the engine failed a probe{reason}", type="service_unavailable",
                               code="engine_failed")
        return {"status": "ok", "model": state.model_name, "running": engine.num_running,
                "waiting": engine.num_waiting}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        """Prometheus text: requests, tokens, latency histograms, queue depth, running batch size."""
        return PlainTextResponse(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(UI_DIR / "index.html", headers=PAGE_HEADERS)

    @app.api_route("/report", methods=["GET", "HEAD"], include_in_schema=False)
    async def report_page():
        report = state.report_dir / "report.md" if state.report_dir is not None else None
        if report is None or not report.exists() or not stat.S_ISREG(report.lstat().st_mode):
            raise APIError(404, "no report here: serve a run folder after `murmur eval` wrote report/report.md",
                           type="not_found")
        return FileResponse(UI_DIR / "report.html", headers=PAGE_HEADERS)

    @app.get("/report/{name}", include_in_schema=False)
    async def report_file(name: str):
        content = read_report_file(state.report_dir, name) if state.report_dir is not None else None
        if content is None:
            raise APIError(404, f"report file {name[:100]!r} not found", type="not_found")
        media = "image/png" if name.endswith(".png") else "text/plain; charset=utf-8"
        return Response(content, media_type=media, headers={"X-Content-Type-Options": "nosniff"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
    return app


def _default_max(engine: Engine, prompt_len: int, settings: ServeSettings) -> int:
    """Reply length for a request that gives none: the configured default, capped by the room left and by
    the most any request may ask for."""
    room = min(engine.max_seq_len - prompt_len, settings.max_reply_tokens)
    return min(settings.default_max_tokens, room) if settings.default_max_tokens else room


def _choices(result, make_choice) -> tuple[list[dict], int]:
    """The choices of a finished non-streamed generation and its completion-token total; raises its error."""
    choices, completion_tokens = [], 0
    for index, (text, final, logprob_choices) in enumerate(result):
        error = failure_of(final)
        if error:
            raise error
        completion_tokens += final.completion_tokens
        choices.append(make_choice(index, text, final, logprob_choices))
    return choices, completion_tokens


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _collect(generation: Generation, n: int) -> list[tuple[str, StepOutput, list]]:
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list] = [[] for _ in range(n)]
    finals: list[StepOutput | None] = [None] * n
    async for index, out in generation.events():
        texts[index].append(out.text)
        logprobs[index].extend(out.logprobs)
        if out.finished:
            finals[index] = out
    return [("".join(t), f, lp) for t, f, lp in zip(texts, finals, logprobs)]


def stream_response(request: Request, generation: Generation, chunks: AsyncIterator[bytes]) -> StreamingResponse:
    """Server-sent events; the engine requests are aborted when the client goes away mid-stream."""

    async def body() -> AsyncIterator[bytes]:
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            iterator = chunks.__aiter__()
            while True:
                step = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    step.cancel()
                    return
                try:
                    yield step.result()
                except StopAsyncIteration:
                    return
        finally:
            watcher.cancel()
            generation.abort()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _event_stream(generation: Generation, head: dict, object_name: str, prompt_tokens: int, usage: bool,
                        render, opening: tuple[bytes, ...] = ()) -> AsyncIterator[bytes]:
    """The SSE body of a streamed request: `opening` chunks, then `render(index, out)`'s chunks for each engine
    event, the usage chunk when asked, and `[DONE]`. A failure becomes an error event, then `[DONE]`."""
    for chunk in opening:
        yield chunk
    completion_tokens = 0
    async for index, out in generation.events():
        error = failure_of(out) if out.finished else None
        if error:
            generation.abort()
            yield sse(error.body())
            yield sse("[DONE]")
            return
        for chunk in render(index, out):
            yield chunk
        if out.finished:
            completion_tokens += out.completion_tokens
    if usage:
        yield sse({**head, "object": object_name, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield sse("[DONE]")


def _chat_chunks(engine: Engine, generation: Generation, head: dict, n: int, prompt_tokens: int,
                 logprobs: bool, usage: bool) -> AsyncIterator[bytes]:
    extra = {"usage": None} if usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, lp=None) -> bytes:
        return sse({**head, "object": "chat.completion.chunk", "choices": [
            {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}], **extra})

    def render(index: int, out) -> list[bytes]:
        lp = chat_logprobs(engine, out.logprobs) if logprobs and out.logprobs else None
        chunks = [chunk(index, {"content": out.text}, lp=lp)] if out.text or lp else []
        if out.finished:
            chunks.append(chunk(index, {}, out.finish_reason))
        return chunks

    opening = tuple(chunk(index, {"role": "assistant", "content": ""}) for index in range(n))
    return _event_stream(generation, head, "chat.completion.chunk", prompt_tokens, usage, render, opening)


def _completion_chunks(engine: Engine, generation: Generation, head: dict, n: int, prompt_tokens: int,
                       logprobs: bool, usage: bool) -> AsyncIterator[bytes]:
    extra = {"usage": None} if usage else {}
    offsets = [0] * n  # characters streamed so far per choice: logprobs' text offsets count from the start

    def render(index: int, out) -> list[bytes]:
        lp = completion_logprobs(engine, out.logprobs, offsets[index]) if logprobs and out.logprobs else None
        offsets[index] += len(out.text)
        if not (out.text or lp or out.finished):
            return []
        return [sse({**head, "object": "text_completion", "choices": [
            {"index": index, "text": out.text, "logprobs": lp,
             "finish_reason": out.finish_reason if out.finished else None}], **extra})]

    return _event_stream(generation, head, "text_completion", prompt_tokens, usage, render)
