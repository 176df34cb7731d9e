"""A latency histogram that modules keep without importing prometheus_client (pure, cheap):
`gateway/core/metrics.py` exposes it at scrape time as a Prometheus histogram."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# Seconds; from a LAN round trip to the command timeout's order of magnitude.
ACK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Buckets:
    """Counts of observations per upper bound (not cumulative), their sum and count."""

    def __init__(self, bounds: Sequence[float] = ACK_BUCKETS) -> None:
        if list(bounds) != sorted(bounds) or not bounds:
            raise ValueError("bounds must be a non-empty ascending sequence")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, cumulative count)] as Prometheus wants them, ending with ("+Inf", count)."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
