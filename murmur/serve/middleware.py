"""ASGI middleware of the server: what every request passes before a handler sees it, and what every
page carries on its way out.

In order: the Host header is one this server answers to (421; a web page that rebinds its own DNS name
to 127.0.0.1 sends its own name); beyond `max_connections` open connections only the `uncapped` paths
(/health and /metrics) are served (503); bodies sent to the API (`json_prefix`, /v1/) are declared JSON
(415; the content types a page may send cross-origin without asking are all refused); a body is within
`max_body_bytes` (413) and arrives within `body_timeout_s` (408). Every HTML response gets the page security headers. Requests are counted.

Written as plain ASGI rather than Starlette's BaseHTTPMiddleware, which would buffer streamed
responses and hide client disconnects from the handlers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Collection

from murmur.serve.connections import OPEN_CONNECTIONS
from murmur.serve.errors import APIError

DRAIN_FACTOR = 64  # read at most this many times the limit of an oversized body before answering
BODY_METHODS = {"POST", "PUT", "PATCH"}
# Pages load scripts and styles from this server only, and no other site may frame them: model output
# can never run code, and no page can be overlaid by another to trick a click.
PAGE_SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                 b"base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
]


def host_name(header: str) -> str:
    """The name or address of a Host header, without port, brackets or trailing dot, lower-cased."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    name, colon, port = value.rpartition(":")
    if colon and ":" not in name and port.isascii() and port.isdigit():
        value = name
    return value.rstrip(".")


class AllowedHosts:
    """Host names a browser may have used to reach this server, so that DNS rebinding cannot.

    Always allowed: address literals (a rebinding attack needs a name), `localhost` and `*.localhost`
    (browsers resolve those to loopback themselves), and the bind address. `--allowed-hosts` adds names;
    `*` allows any.
    """

    def __init__(self, bind_host: str, allowed: list[str]):
        self.any = "*" in allowed
        self.names = {host_name(name) for name in allowed} | {"localhost", host_name(bind_host)}

    def allows(self, header: str | None) -> bool:
        if self.any or header is None:  # no Host at all: HTTP/1.0, which no browser sends
            return True
        name = host_name(header)
        if name in self.names or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def is_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def with_page_headers(message):
    """An HTML response's start message with the page security headers it does not already have."""
    headers = list(message.get("headers") or [])
    content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
    if not content_type.lower().startswith(b"text/html"):
        return message
    present = {k.lower() for k, _ in headers}
    return {**message, "headers": headers + [(k, v) for k, v in PAGE_SECURITY_HEADERS if k not in present]}


async def send_error(send, err: APIError, headers: list[tuple[bytes, bytes]] = ()):
    """A refusal in OpenAI's error shape, sent as raw ASGI."""
    body = err.response().body
    await send({"type": "http.response.start", "status": err.status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class ServerMiddleware:
    """Host, connection, content-type, body-size and body-time checks, page headers and request metrics."""

    def __init__(self, app, metrics, *, max_body_bytes: int, body_timeout_s: float, max_connections: int,
                 allowed_hosts: AllowedHosts, uncapped: Collection[str], json_prefix: str):
        self.app = app
        self.uncapped = uncapped  # answered even beyond max_connections: cheap, and they tell the state
        self.json_prefix = json_prefix
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = {"code": 500}

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = with_page_headers(message)
            await send(message)

        try:
            await self._checked(scope, receive, send_counted)
        finally:
            self.metrics.observe_request(scope.get("method", ""), scope.get("path", ""), status["code"],
                                         time.monotonic() - start)

    async def _checked(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        method, path = scope.get("method"), scope.get("path", "")
        host = headers.get(b"host")
        if not self.allowed_hosts.allows(None if host is None else host.decode("latin-1")):
            shown = host.decode("latin-1")[:100]
            await send_error(send, APIError(
                421, f"This server does not answer to the Host {shown!r}. If that is how clients reach it, start it "
                     "with --allowed-hosts NAME (this check keeps web pages from reaching a local server through DNS "
                     "rebinding).", code="invalid_host"))
            return
        if scope.get(OPEN_CONNECTIONS, 0) > self.max_connections and path not in self.uncapped:
            await send_error(send, APIError(503, f"The server has more than {self.max_connections} open connections; "
                                                 "retry shortly.", type="service_unavailable",
                                            code="too_many_connections"),
                             [(b"connection", b"close"), (b"retry-after", b"1")])
            return
        if method in BODY_METHODS and path.startswith(self.json_prefix) and not is_json(headers.get(b"content-type")):
            declared = (headers.get(b"content-type") or b"none").decode("latin-1")[:100]
            await send_error(send, APIError(
                415, f"The request body must be JSON sent with 'Content-Type: application/json' (this request "
                     f"declared {declared!r}); with curl, add -H 'Content-Type: application/json'.",
                code="unsupported_media_type"))
            return
        if method in BODY_METHODS:
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    receive = await self._limited_body(headers, receive)
            except TimeoutError:
                await send_error(send, APIError(408, f"The request body did not arrive within "
                                                     f"{self.body_timeout_s:g} seconds.", code="request_timeout"),
                                 [(b"connection", b"close")])
                return
            if receive is None:
                await send_error(send, APIError(413, f"The request body is larger than this server's limit of "
                                                     f"{self.max_body_bytes} bytes.", code="request_too_large"))
                return
        await self.app(scope, receive, send)

    async def _limited_body(self, headers, receive):
        """A receive that replays the body when it is within the limit; None when it is not."""
        declared = headers.get(b"content-length")
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
