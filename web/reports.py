"""The Money page's figures as pure functions: no Flask, no database (the callers read the rows).

Time: instants in the database are naive UTC (`DateTimeField`) or ms epochs (device event logs);
days and hours are the site's (`site.timezone`), so a day starts at the site's midnight whatever
the server's zone, and a DST change gives a 23- or 25-hour day rather than a shifted one.
Money: event-log items are whole baht as devices send them (notes and coins counted, QR net
amount); QR charges (`payment.amount_satang`) are satang.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

BANKNOTES = (20, 50, 100, 500, 1000)
COINS = (1, 2, 5, 10)
RANGES = ("today", "7d", "30d")
MAX_EXPORT_DAYS = 366


@dataclass(frozen=True)
class Window:
    """A range of the site's local time cut into buckets. `edges` are the buckets' starts as
    aware UTC instants plus the range's end (exclusive), so bucket i is [edges[i], edges[i+1])."""

    zone: zoneinfo.ZoneInfo
    bucket: str  # "hour" | "day"
    edges: tuple[dt.datetime, ...]

    @property
    def start(self) -> dt.datetime:
        return self.edges[0]

    @property
    def end(self) -> dt.datetime:
        return self.edges[-1]

    def __len__(self) -> int:
        return len(self.edges) - 1

    def index(self, instant: dt.datetime) -> int | None:
        """The bucket of an aware instant (naive means UTC, as the database keeps it), or None
        outside the window."""
        if instant.tzinfo is None:
            instant = instant.replace(tzinfo=dt.UTC)
        i = bisect.bisect_right(self.edges, instant) - 1
        return i if 0 <= i < len(self) else None

    def xs(self) -> list[int]:
        """The buckets' starts in epoch seconds (the charts' x values)."""
        return [int(e.timestamp()) for e in self.edges[:-1]]


def local_midnight(day: dt.date, zone: zoneinfo.ZoneInfo) -> dt.datetime:
    """The instant (aware, UTC) the site's `day` begins."""
    return dt.datetime.combine(day, dt.time(), zone).astimezone(dt.UTC)


def day_window(first: dt.date, last: dt.date, zone: zoneinfo.ZoneInfo) -> Window:
    """Days `first`..`last` (inclusive), one bucket a day."""
    days = (last - first).days + 1
    return Window(zone, "day", tuple(local_midnight(first + dt.timedelta(days=i), zone) for i in range(days + 1)))


def window(range_name: str, now: dt.datetime, zone: zoneinfo.ZoneInfo) -> Window:
    """`today` (the site's day so far and to come, by hour), `7d` and `30d` (that many days
    ending today, by day); `now` naive means UTC. ValueError for another name."""
    today = (now if now.tzinfo else now.replace(tzinfo=dt.UTC)).astimezone(zone).date()
    if range_name == "today":
        start, end = local_midnight(today, zone), local_midnight(today + dt.timedelta(days=1), zone)
        hours = int((end - start).total_seconds() // 3600)  # 23 or 25 on a DST change
        return Window(zone, "hour", tuple(start + dt.timedelta(hours=h) for h in range(hours + 1)))
    if range_name in ("7d", "30d"):
        days = int(range_name[:-1])
        return day_window(today - dt.timedelta(days=days - 1), today, zone)
    raise ValueError(f"range must be one of {', '.join(RANGES)}")


def counts(raw: Any) -> dict[str, int]:
    """A stored `bank`/`coin` document (JSON text, a dict or None) as {denomination: count}."""
    value = json.loads(raw) if isinstance(raw, str | bytes) else raw
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


def cash_baht(bank: Mapping[str, int], coin: Mapping[str, int]) -> int:
    """Cash of one event-log item in baht: each denomination times its count."""
    return sum(int(k) * v for k, v in bank.items()) + sum(int(k) * v for k, v in coin.items())


REVENUE_TYPE, REVENUE_STATUS = "PAYMENT", "SUCCEEDED"


def is_revenue(item_type: str, status: str) -> bool:
    """Which event-log items count as money taken: payments that succeeded (a failed or
    cancelled QR attempt took nothing; other item types carry no money)."""
    return item_type == REVENUE_TYPE and status == REVENUE_STATUS


@dataclass(frozen=True)
class Item:
    """The fields of an event-log item the reports use."""

    device_id: str
    type: str
    status: str
    timestamp_ms: int
    bank: dict[str, int]
    coin: dict[str, int]
    qr_net: int

    @property
    def at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.timestamp_ms / 1000, dt.UTC)


