"""Compiling the decode step without making a server wait for it.

Compiling a 135M model's decode step takes minutes on a small CPU (most of it g++ building inductor's
kernels), so `Engine.warmup(background=True)` serves with the eager step at once and compiles in a
thread beside it; the compiled step replaces the eager one between two decode steps when it is ready.
The compiled artefacts (inductor's FX graph and AOTAutograd caches) are kept in a folder that survives
reboots, `~/.cache/murmur/inductor` (unless TORCHINDUCTOR_CACHE_DIR names another), so a second start
of the same model skips the C++ builds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from murmur.files import cache_dir

log = logging.getLogger("murmur.infer")


def inductor_cache_dir() -> Path:
    """Where Murmur keeps torch.compile's artefacts: $XDG_CACHE_HOME (else ~/.cache)/murmur/inductor."""
    return cache_dir("inductor")


def use_persistent_cache() -> str:
    """Point inductor's caches at `inductor_cache_dir()` unless TORCHINDUCTOR_CACHE_DIR is already set (its
    default is under /tmp, which many machines empty at boot); return the folder in use."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class BackgroundCompile:
    """Runs `compile_fn` (which compiles by calling the step) in a daemon thread, then `swap()`.

    status: "compiling", then "compiled" or "failed: ..." (the engine then keeps serving eagerly).
    """

    def __init__(self, compile_fn: Callable[[], None], swap: Callable[[], None]):
        self.status = "compiling"
        self.seconds: float | None = None
        self._compile_fn, self._swap = compile_fn, swap
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="murmur-compile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self._compile_fn()
            self._swap()
            self.status = "compiled"
        except Exception as err:  # noqa: BLE001 - any failure leaves the eager step serving, which is correct
            log.exception("compiling the decode step failed; serving with the eager step")
            self.status = f"failed: {type(err).__name__}: {err}"
        self.seconds = time.monotonic() - started
        log.info("decode step %s after %.1f s in the background", self.status, self.seconds)
        self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the compilation ended (compiled or failed); False when `timeout` ran out first."""
        return self._done.wait(timeout)
