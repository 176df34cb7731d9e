"""Counting and logging dropped input without flooding the journal.

`Drops.drop(reason, where, detail)` counts per reason and logs one line naming the reason and the
problem; repeats of a reason within `every` seconds are only counted (the first error is loud,
repeats quiet).
"""

from __future__ import annotations

import logging
import time
from collections import Counter


class Drops:
    def __init__(self, log: logging.Logger, every: float = 60.0) -> None:
        self._log = log
        self._every = every
        self._last: dict[str, float] = {}
        self.counts: Counter[str] = Counter()

    def drop(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        now = time.monotonic()
        if now - self._last.get(reason, -self._every) >= self._every:
            self._last[reason] = now
            self._log.warning("dropped a message on %s: %s: %s (%d dropped for this reason so far)",
                              where, reason, detail, self.counts[reason])
