"""The Pi's own health: power, temperature, storage, memory, uptime, unclean shutdowns.

Most field failures of a Pi are power (an under-sized supply: under-voltage, throttling, SD-card
corruption) and storage (a full or worn-out card), so the core reads them every
`health.check_sec` and shows them on the overview, in `status` and in /metrics.

Everything is read under a root directory (`health.sys_root`, "/" on the Pi) so that tests feed
recorded values from a fake tree:
- `sys/devices/platform/soc/soc:firmware/get_throttled` (the firmware's flags in hex; on a Pi
  without that driver, `vcgencmd get_throttled` when the root is "/"); absent: not available;
- `sys/class/thermal/thermal_zone0/temp` (millidegrees Celsius);
- `proc/meminfo` (MemTotal, MemAvailable), `proc/uptime`, `proc/self/io` (write_bytes);
- the data partition's free space with `os.statvfs` of the database's directory (not under the
  root: it is the real data directory).

Unclean shutdowns: `CleanStopMarker` writes `core.running` in the data directory at start and
removes it at an orderly stop; a marker found at start means the previous run ended without one
(power cut, SIGKILL, watchdog, kernel panic). The last detection is kept in `last-unclean-stop`
so that it is still shown after later clean restarts. Two tiny files per start: no SD wear.

`read_pi_health` does blocking I/O (a subprocess at worst): the core calls it in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

THROTTLED_PATH = "sys/devices/platform/soc/soc:firmware/get_throttled"
THERMAL_PATH = "sys/class/thermal/thermal_zone0/temp"
# The firmware's get_throttled bits (Raspberry Pi documentation, "vcgencmd get_throttled").
THROTTLE_BITS = {
    "under_voltage_now": 0,
    "freq_capped_now": 1,
    "throttled_now": 2,
    "soft_temp_limit_now": 3,
    "under_voltage_occurred": 16,
    "freq_capped_occurred": 17,
    "throttled_occurred": 18,
    "soft_temp_limit_occurred": 19,
}
RUNNING_MARKER = "core.running"
LAST_UNCLEAN = "last-unclean-stop"
WRITE_WINDOW_SEC = 86400.0
WRITE_SAMPLE_SEC = 600.0


def parse_throttled(text: str) -> int:
    """The flags of `get_throttled` as sysfs ("50005") or vcgencmd ("throttled=0x50005") print
    them; ValueError for anything else."""
    value = text.strip()
    if value.startswith("throttled="):
        value = value[len("throttled="):]
    return int(value, 16)


def throttle_flags(value: int) -> dict[str, bool]:
    return {name: bool(value >> bit & 1) for name, bit in THROTTLE_BITS.items()}


@dataclass(frozen=True)
class PiHealth:
    """One reading. None means "not available on this machine" (shown as such)."""

    cpu_temp_c: float | None
    throttled: int | None  # the raw get_throttled flags
    disk_total_bytes: int
    disk_free_bytes: int
    disk_used_percent: float
    mem_total_bytes: int | None
    mem_available_bytes: int | None
    uptime_sec: float | None
    disk_warn_percent: float
    temperature_warn_c: float

    @property
    def flags(self) -> dict[str, bool] | None:
        return None if self.throttled is None else throttle_flags(self.throttled)

    def warnings(self) -> list[str]:
        """Short English sentences for the overview and `status`; empty when all is well."""
        out = []
        f = self.flags or {}
        if f.get("under_voltage_now"):
            out.append("under-voltage now: the power supply is too weak (SD-card corruption risk)")
        elif f.get("under_voltage_occurred"):
            out.append("under-voltage occurred since boot: check the power supply")
        if f.get("throttled_now") or f.get("freq_capped_now"):
            out.append("CPU throttled now")
        if self.disk_used_percent >= self.disk_warn_percent:
            out.append(f"data partition {self.disk_used_percent:.0f} % full "
                       f"(warning at {self.disk_warn_percent:g} %)")
        if self.cpu_temp_c is not None and self.cpu_temp_c >= self.temperature_warn_c:
            out.append(f"CPU at {self.cpu_temp_c:.0f} °C")
        return out

    @property
    def attention(self) -> bool:
        """Under-voltage (now or since boot) or a nearly full disk: the LED's "attention"."""
        f = self.flags or {}
        return (bool(f.get("under_voltage_now") or f.get("under_voltage_occurred"))
                or self.disk_used_percent >= self.disk_warn_percent)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = self.flags
        d["warnings"] = self.warnings()
        d["attention"] = self.attention
        return d


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _throttled(root: Path, vcgencmd: Callable[[], str | None]) -> int | None:
    text = _read(root, THROTTLED_PATH)
    if text is None and root == Path("/"):
        text = vcgencmd()
    if text is None:
        return None
    try:
        return parse_throttled(text)
    except ValueError:
        log.warning("health: get_throttled: unreadable value %r", text[:40])
        return None


def _vcgencmd() -> str | None:
    exe = shutil.which("vcgencmd")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _meminfo(root: Path) -> tuple[int | None, int | None]:
    text = _read(root, "proc/meminfo") or ""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return values.get("MemTotal"), values.get("MemAvailable")


def _float(text: str | None, scale: float = 1.0) -> float | None:
    if text is None:
        return None
    try:
        return float(text.split()[0]) * scale
    except (ValueError, IndexError):
        return None


