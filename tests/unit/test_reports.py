"""The Money page's report maths (web/reports.py), pure: windows in the site's zone (day edges at
the site's midnight, DST days of 23 and 25 hours), revenue by the device's time of payment,
counts per bucket, export ranges, amounts."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from web.reports import (
    Item,
    baht_of_satang,
    count_series,
    counts,
    day_window,
    device_days,
    local_iso,
    parse_days,
    revenue_series,
    window,
)

BKK = zoneinfo.ZoneInfo("Asia/Bangkok")
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
UTC = dt.UTC


def at(y: int, mo: int, d: int, h: int = 0, mi: int = 0, zone: zoneinfo.ZoneInfo = BKK) -> dt.datetime:
    return dt.datetime(y, mo, d, h, mi, tzinfo=zone)


def item(when: dt.datetime, *, bank: dict[str, int] | None = None, coin: dict[str, int] | None = None, qr: int = 0,
         status: str = "SUCCEEDED", kind: str = "PAYMENT", device: str = "d1") -> Item:
    return Item(device, kind, status, int(when.timestamp() * 1000), bank or {}, coin or {}, qr)


def test_windows_cut_the_sites_days_and_hours() -> None:
    # 01:30 on Dec 7 in Bangkok is still Dec 6 in UTC: "today" is the site's day.
    now = at(2026, 12, 7, 1, 30).astimezone(UTC)
    today = window("today", now, BKK)
    assert (today.bucket, len(today)) == ("hour", 24)
    assert today.start == at(2026, 12, 7) and today.end == at(2026, 12, 8)
    week = window("7d", now, BKK)
    assert (week.bucket, len(week)) == ("day", 7)
    assert week.start == at(2026, 12, 1) and week.end == at(2026, 12, 8)
    assert len(window("30d", now, BKK)) == 30
    assert window("7d", now.replace(tzinfo=None), BKK) == week  # naive means UTC, as the database keeps it
    with pytest.raises(ValueError):
        window("1y", now, BKK)
    # Bucket edges are inclusive at the start, exclusive at the end; naive instants are UTC.
    assert week.index(at(2026, 12, 1)) == 0
    assert week.index(at(2026, 12, 1) - dt.timedelta(microseconds=1)) is None
    assert week.index(at(2026, 12, 7, 23, 59)) == 6 and week.index(at(2026, 12, 8)) is None
    assert week.index(dt.datetime(2026, 11, 30, 17, 0)) == 0  # 00:00 Dec 1 in Bangkok, naive UTC
    assert today.xs()[1] - today.xs()[0] == 3600


def test_daylight_saving_days_keep_their_local_midnights() -> None:
    spring = window("today", at(2026, 3, 29, 12, zone=BERLIN), BERLIN)
    autumn = window("today", at(2026, 10, 25, 12, zone=BERLIN), BERLIN)
    assert len(spring) == 23 and len(autumn) == 25
    days = day_window(dt.date(2026, 3, 28), dt.date(2026, 3, 30), BERLIN)
    assert [e.astimezone(BERLIN).hour for e in days.edges] == [0, 0, 0, 0]
    assert (days.edges[2] - days.edges[1]) == dt.timedelta(hours=23)


def test_revenue_counts_succeeded_payments_by_the_devices_time() -> None:
    w = window("7d", at(2026, 12, 7, 12), BKK)
    items = [
        item(at(2026, 12, 6, 23, 59), bank={"20": 2, "100": 1}, coin={"10": 3, "5": 1}),  # 175 cash, Dec 6
        item(at(2026, 12, 7, 0, 0), qr=50),  # Dec 7
        item(at(2026, 12, 7, 9), qr=80, status="FAILED"),  # no money taken
        item(at(2026, 12, 7, 9), bank={"1000": 1}, kind="DOOR"),  # not a payment
        item(at(2026, 11, 30, 23, 59), bank={"500": 1}),  # before the window
    ]
    series = revenue_series(w, items)
    assert series["cash"] == [0, 0, 0, 0, 0, 175, 0]
    assert series["qr"] == [0, 0, 0, 0, 0, 0, 50]
    rows = device_days(items, BKK)
    assert [(r["day"], r["cash"], r["qr"]) for r in rows] == [("2026-12-07", 0, 50), ("2026-12-06", 175, 0),
                                                              ("2026-11-30", 500, 0)]
    assert rows[1]["notes"]["20"] == 2 and rows[1]["coins"]["5"] == 1 and rows[1]["notes"]["1000"] == 0


def test_count_series_per_key_and_bucket() -> None:
    w = window("today", at(2026, 12, 7, 12), BKK)
    rows = [("bay2", at(2026, 12, 7, 8, 5), 1), ("bay1", at(2026, 12, 7, 8, 45), 3), ("bay1", at(2026, 12, 7, 9), 1),
            ("bay1", at(2026, 12, 6, 23, 45), 2)]
    series = count_series(w, rows)
    assert list(series) == ["bay1", "bay2"]
    assert series["bay1"][8] == 3 and series["bay1"][9] == 1 and sum(series["bay1"]) == 4
    assert series["bay2"][8] == 1 and sum(series["bay2"]) == 1


def test_export_ranges_and_amounts() -> None:
    today = dt.date(2026, 12, 7)
    assert parse_days(None, None, today) == (today, today)
    assert parse_days("2026-12-01", "2026-12-02", today) == (dt.date(2026, 12, 1), dt.date(2026, 12, 2))
    for bad in (("2026-12-02", "2026-12-01"), ("12/01/2026", None), ("2025-01-01", "2026-12-01")):
        with pytest.raises(ValueError):
            parse_days(*bad, today)
    assert local_iso(dt.datetime(2026, 11, 30, 17, 0), BKK) == "2026-12-01T00:00:00+07:00"
    assert local_iso(None, BKK) == ""
    assert baht_of_satang(12345) == "123.45" and baht_of_satang(5) == "0.05" and baht_of_satang(100) == "1.00"
    assert counts('{"20": 2, "x": "no", "50": true}') == {"20": 2} and counts(None) == {}
