"""Refusals in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, and where they come from.

`APIError` is a refusal with its HTTP status. `api_error` maps what the engine raises (a full queue, a
shutdown, a prompt it cannot serve) to one, keeping the engine's own words, which are written for the caller;
`failure_of` does the same for a generation that ended without a reply. `install_error_handlers` makes every
other failure FastAPI or Starlette meets (bad JSON, a wrong type, an unknown route, a crash) come out in the
same shape.

A failure (a 500) says only that it failed and a request id: its details (an exception's text, which can hold
paths, settings or another request's data) go to the server's log under that id, never to the caller.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from murmur.errors import MurmurError, RequestError
from murmur.infer.engine import EngineBusy, EngineClosed, StepOutput

log = logging.getLogger("murmur.serve")


class APIError(Exception):
    """A refusal sent as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def unavailable(message: str, code: str) -> APIError:
    """A 503: the server cannot work now (loading, failed, stuck, shutting down)."""
    return APIError(503, message, type="service_unavailable", code=code)


def api_error(err: MurmurError, fields: Mapping[str, str] = {}) -> APIError:
    """The refusal for an engine error. A RequestError keeps its message and code; its param (the engine's
    name, "prompt" or "max_tokens") becomes the request's field through `fields` (e.g. "prompt" -> "messages")."""
    if isinstance(err, EngineBusy):
        return APIError(429, str(err), type="rate_limit_exceeded", code="queue_full")
    if isinstance(err, EngineClosed):
        return unavailable(str(err), "shutting_down")
    if isinstance(err, RequestError):
        return APIError(400, str(err), param=fields.get(err.param, err.param), code=err.code)
    return APIError(400, str(err), code="invalid_value")


def failure_of(out: StepOutput, request_id: str) -> APIError | None:
    """The error to report for an engine output that ended without a reply, or None. The engine's reason is
    logged under `request_id`; the caller is told the id, not the reason."""
    if out.finish_reason == "error":
        log.error("request %s: %s", request_id, out.error or "generation failed")
        return APIError(500, f"generation failed; the server's log has the details under request id {request_id}",
                        type="server_error", code="generation_failed")
    if out.finish_reason == "abort":
        return unavailable("the request was cancelled because the server is shutting down", "cancelled")
    return None


def unknown_field(loc: list[str]) -> APIError:
    """The refusal of a field Murmur does not implement: never ignored, since a client that asked for it
    (JSON output, a penalty) would otherwise get something else with status 200."""
    from murmur.serve.schemas import UNSUPPORTED

    param = ".".join(loc)
    name = loc[-1] if loc else param
    if len(loc) == 1 and name in UNSUPPORTED:
        return APIError(400, f"{name} is an OpenAI parameter this server does not support ({UNSUPPORTED[name]}); "
                             "remove it from the request. docs/serve.md lists the supported parameters.",
                        param=param, code="unsupported_parameter")
    return APIError(400, f"Unrecognized request argument supplied: {param[:100]}. Remove it; docs/serve.md lists "
                         "the parameters this server takes.", param=param[:100], code="unsupported_parameter")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every failure in OpenAI's error shape."""

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
        unknown = next((e for e in problems if e.get("type") == "extra_forbidden"), None)
        if unknown is not None:
            return unknown_field([str(p) for p in unknown.get("loc", ()) if p != "body"]).response()
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                            for e in problems[:5])
        return APIError(400, f"Invalid request: {message}", param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type=kind).response(getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, err: Exception):
        request_id = f"err-{uuid.uuid4().hex}"
        log.error("request %s (%s %s) failed", request_id, request.method, request.url.path,
                  exc_info=(type(err), err, err.__traceback__))
        return APIError(500, f"internal error; the server's log has the details under request id {request_id}",
                        type="server_error").response()