def revenue_series(w: Window, items: Iterable[Item]) -> dict[str, list[int]]:
    """Baht taken per bucket, cash and QR apart, from the revenue items (by the device's time of
    payment, not the upload's)."""
    out = {"cash": [0] * len(w), "qr": [0] * len(w)}
    for it in items:
        i = w.index(it.at)
        if i is None or not is_revenue(it.type, it.status):
            continue
        out["cash"][i] += cash_baht(it.bank, it.coin)
        out["qr"][i] += it.qr_net
    return out


def count_series(w: Window, rows: Iterable[tuple[str, dt.datetime, int]]) -> dict[str, list[int]]:
    """Counts per bucket and key (sessions per bay, errors per code) from (key, when, how many)
    rows, keys sorted; rows outside the window are left out."""
    out: dict[str, list[int]] = {}
    for key, at, n in rows:
        i = w.index(at)
        if i is not None:
            out.setdefault(key, [0] * len(w))[i] += n
    return dict(sorted(out.items()))


def device_days(items: Iterable[Item], zone: zoneinfo.ZoneInfo) -> list[dict[str, Any]]:
    """Per site day and device: cash and QR baht, notes and coins counted (revenue items only),
    newest day first."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for it in items:
        if not is_revenue(it.type, it.status):
            continue
        day = it.at.astimezone(zone).date().isoformat()
        row = rows.setdefault((day, it.device_id), {
            "day": day, "device": it.device_id, "cash": 0, "qr": 0,
            "notes": dict.fromkeys(map(str, BANKNOTES), 0), "coins": dict.fromkeys(map(str, COINS), 0)})
        row["cash"] += cash_baht(it.bank, it.coin)
        row["qr"] += it.qr_net
        for k, v in it.bank.items():
            row["notes"][k] = row["notes"].get(k, 0) + v
        for k, v in it.coin.items():
            row["coins"][k] = row["coins"].get(k, 0) + v
    return sorted(rows.values(), key=lambda r: (r["day"], r["device"]), reverse=True)


def parse_days(first: str | None, last: str | None, today: dt.date) -> tuple[dt.date, dt.date]:
    """An export's `from`/`to` (YYYY-MM-DD, the site's days, both included; either defaults to
    today). ValueError when malformed, reversed or longer than MAX_EXPORT_DAYS."""
    try:
        a = dt.date.fromisoformat(first) if first else today
        b = dt.date.fromisoformat(last) if last else today
    except ValueError:
        raise ValueError("from and to must be dates as YYYY-MM-DD") from None
    if b < a:
        raise ValueError("to must not be before from")
    if (b - a).days + 1 > MAX_EXPORT_DAYS:
        raise ValueError(f"at most {MAX_EXPORT_DAYS} days per export")
    return a, b


def local_iso(instant: dt.datetime | None, zone: zoneinfo.ZoneInfo) -> str:
    """An instant (naive = UTC) as ISO 8601 in the site's zone with its offset, to the second;
    "" for None (an empty CSV cell)."""
    if instant is None:
        return ""
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=dt.UTC)
    return instant.astimezone(zone).isoformat(timespec="seconds")


def baht_of_satang(satang: int) -> str:
    """Satang as baht with two decimals, exactly ("1234" → "12.34")."""
    return str((Decimal(satang) / 100).quantize(Decimal("0.01")))
