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

from gateway.store.models import EventLogItem, WashSession, tuple_rows
from web.auth import require_technician
from web.context import ctx
from web.errors import ApiError
from web.openapi import doc
from web.reports import RANGES, Item, Window, count_series, counts, revenue_series, window

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


def read_items(start: dt.datetime, end: dt.datetime) -> list[Item]:
    """Event-log items the devices timed in [start, end) (aware instants)."""
    lo, hi = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    q = tuple_rows(EventLogItem.select(EventLogItem.device, EventLogItem.type, EventLogItem.status,
                                       EventLogItem.timestamp_ms, EventLogItem.bank, EventLogItem.coin,
                                       EventLogItem.qr_net_amount)
                   .where((EventLogItem.timestamp_ms >= lo) & (EventLogItem.timestamp_ms < hi)))
    return [Item(device, kind, status, ms, counts(bank), counts(coin), qr or 0)
            for device, kind, status, ms, bank, coin, qr in q]


def read_sessions(start: dt.datetime, end: dt.datetime) -> list[tuple[str, dt.datetime, str | None]]:
    """(bay id, start time, error code) of the wash sessions started in [start, end)."""
    q = tuple_rows(WashSession.select(WashSession.bay, WashSession.start_time, WashSession.error_code)
                   .where((WashSession.start_time >= _naive(start)) & (WashSession.start_time < _naive(end))))
    return [(bay, at, code) for bay, at, code in q]


def money_series(range_name: str, w: Window) -> dict[str, Any]:
    """The document of `GET /api/v1/reports/money` for window `w`. Every configured bay has a
    sessions series (zeros when idle), so the chart's legend does not change with the data."""
    sessions = read_sessions(w.start, w.end)
    per_bay = count_series(w, ((bay, at) for bay, at, _ in sessions))
    bays = {b.id: b.name or b.id for b in ctx().config.bays}
    for bay in bays:
        per_bay.setdefault(bay, [0] * len(w))
    return {"range": range_name, "timezone": w.zone.key, "bucket": w.bucket, "x": w.xs(),
            "revenue": revenue_series(w, read_items(w.start, w.end)),
            "sessions": dict(sorted(per_bay.items())),
            "errors": count_series(w, ((code, at) for _, at, code in sessions if code)),
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
