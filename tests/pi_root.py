"""Recorded values of a real Raspberry Pi 4 (Raspberry Pi OS, 4 GB) for a fake /sys and /proc
tree (`health.sys_root`): a supply that sagged under load (get_throttled 0x50005: under-voltage
and throttling now, both also since boot), the CPU at 61.2 °C."""

from __future__ import annotations

from pathlib import Path

THROTTLED_UNDER_VOLTAGE = "50005\n"  # sysfs prints the flags in hex without 0x
THROTTLED_OK = "0\n"
MEMINFO = """MemTotal:        3884084 kB
MemFree:         2712180 kB
MemAvailable:    3398232 kB
Buffers:           48200 kB
Cached:           726388 kB
SwapCached:            0 kB
"""
UPTIME = "183742.61 702311.52\n"
TEMP = "61224\n"
SELF_IO = """rchar: 2048394
wchar: 913847
syscr: 4411
syscw: 1783
read_bytes: 40960
write_bytes: 1310720
cancelled_write_bytes: 0
"""


def write_pi_root(root: Path, throttled: str | None = THROTTLED_UNDER_VOLTAGE) -> Path:
    """The tree under `root`; `throttled=None` leaves get_throttled out (not a Pi)."""
    files = {"sys/class/thermal/thermal_zone0/temp": TEMP, "proc/meminfo": MEMINFO, "proc/uptime": UPTIME,
             "proc/self/io": SELF_IO}
    if throttled is not None:
        files["sys/devices/platform/soc/soc:firmware/get_throttled"] = throttled
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def set_throttled(root: Path, value: str) -> None:
    (root / "sys/devices/platform/soc/soc:firmware/get_throttled").write_text(value)
