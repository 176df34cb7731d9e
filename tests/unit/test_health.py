"""The Pi's own health from recorded sysfs/procfs values in a fake root: throttling flags,
temperature, memory, uptime, disk warning, writes per day, unclean-stop detection; and the
journald structured fields of log calls."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.core.health import (
    CleanStopMarker,
    PiHealth,
    WriteRate,
    parse_throttled,
    process_written_bytes,
    read_pi_health,
    throttle_flags,
)
from gateway.core.logsetup import journal_handler
from tests.pi_root import write_pi_root


def _no_vcgencmd() -> str | None:
    raise AssertionError("vcgencmd must only be asked when the root is /")


def test_throttled_flags_in_both_notations() -> None:
    assert parse_throttled("50005\n") == parse_throttled("throttled=0x50005\n") == 0x50005
    f = throttle_flags(0x50005)
    assert f["under_voltage_now"] and f["throttled_now"] and f["under_voltage_occurred"] and f["throttled_occurred"]
    assert not f["freq_capped_now"] and not f["soft_temp_limit_occurred"]
    assert not any(throttle_flags(0).values())
    with pytest.raises(ValueError):
        parse_throttled("garbage")


def test_recorded_pi_under_voltage(tmp_path: Path) -> None:
    root = write_pi_root(tmp_path / "root")
    h = read_pi_health(root, tmp_path, disk_warn_percent=100, temperature_warn_c=80, vcgencmd=_no_vcgencmd)
    assert h.cpu_temp_c == 61.2
    assert h.throttled == 0x50005 and h.flags is not None and h.flags["under_voltage_now"]
    assert h.mem_total_bytes == 3884084 * 1024 and h.mem_available_bytes == 3398232 * 1024
    assert h.uptime_sec == pytest.approx(183742.61)
    st = os.statvfs(tmp_path)
    assert h.disk_total_bytes == st.f_blocks * st.f_frsize
    assert h.attention
    assert any("under-voltage now" in w for w in h.warnings())
    assert any("throttled" in w for w in h.warnings())
    assert process_written_bytes(root) == 1310720


def test_not_a_pi_says_not_available(tmp_path: Path) -> None:
    h = read_pi_health(tmp_path / "empty", tmp_path, disk_warn_percent=100, temperature_warn_c=80,
                       vcgencmd=_no_vcgencmd)
    assert h.flags is None and h.cpu_temp_c is None and h.mem_total_bytes is None and h.uptime_sec is None
    assert not h.attention and h.warnings() == []
    assert h.as_dict()["flags"] is None


def _health(**kw: Any) -> PiHealth:
    base: dict[str, Any] = dict(cpu_temp_c=50.0, throttled=0, disk_total_bytes=100, disk_free_bytes=50,
                                disk_used_percent=50.0, mem_total_bytes=None, mem_available_bytes=None,
                                uptime_sec=None, disk_warn_percent=90.0, temperature_warn_c=80.0)
    return PiHealth(**{**base, **kw})


def test_warnings_and_attention() -> None:
    assert _health().warnings() == [] and not _health().attention
    full = _health(disk_free_bytes=5, disk_used_percent=95.0)
    assert full.attention and full.warnings() == ["data partition 95 % full (warning at 90 %)"]
    since_boot = _health(throttled=0x10000)
    assert since_boot.attention and "since boot" in since_boot.warnings()[0]
    hot = _health(cpu_temp_c=83.0)
    assert not hot.attention and hot.warnings() == ["CPU at 83 °C"]  # a hot CPU warns, the LED stays


def test_write_rate_per_day() -> None:
    now = [0.0]
    rate = WriteRate(clock=lambda: now[0])
    rate.add(0)
    assert rate.per_day() is None
    now[0] = 3600.0
    rate.add(100_000)
    assert rate.per_day() == pytest.approx(2_400_000)  # an hour's writes × 24
    for hour in range(2, 50):  # past a day: the window slides
        now[0] = hour * 3600.0
        rate.add(100_000 * hour + (hour > 30) * 10_000_000)
    assert rate.per_day() == pytest.approx(2_400_000 + 10_000_000, rel=0.05)


def test_unclean_stop_is_detected_and_remembered(tmp_path: Path) -> None:
    clock = [1000.0]
    first = CleanStopMarker(tmp_path, clock=lambda: clock[0])
    assert first.start() is None and first.last_unclean is None
    clock[0] = 2000.0  # no stop(): a power cut
    second = CleanStopMarker(tmp_path, clock=lambda: clock[0])
    assert second.start() == {"detected_at": 2000.0, "previous_start": 1000.0}
    second.stop()
    clock[0] = 3000.0
    third = CleanStopMarker(tmp_path, clock=lambda: clock[0])
    assert third.start() is None  # the previous run stopped cleanly
    assert third.last_unclean == {"detected_at": 2000.0, "previous_start": 1000.0}  # still shown


def test_journald_fields_from_log_extras(caplog: pytest.LogCaptureFixture) -> None:
    from plc.bus import BayAddress, BusScheduler, BusSettings
    from plc.profile import builtin_profiles

    sent: list[dict[str, Any]] = []
    def send(*args: str, **fields: Any) -> None:  # systemd.journal.send's signature: MESSAGE first
        sent.append({"MESSAGE": args[0], **fields})

    handler = journal_handler("core", sender=send)
    bus_log = logging.getLogger("plc.bus")
    bus_log.addHandler(handler)
    try:
        # A real log call of the bus scheduler (constructed without I/O): a poll timeout of bay2.
        sched = BusScheduler(BusSettings(name="rs485", type="tcp", host="127.0.0.1", port=1),
                             [BayAddress("bay2", 1, 100, builtin_profiles()["washbay-v1"], 0.2)], lambda _r: None)
        with caplog.at_level(logging.WARNING, logger="plc.bus"):
            sched._report(sched._bays["bay2"], None, "timeout", 0.1, 0.0)
            sched._report(sched._bays["bay2"], None, "exception 2", 0.1, 0.0)
    finally:
        bus_log.removeHandler(handler)
    entry = next(e for e in sent if "timeout" in e["MESSAGE"])
    assert entry["BAY_ID"] == "bay2" and entry["BUS"] == "rs485"
    assert entry["SYSLOG_IDENTIFIER"] == "carwash-gateway-core" and entry["PRIORITY"] == "4"
    assert sched.stats()["bay2"]["errors_by_kind"] == {"timeout": 1, "exception": 1}
