"""gateway.backoff: the one exponential backoff with full jitter (drainer and cloud bridge)."""

from __future__ import annotations

import random

import pytest

from gateway.backoff import Backoff, backoff_delay


def test_full_jitter_spreads_over_a_doubling_window_up_to_the_maximum() -> None:
    rng = random.Random(7)
    for failures in range(1, 20):
        cap = min(60.0, 2.0 ** failures)
        samples = [backoff_delay(failures, 1.0, 60.0, rng) for _ in range(200)]
        assert all(1.0 <= d <= cap for d in samples), failures
        if cap > 1.5:
            assert max(samples) - min(samples) > (cap - 1.0) / 2, "no jitter"
    assert backoff_delay(1000, 1.0, 60.0, rng) <= 60.0  # no overflow, still capped
    assert backoff_delay(0, 1.0, 60.0, rng) == 1.0


def test_retry_after_is_a_floor_capped_at_the_maximum() -> None:
    rng = random.Random(1)
    assert all(backoff_delay(1, 1.0, 300.0, rng, retry_after=30) >= 30 for _ in range(50))
    assert backoff_delay(1, 1.0, 300.0, rng, retry_after=10_000) == 300.0
    assert backoff_delay(1, 1.0, 300.0, rng, retry_after=0) <= 2.0


def test_backoff_counts_failures_and_resets() -> None:
    class Recording(random.Random):
        """Returns the upper bound it is asked for: the window is visible."""

        def uniform(self, a: float, b: float) -> float:
            return b

    b = Backoff(0.5, 4.0, rng=Recording())
    assert [b.failure() for _ in range(5)] == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.failures == 5
    b.reset()
    assert (b.failures, b.failure()) == (0, 1.0)
    assert b.failure(retry_after=3.5) == 3.5  # the window is 2.0 here: Retry-After wins


def test_backoff_rejects_a_nonsense_window() -> None:
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)
