"""Time helpers: the database stores naive UTC datetimes; the wire uses ISO 8601 with `Z`."""

from __future__ import annotations

import calendar
import datetime as dt
import time


def utc_now() -> dt.datetime:
    """Naive UTC now, the form every DateTimeField holds."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def iso_z(moment: dt.datetime | None = None) -> str:
    """`2026-01-14T08:00:00.000Z` (milliseconds, UTC) as the seeds write timestamps."""
    m = moment or utc_now()
    if m.tzinfo is not None:
        m = m.astimezone(dt.UTC).replace(tzinfo=None)
    return m.strftime("%Y-%m-%dT%H:%M:%S.") + f"{m.microsecond // 1000:03d}Z"


def epoch_s(moment: dt.datetime | None = None) -> int:
    """Whole seconds since the epoch of a naive UTC datetime (now by default)."""
    return calendar.timegm((moment or utc_now()).utctimetuple())


def epoch_ms() -> int:
    return time.time_ns() // 1_000_000
