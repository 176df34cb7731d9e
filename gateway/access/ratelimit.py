"""Token buckets per client key: the device API per address (web), anonymous MQTT publishers per
client id (broker), failed technician logins per address (web).

Each key may pass `rate` times per second on average with bursts of `burst`; `check()` says how
long the caller should wait otherwise (the web answers 429 RATE_LIMITED with a Retry-After, the
broker drops the message). Keys in `exempt` (the gateway itself: the demo's fleet, the ops tools)
are not limited. At most `MAX_CLIENTS` buckets are kept (the least recently seen go first), so a
flood of spoofed addresses or client ids cannot grow memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_CLIENTS = 10_000


class RateLimiter:
    def __init__(self, rate: float, burst: int, exempt: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock  # monotonic seconds; tests give their own
        self.burst = float(burst)
        self.exempt = frozenset(exempt)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # addr -> (tokens, at)
        self._lock = threading.Lock()
        self.limited = 0

    def check(self, addr: str | None, now: float | None = None) -> float:
        """Take a token: 0 when the request may go on, else the seconds until it could."""
        return self._take(addr, now, take=True)

    def peek(self, addr: str | None, now: float | None = None) -> float:
        """What `check` would answer, without taking a token (to count only failures, say)."""
        return self._take(addr, now, take=False)

    def _take(self, addr: str | None, now: float | None, *, take: bool) -> float:
        if self.rate <= 0 or addr is None or addr in self.exempt:
            return 0.0
        now = self.clock() if now is None else now
        with self._lock:
            tokens, at = self._buckets.pop(addr, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            if take and not wait:
                tokens -= 1.0
            elif take:
                self.limited += 1
            self._buckets[addr] = (tokens, now)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
        return wait


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))