def read_pi_health(root: Path, data_dir: Path, *, disk_warn_percent: float, temperature_warn_c: float,
                   vcgencmd: Callable[[], str | None] = _vcgencmd) -> PiHealth:
    """Read everything once (blocking; see the module docstring for the sources)."""
    st = os.statvfs(data_dir)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    mem_total, mem_avail = _meminfo(root)
    temp = _float(_read(root, THERMAL_PATH), 0.001)
    return PiHealth(cpu_temp_c=None if temp is None else round(temp, 1), throttled=_throttled(root, vcgencmd),
                    disk_total_bytes=total, disk_free_bytes=free,
                    disk_used_percent=round(100.0 * (total - free) / total, 1) if total else 0.0,
                    mem_total_bytes=mem_total, mem_available_bytes=mem_avail,
                    uptime_sec=_float(_read(root, "proc/uptime")),
                    disk_warn_percent=disk_warn_percent, temperature_warn_c=temperature_warn_c)


def process_written_bytes(root: Path = Path("/")) -> int | None:
    """Bytes this process caused to be written to storage (`write_bytes` of /proc/self/io), None
    when the kernel does not say (no task I/O accounting)."""
    for line in (_read(root, "proc/self/io") or "").splitlines():
        name, _, value = line.partition(":")
        if name == "write_bytes":
            try:
                return int(value)
            except ValueError:
                return None
    return None


@dataclass
class WriteRate:
    """Bytes written per day from samples of a growing counter: over the last 24 h once the
    process is that old, extrapolated from its lifetime before. `clock` is monotonic seconds."""

    clock: Callable[[], float] = time.monotonic
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    last: tuple[float, int] | None = None

    def add(self, value: int) -> None:
        now = self.clock()
        if not self.samples or now - self.samples[-1][0] >= WRITE_SAMPLE_SEC:
            self.samples.append((now, value))
        while len(self.samples) > 2 and now - self.samples[1][0] >= WRITE_WINDOW_SEC:
            self.samples.popleft()
        self.last = (now, value)

    def per_day(self) -> float | None:
        last = self.last
        if last is None or not self.samples:
            return None
        t0, v0 = self.samples[0]
        span = last[0] - t0
        if span <= 0:
            return None
        return (last[1] - v0) * WRITE_WINDOW_SEC / span


class CleanStopMarker:
    """The unclean-shutdown detector (module docstring). No I/O until `start()`."""

    def __init__(self, data_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.dir = data_dir
        self.clock = clock
        self.last_unclean: dict[str, Any] | None = None  # {"detected_at", "previous_start"}

    def start(self) -> dict[str, Any] | None:
        """Detect the previous run's end, then mark this one as running. Returns the detection of
        this start (None when the previous run stopped cleanly or there was none)."""
        marker, last = self.dir / RUNNING_MARKER, self.dir / LAST_UNCLEAN
        found = None
        try:
            previous = marker.read_text().strip()
        except FileNotFoundError:
            previous = None
        except OSError as exc:
            log.warning("health: cannot read %s: %s", marker, exc)
            previous = None
        if previous is not None:
            found = {"detected_at": self.clock(), "previous_start": _number(previous)}
            _write_synced(last, json.dumps(found))
            log.warning("the previous core run ended without an orderly stop (power cut, kill or crash); "
                        "it had started at %s", previous or "?")
        else:
            try:
                found_before = json.loads(last.read_text())
                self.last_unclean = found_before if isinstance(found_before, dict) else None
            except (OSError, ValueError):
                self.last_unclean = None
        if found is not None:
            self.last_unclean = found
        _write_synced(marker, f"{self.clock():.0f}\n")
        return found

    def stop(self) -> None:
        """An orderly stop: remove the marker (and make its removal durable)."""
        try:
            (self.dir / RUNNING_MARKER).unlink()
            _fsync_dir(self.dir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("health: cannot remove %s: %s", self.dir / RUNNING_MARKER, exc)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _write_synced(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        log.warning("health: cannot write %s: %s", path, exc)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PiMonitor:
    """The core's reader: `run()` reads every `check_sec` (in a thread) and calls `on_change`
    when the warnings change; `snapshot()` is what RPC `health.pi`, `status` and the metrics
    show. No I/O in the constructor."""

    def __init__(self, root: Path, data_dir: Path, *, check_sec: float, disk_warn_percent: float,
                 temperature_warn_c: float, on_change: Callable[[], None] = lambda: None) -> None:
        self.root = root
        self.data_dir = data_dir
        self.check_sec = check_sec
        self.disk_warn_percent = disk_warn_percent
        self.temperature_warn_c = temperature_warn_c
        self.on_change = on_change
        self.marker = CleanStopMarker(data_dir)
        self.writes = WriteRate()
        self.latest: PiHealth | None = None
        self.written_bytes: int | None = None

    def read(self) -> PiHealth:
        """One reading (blocking), kept as `latest`."""
        h = read_pi_health(self.root, self.data_dir, disk_warn_percent=self.disk_warn_percent,
                           temperature_warn_c=self.temperature_warn_c)
        self.written_bytes = process_written_bytes(self.root)
        if self.written_bytes is not None:
            self.writes.add(self.written_bytes)
        before = self.latest.warnings() if self.latest is not None else None
        self.latest = h
        if h.warnings() != before:
            for w in h.warnings():
                if before is None or w not in before:
                    log.warning("health: %s", w)
            self.on_change()
        return h

    def summary(self) -> dict[str, Any]:
        """The small part published in the retained `gateway/health` (changes rarely)."""
        h = self.latest
        return {"attention": bool(h and h.attention), "warnings": h.warnings() if h else []}

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = self.latest.as_dict() if self.latest is not None else {}
        out["last_unclean_stop"] = self.marker.last_unclean
        out["core_written_bytes"] = self.written_bytes
        out["core_written_bytes_per_day"] = self.writes.per_day()
        return out

    async def run(self) -> None:
        import asyncio

        while True:
            await asyncio.to_thread(self.read)
            await asyncio.sleep(self.check_sec)
