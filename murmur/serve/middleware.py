"""ASGI middleware of the server: refuse oversized bodies (413), read /v1 bodies as JSON, count requests.

Written as plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed
responses and hide client disconnects from the handlers.
"""

from __future__ import annotations

import json
import time

ROUTES = {"/", "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/report",
          "/openapi.json", "/docs"}
DRAIN_FACTOR = 64  # read at most this many times the limit of an oversized body before answering


def route_label(path: str) -> str:
    """The path as a metrics label, with unknown paths folded so that scanners cannot explode the series."""
    if path in ROUTES:
        return path
    for prefix in ("/ui/", "/report/"):
        if path.startswith(prefix):
            return prefix + "*"
    return "other"


def json_content_type(scope):
    """The API's bodies are JSON whatever the client declared (`curl -d` sends a form content type)."""
    headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


class ServerMiddleware:
    """Body-size limit and request metrics around the whole app."""

    def __init__(self, app, metrics, max_body_bytes: int):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if scope.get("method") == "POST" and scope.get("path", "").startswith("/v1/"):
            scope = json_content_type(scope)
        try:
            receive = await self._limited_body(scope, receive)
            if receive is None:
                await self._too_large(send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.observe_request(scope.get("method", ""), route_label(scope.get("path", "")), status["code"],
                                         time.monotonic() - start)

    async def _limited_body(self, scope, receive):
        """A receive that replays the body when it is within the limit; None when it is not."""
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_body_bytes
        except ValueError:
            too_big = False
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                pending = [message]
                break
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                too_big = True
            if not too_big:
                chunks.append(message.get("body", b""))
            if not message.get("more_body") or size > DRAIN_FACTOR * self.max_body_bytes:
                pending = []
                break
        if too_big:
            return None
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            if pending:
                return pending.pop()
            return await receive()

        return replay

    async def _too_large(self, send):
        body = json.dumps({"error": {
            "message": f"The request body is larger than this server's limit of {self.max_body_bytes} bytes.",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
