"""A client that goes away — a timeout, a closed tab, the page's stop button — cancels its work at once.

One mechanism, `cancel_on_disconnect`: the work runs as a task beside a watcher of the connection; when
the client disconnects first, the task is cancelled and awaited, so its cleanup (aborting the engine
requests, which frees their KV-cache slots) runs before anything else. It guards a route handler through
the `with_cancellation` decorator (the model is vLLM's) and a streamed body through `EventStream`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

CLIENT_GONE = 499  # the status recorded for a request whose client left before its answer (nginx's)


class Disconnected:
    """What `cancel_on_disconnect` returns when the client left first."""


async def _until_disconnect(receive) -> None:
    """Return when the client has gone away (the body has been read, so only a disconnect can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(receive, work: Awaitable[Any]) -> Any:
    """`work`'s result, or `Disconnected` when the client left first (then `work` was cancelled and has
    finished its cleanup). `work`'s own errors propagate."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # its cleanup runs now, not whenever the loop gets to it
    if task.cancelled():
        return Disconnected
    return task.result()


def with_cancellation(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Run a route handler (which takes `request: Request`) unless its client disconnects first.

    FastAPI reads the handler's parameters through `functools.wraps`, so the decorated handler keeps them.
    """

    @functools.wraps(handler)
    async def guarded(*args, **kwargs):
        request: Request = kwargs["request"]  # FastAPI passes parameters by name
        result = await cancel_on_disconnect(request.receive, handler(*args, **kwargs))
        return Response(status_code=CLIENT_GONE) if result is Disconnected else result

    return guarded


class EventStream(StreamingResponse):
    """Server-sent events, stopped when the client disconnects; `on_close` runs however the stream ends
    (also when it never started), to release what the stream was reading from."""

    def __init__(self, events: AsyncIterable[bytes], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await cancel_on_disconnect(receive, self.stream_response(send))
        finally:
            self.on_close()
