"""Power cuts through the real processes (bench/powercut.py at its smallest): the site on a
power-cut filesystem under load, cut a few times (at a random moment and inside a write, torn or
not), then every acknowledged fact checked once in the database and once at the cloud, and
`PRAGMA integrity_check` after every restart. Deterministic seed; no timing is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import powercut
from bench.powerfs import fuse_available


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
def test_acknowledged_facts_survive_power_cuts(tmp_path: Path) -> None:
    out = powercut.power_cuts(powercut.TEST, powercut.SEED, tmp_path)
    detail = powercut.summary(out) + f"\n{out.check}\n{out.per_cut}"
    assert out.cuts == powercut.TEST.cuts, detail
    assert {p["kind"] for p in out.per_cut} >= {"moment", "write"}, detail  # both kinds of cut happened
    assert sum(p["dropped_writes"] for p in out.per_cut) > 0, detail  # the cuts really took unsynced writes
    for kind, n in out.acknowledged.items():
        assert n > 0, f"no {kind} acknowledged: the load did not run\n{detail}"
    assert out.lost == 0, detail
    assert out.duplicated == 0, detail
    assert out.integrity_failures == 0, detail
    assert out.integrity_checks == out.cuts + 1, detail
