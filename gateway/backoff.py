"""Exponential backoff with full jitter: the one copy used by the uplink drainer and the cloud bridge.

Contract
- `backoff_delay(failures, lo, hi, rng, retry_after=None)`: uniform in
  [lo, min(hi, lo * 2^failures)] (the exponent is capped, so any count is safe), at least
  `retry_after` when given, itself capped at `hi` (a server cannot park us for longer than our
  own maximum). Pure apart from the injected `rng`.
- `Backoff(lo, hi, rng)`: the same with its own failure count: `failure()` counts one and returns
  the delay to wait, `reset()` after a success. No I/O, no sleeping: the caller sleeps.
"""

from __future__ import annotations

import random

_MAX_EXPONENT = 40  # 2^40 × any sane minimum is beyond every maximum: no float overflow


def backoff_delay(failures: int, lo: float, hi: float, rng: random.Random,
                  retry_after: float | None = None) -> float:
    """Full jitter: uniform in [lo, min(hi, lo * 2^failures)], at least min(retry_after, hi)."""
    cap = min(hi, lo * 2.0 ** min(max(failures, 0), _MAX_EXPONENT))
    delay = rng.uniform(lo, max(lo, cap))
    if retry_after is not None:
        delay = max(delay, min(retry_after, hi))
    return delay


class Backoff:
    """A failure counter with `backoff_delay`; `rng` injectable for tests."""

    def __init__(self, lo: float, hi: float, rng: random.Random | None = None) -> None:
        if not 0 < lo <= hi:
            raise ValueError("need 0 < lo <= hi")
        self.lo, self.hi = lo, hi
        self.failures = 0
        self._rng = rng or random.Random()

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """The delay after `failures` consecutive failures (the counter is not touched)."""
        return backoff_delay(failures, self.lo, self.hi, self._rng, retry_after)

    def failure(self, retry_after: float | None = None) -> float:
        """Count a failure; the delay to wait before the next attempt."""
        self.failures += 1
        return self.delay(self.failures, retry_after)

    def reset(self) -> None:
        """After a success (or a connection that stayed up): the next failure starts small again."""
        self.failures = 0
