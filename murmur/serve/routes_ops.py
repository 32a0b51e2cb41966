"""What an operator or an orchestrator asks: GET /health (is the engine answering?) and GET /metrics.

Both answer without an API key and even beyond `serve.max_connections` open connections (ServerMiddleware
lets these paths through), since they are cheap and say what state the server is in.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from murmur.errors import MurmurError
from murmur.infer.engine import EngineBusy
from murmur.infer.sampling import SamplingParams
from murmur.serve.errors import api_error, unavailable
from murmur.serve.generation import Generation, Planned
from murmur.serve.state import server_state

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    """200 when the engine answers a one-token probe in time; 503 while loading, failed or stuck.
    Why it failed (paths, exception text) is told only to a request with a valid API key."""
    state = server_state(request)
    detailed = state.access.authenticated(request)
    engine = state.require_engine(detailed)
    if engine.is_stuck():
        raise unavailable(f"the engine has made no progress for {engine.stuck_after_s:.0f}s", "engine_stuck")
    probe = Planned([engine.tokenizer.eos_id], 0, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    try:
        generation = Generation(engine).submit([probe])
    except EngineBusy:  # a full queue is busy, not broken
        pass
    except MurmurError as err:  # shutting down
        raise api_error(err) from None
    else:
        try:
            [(_, final, _, _)] = await asyncio.wait_for(generation.collect(), timeout=state.settings.health_timeout_s)
        except TimeoutError:
            generation.abort()
            raise unavailable(f"the engine did not answer a one-token probe in "
                              f"{state.settings.health_timeout_s:g}s", "engine_stuck") from None
        if final.finish_reason == "error":
            reason = f": {final.error}" if detailed else "; the server's log says why"
            raise unavailable(f"the engine failed a probe{reason}", "engine_failed")
    return {"status": "ok", "model": state.model_name, "running": engine.num_running,
            "waiting": engine.num_waiting}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request):
    """Prometheus text: requests, tokens, latency histograms, queue depth, running batch size."""
    state = server_state(request)
    return PlainTextResponse(state.metrics.render(state.engine), media_type="text/plain; version=0.0.4")
