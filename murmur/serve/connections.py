"""uvicorn configured from the serve settings, with the connection guard uvicorn lacks.

uvicorn closes idle keep-alive connections, but a connection that sends its request headers a byte
at a time (a slowloris), or nothing at all, stays open forever. `GuardedH11Protocol` gives every
connection `header_timeout_s` to deliver a request's complete headers, counted from when it opened or
from its previous response, and closes it otherwise. It also tells the app how many connections are
open, so that `ServerMiddleware` can refuse work beyond `max_connections` while `/health` still answers
(uvicorn's own `limit_concurrency` would refuse `/health` too, in plain text).
"""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from murmur.settings.serve import ServeSettings

OPEN_CONNECTIONS = "murmur.open_connections"  # the scope key the protocol sets for ServerMiddleware


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers."""

    header_timeout_s = 10.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_deadline: asyncio.TimerHandle | None = None
        app = self.app

        async def counted(scope, receive, send):
            await app({**scope, OPEN_CONNECTIONS: len(self.connections)}, receive, send)

        self.app = counted

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
        self.header_deadline = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        self.header_deadline = None
        # IDLE: no complete request headers since the deadline was armed (a request being read or answered
        # has moved h11 past IDLE, and its body has a deadline of its own in ServerMiddleware).
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app, settings: ServeSettings, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration `murmur serve` runs `app` with."""
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": settings.header_timeout_s})
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, http=protocol,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        # X-Forwarded-For is believed only from configured proxies: anyone else could mint client addresses.
        proxy_headers=bool(settings.trusted_proxies), forwarded_allow_ips=settings.trusted_proxies or None)
