"""Who may call the API, and how often: API keys and the per-client rate limit.

Keys are compared in constant time, every configured key each time. The rate limit is kept per valid
key, or per client address: never per a value the caller made up, which would let each made-up value
start a fresh allowance. Wrong keys count against the address, so keys cannot be guessed at full speed.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from fastapi import Request

from murmur.serve.errors import APIError


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


def bearer_key(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


class Access:
    """The configured API keys (none = an open API) and the rate limiter."""

    def __init__(self, api_keys: list[str], per_minute: int, max_clients: int):
        self.keys = [key.encode() for key in dict.fromkeys(api_keys)]
        self.limiter = RateLimiter(per_minute, max_keys=max_clients)

    def valid_key(self, key: str) -> bool:
        """Whether `key` is a configured API key; every key is compared, each in constant time."""
        given = key.encode()
        matches = [hmac.compare_digest(known, given) for known in self.keys]
        return any(matches)

    def authenticated(self, request: Request) -> bool:
        """Whether the request carries a valid API key (never true on a server without keys)."""
        return bool(self.keys) and self.valid_key(bearer_key(request))

    def limit(self, who: str) -> None:
        if not self.limiter.allow(who):
            raise APIError(429, f"Rate limit reached: {self.limiter.per_minute} requests per minute. Retry later.",
                           type="rate_limit_exceeded", code="rate_limit_exceeded")

    def authorize(self, request: Request) -> None:
        """401 without a valid key (when keys are configured); 429 over the rate limit."""
        address = RateLimiter.client_key(request.client.host if request.client else "unknown")
        if not self.keys:
            self.limit(address)
            return
        key = bearer_key(request)
        if not self.valid_key(key):
            self.limit(address)
            what = "a wrong API key was given" if key else "no API key was given"
            raise APIError(401, f"Incorrect API key: {what}. Send 'Authorization: Bearer YOUR_KEY'.",
                           code="invalid_api_key")
        self.limit(f"key:{key}")
