"""The server: one FastAPI app over one `Engine`, built by `create_app`.

The routes live on four routers by concern: the OpenAI API (`routes_openai`, under /v1, behind API keys
and the rate limit), the tokenizer (`routes_tokens`: /tokenize, /detokenize, /tokenizer_info, likewise),
the pages (`routes_ui`: the chat page, its files, the run's report) and operations
(`routes_ops`: /health, /metrics). What the handlers share is the `ServerState` on `app.state.murmur`.
`ServerMiddleware` checks every request before a handler sees it; what it and the metrics need to know
about the routes (which answer beyond the connection cap, which take JSON, every route's label) is read
from these routers, so no list of routes is kept by hand.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.routing import Mount

from murmur.infer.engine import Engine
from murmur.serve import routes_assistant, routes_openai, routes_ops, routes_tokens, routes_ui
from murmur.serve.errors import install_error_handlers
from murmur.serve.metrics import Metrics, RouteLabels
from murmur.serve.middleware import AllowedHosts, ServerMiddleware
from murmur.serve.state import ServerState
from murmur.settings.serve import ServeSettings

ROUTERS = (routes_openai.router, routes_assistant.router, routes_tokens.router, routes_ui.router,
           routes_ops.router)


def path_templates(router: APIRouter) -> list[str]:
    """The path of every route of `router`, a mounted folder as `/ui/{path}`."""
    return [f"{route.path}/{{path}}" if isinstance(route, Mount) else route.path for route in router.routes]


def create_app(settings: ServeSettings | None = None, engine: Engine | None = None, model_name: str = "murmur",
               loader: Callable[[], Engine] | None = None, report_dir: Path | None = None,
               assistant=None) -> FastAPI:
    """The FastAPI app over `engine`, or over the engine `loader` builds in the background (503 until then);
    `assistant` (murmur.assistant.service.Assistant) grounds chat in a post index and answers mentions."""
    settings = settings or ServeSettings()
    if engine is None and loader is None:
        raise ValueError("create_app needs an engine or a loader")

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
    for router in ROUTERS:
        app.include_router(router)
    templates = [app.openapi_url, *(path for router in ROUTERS for path in path_templates(router))]
    metrics = Metrics(RouteLabels(templates, timed=routes_openai.PREFIX + "/"), model_name=model_name)
    state = ServerState(settings, model_name, engine, loader, report_dir, metrics)
    state.assistant = assistant
    app.state.murmur = state
    install_error_handlers(app)
    if settings.allowed_origins:  # inside ServerMiddleware: a preflight passes the Host check first
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(ServerMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s, max_connections=settings.max_connections,
                       allowed_hosts=AllowedHosts(settings.host, settings.allowed_hosts),
                       uncapped=set(path_templates(routes_ops.router)), json_prefix=routes_openai.PREFIX + "/")
    return app
