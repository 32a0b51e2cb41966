"""What the route handlers share, kept on `app.state.murmur`: the engine (None while it loads), the settings,
access control, metrics and the report folder. Handlers fetch it with `server_state(request)`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from murmur.infer.engine import Engine
from murmur.serve.access import Access
from murmur.serve.errors import APIError, unavailable
from murmur.serve.metrics import Metrics
from murmur.settings.serve import ServeSettings

log = logging.getLogger("murmur.serve")


class ServerState:
    """The engine (None while loading), settings, access, metrics; `load` builds the engine with `loader`."""

    def __init__(self, settings: ServeSettings, model_name: str, engine: Engine | None,
                 loader: Callable[[], Engine] | None, report_dir: Path | None, metrics: Metrics):
        self.settings = settings
        self.model_name = model_name
        self.engine = engine
        self.loader = loader
        self.load_error: str | None = None
        self.report_dir = report_dir
        self.access = Access(settings.api_keys, settings.rate_limit_per_minute, settings.rate_limit_max_clients)
        self.metrics = metrics
        self.created = int(time.time())
        self.assistant = None  # murmur.assistant.service.Assistant: the post index chat is grounded in, or None
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

    def require_engine(self, detailed: bool = False) -> Engine:
        """The engine, or 503. Why it failed to load (paths, exception text) is told to `detailed` callers only."""
        if self.engine is None:
            if self.load_error is None:
                raise unavailable("the model is still loading; retry in a few seconds", "model_loading")
            reason = (f": {self.load_error}" if detailed
                      else "; the server's log says why (so does /health, asked with an API key)")
            raise unavailable(f"the model failed to load{reason}", "model_failed")
        return self.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}' "
                                "(see GET /v1/models)", param="model", code="model_not_found")


def server_state(request: Request) -> ServerState:
    return request.app.state.murmur


def authorize(request: Request) -> None:
    """The dependency of the API routes: a valid key when keys are configured, within the rate limit."""
    server_state(request).access.authorize(request)
