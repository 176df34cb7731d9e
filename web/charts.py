"""The Money page's chart data: `GET /api/v1/reports/money?range=today|7d|30d`.

Series of one range in the site's time zone (web/reports.py does the maths; this module reads
the rows): revenue in baht (cash, QR) and wash sessions per bay and PLC errors per code, per hour
(today) or per day. The page draws them with the vendored uPlot (web/static/vendor/); any
technician client may read them (page session or Bearer token, as the other technician APIs).
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Any

from flask import Blueprint, jsonify, request
from peewee import SQL, fn

from gateway.store.models import WashSession, database_proxy, tuple_rows
from web.auth import require_technician
from web.context import ctx
from web.errors import ApiError
from web.openapi import doc
from web.reports import (
    BANKNOTES,
    COINS,
    RANGES,
    REVENUE_STATUS,
    REVENUE_TYPE,
    Item,
    Window,
    count_series,
    revenue_series,
    window,
)

bp = Blueprint("charts", __name__)

SERIES_DOC = {
    "type": "object",
    "properties": {
        "success": {"const": True},
        "data": {"type": "object", "required": ["range", "timezone", "bucket", "x", "revenue", "sessions", "errors"],
                 "properties": {
                     "range": {"enum": list(RANGES)}, "timezone": {"type": "string"},
                     "bucket": {"enum": ["hour", "day"]},
                     "x": {"type": "array", "items": {"type": "integer"},
                           "description": "each bucket's start, epoch seconds"},
                     "revenue": {"type": "object", "description": "baht per bucket: cash, qr"},
                     "sessions": {"type": "object", "description": "wash sessions per bucket, by bay id"},
                     "errors": {"type": "object", "description": "sessions ended in error per bucket, by code"},
                     "bays": {"type": "object", "description": "bay id → name"}}},
    },
}


def site_zone() -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(ctx().config.site.timezone)


def _naive(instant: dt.datetime) -> dt.datetime:
    """An aware instant as the database keeps instants (naive UTC)."""
    return instant.astimezone(dt.UTC).replace(tzinfo=None)


QUARTER_MS = 900_000
# Revenue summed per quarter-hour (and device) in SQLite, so a 30-day chart reads a few thousand
# rows instead of every item (measured: 86,400 items one by one took 12.8 s here, far too slow for
# a Pi). Every zone's offset is a multiple of 15 minutes, so a quarter-hour lies within one of the
# site's hours and days. The money rules stay in web/reports.py: which items (`REVENUE_TYPE`,
# `REVENUE_STATUS`) and what a denomination is worth (`cash_baht`).
_SUMS = ", ".join([f"SUM(json_extract(\"bank\", '$.\"{n}\"'))" for n in BANKNOTES]
                  + [f"SUM(json_extract(\"coin\", '$.\"{c}\"'))" for c in COINS])
ITEMS_SQL = (f'SELECT {{device}}, "timestamp_ms" / {QUARTER_MS}, {_SUMS}, SUM(COALESCE("qr_net_amount", 0)) '
             'FROM "event_log_item" WHERE "timestamp_ms" >= ? AND "timestamp_ms" < ? AND "type" = ? AND "status" = ? '
             "GROUP BY 1, 2")


def read_items(start: dt.datetime, end: dt.datetime, *, per_device: bool = False) -> list[Item]:
    """The revenue items the devices timed in [start, end) (aware instants), summed per
    quarter-hour (and device, with `per_device`; else device ""): each Item stands for its
    quarter-hour's items, timed at its start, notes and coins counted."""
    lo, hi = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    sql = ITEMS_SQL.format(device='"device_id"' if per_device else "''")
    rows = database_proxy.execute_sql(sql, (lo, hi, REVENUE_TYPE, REVENUE_STATUS)).fetchall()
    out = []
    for row in rows:
        device, quarter, tail = row[0], row[1], row[2:]
        notes, coins, qr = tail[:len(BANKNOTES)], tail[len(BANKNOTES):-1], tail[-1]
        out.append(Item(device, REVENUE_TYPE, REVENUE_STATUS, quarter * QUARTER_MS,
                        {str(n): int(v or 0) for n, v in zip(BANKNOTES, notes, strict=True)},
                        {str(c): int(v or 0) for c, v in zip(COINS, coins, strict=True)}, int(qr or 0)))
    return out


def read_sessions(start: dt.datetime, end: dt.datetime) -> list[tuple[str, str | None, dt.datetime, int]]:
    """(bay id, error code, quarter-hour, sessions) of the wash sessions started in [start, end)."""
    q = tuple_rows(WashSession.select(WashSession.bay, WashSession.error_code,
                                      fn.strftime("%s", WashSession.start_time).cast("INTEGER") / 900,
                                      fn.COUNT(WashSession.id))
                   .where((WashSession.start_time >= _naive(start)) & (WashSession.start_time < _naive(end)))
                   .group_by(SQL("1, 2, 3")))
    return [(bay, code, dt.datetime.fromtimestamp(quarter * 900, dt.UTC), n) for bay, code, quarter, n in q]


def money_series(range_name: str, w: Window) -> dict[str, Any]:
    """The document of `GET /api/v1/reports/money` for window `w`. Every configured bay has a
    sessions series (zeros when idle), so the chart's legend does not change with the data."""
    sessions = read_sessions(w.start, w.end)
    per_bay = count_series(w, ((bay, at, n) for bay, _, at, n in sessions))
    bays = {b.id: b.name or b.id for b in ctx().config.bays}
    for bay in bays:
        per_bay.setdefault(bay, [0] * len(w))
    return {"range": range_name, "timezone": w.zone.key, "bucket": w.bucket, "x": w.xs(),
            "revenue": revenue_series(w, read_items(w.start, w.end)),
            "sessions": dict(sorted(per_bay.items())),
            "errors": count_series(w, ((code, at, n) for _, code, at, n in sessions if code)),
            "bays": bays}


@bp.get("/api/v1/reports/money")
@doc("Money page's chart series for a range in the site's time zone: revenue (baht), sessions, errors",
     tags=("reports",), response=SERIES_DOC, errors=(400, 401), security="bearer",
     params={"range": {"enum": list(RANGES), "description": "today (by hour), 7d or 30d (by day); default 7d"}})
def money_api() -> Any:
    require_technician()
    range_name = request.args.get("range", "7d")
    try:
        w = window(range_name, dt.datetime.now(dt.UTC), site_zone())
    except ValueError as exc:
        raise ApiError(400, "VALIDATION_FAILED", str(exc)) from None
    return jsonify({"success": True, "data": money_series(range_name, w)})
