"""CSV exports for accountants and owners: `GET /api/v1/exports/{kind}.csv?from=YYYY-MM-DD&to=YYYY-MM-DD`.

Kinds: `sessions` (wash sessions), `payments` (payments the devices reported: cash by
denomination and QR), `qr-charges` (the QR charges created through the gateway) and
`event-logs` (every uploaded device event-log item). `from`/`to` are the site's days, both
included (default: today; at most 366 days). Each file is UTF-8 with a BOM (Excel then reads
Thai right), a header row, CRLF lines, instants as ISO 8601 in the site's zone with the offset.
Amounts are baht: event-log amounts are whole baht as the devices send them; QR charges are kept
in satang and written as baht with two decimals. Rows are in the order the gateway stored them.
Text that a spreadsheet would take for a formula (`=`, `+`, `-`, `@` first) gets a leading `'`.

Rows are read in pages of `PAGE_ROWS` by primary key, each page its own short read, so a long
download never holds a read transaction open (that would stop WAL checkpoints).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, request, stream_with_context
from peewee import Tuple

from gateway.store.models import Device, EventLogItem, Payment, WashSession, tuple_rows
from web.auth import require_technician
from web.charts import site_zone
from web.errors import ApiError
from web.openapi import doc
from web.reports import (
    BANKNOTES,
    COINS,
    MAX_EXPORT_DAYS,
    baht_of_satang,
    cash_baht,
    counts,
    local_iso,
    local_midnight,
    parse_days,
)

bp = Blueprint("exports", __name__)

BOM = "\ufeff"
PAGE_ROWS = 1000
KINDS = ("sessions", "payments", "qr-charges", "event-logs")
RANGE_PARAMS = {
    "from": {"type": "string", "format": "date", "description": "first site day (YYYY-MM-DD), default today"},
    "to": {"type": "string", "format": "date", "description": f"last site day, included; at most {MAX_EXPORT_DAYS} "
                                                              "days after from; default today"},
}
SESSION_COLUMNS = ["session_id", "bay_id", "course", "state", "error_code", "request_id", "start_time", "end_time",
                   "duration_s"]
PAYMENT_COLUMNS = (["time", "device_id", "device_name", "status", "total_baht", "cash_baht"]
                   + [f"note_{n}" for n in BANKNOTES] + [f"coin_{c}" for c in COINS]
                   + ["qr_charge_id", "qr_net_baht", "amount_mismatch"])
CHARGE_COLUMNS = ["created_at", "charge_id", "device_id", "device_name", "amount_baht", "payment_method", "status",
                  "reference_id", "description", "updated_at"]
EVENT_LOG_COLUMNS = ["time", "received_at", "device_id", "device_name", "type", "status", "total_amount_baht",
                     "qr_charge_id", "qr_net_baht", "bank", "coin", "amount_mismatch", "id"]


def _range() -> tuple[dt.datetime, dt.datetime, str]:
    """The request's days as [start, end) aware instants and the file name's date part."""
    zone = site_zone()
    try:
        first, last = parse_days(request.args.get("from"), request.args.get("to"), dt.datetime.now(zone).date())
    except ValueError as exc:
        raise ApiError(400, "VALIDATION_FAILED", str(exc)) from None
    return (local_midnight(first, zone), local_midnight(last + dt.timedelta(days=1), zone),
            f"{first.isoformat()}_{last.isoformat()}")


def _naive(instant: dt.datetime) -> dt.datetime:
    return instant.astimezone(dt.UTC).replace(tzinfo=None)


def _pages(query: Any, key: Any) -> Iterator[Any]:
    """Rows of `query` in `key` order, PAGE_ROWS per short read (keyset pagination)."""
    last: Any = None
    while True:
        q = query if last is None else query.where(key > last)
        rows = list(q.order_by(key).limit(PAGE_ROWS))
        yield from rows
        if len(rows) < PAGE_ROWS:
            return
        last = getattr(rows[-1], key.name)


def _names() -> dict[str, str]:
    return {d: n or "" for d, n in tuple_rows(Device.select(Device.device_id, Device.name))}


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def cell(value: Any) -> Any:
    """A text cell a spreadsheet would run as a formula (device names, descriptions and ids come
    from devices and technicians) gets a leading apostrophe, as OWASP advises; numbers and all
    other text are written as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value


def _csv(name: str, header: list[str], rows: Callable[[], Iterator[list[Any]]]) -> Response:
    """A streamed CSV download: BOM, header, then `rows()` (called once the response starts)."""

    def body() -> Iterator[str]:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\r\n")

        def take() -> str:
            text = buf.getvalue()
            buf.seek(0)
            buf.truncate()
            return text

        out.writerow(header)
        yield BOM + take()
        for i, row in enumerate(rows(), 1):
            out.writerow([cell(v) for v in row])
            if i % 200 == 0:  # chunks of a few kB rather than a write per row
                yield take()
        yield take()

    resp = Response(stream_with_context(body()), mimetype="text/csv")
    resp.headers["Content-Type"] = "text/csv; charset=utf-8"
    resp.headers["Content-Disposition"] = f'attachment; filename="{name}.csv"'
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _doc(what: str) -> Any:
    return doc(f"CSV export (UTF-8 with BOM): {what}, for the site days from..to", tags=("exports",),
               response={"type": "string"}, content_type="text/csv", errors=(400, 401), security="bearer",
               params=RANGE_PARAMS)


@bp.get("/api/v1/exports/sessions.csv")
@_doc("wash sessions started in the range")
def sessions_csv() -> Response:
    require_technician()
    start, end, days = _range()
    zone = site_zone()
    query = WashSession.select().where((WashSession.start_time >= _naive(start))
                                       & (WashSession.start_time < _naive(end)))

    def rows() -> Iterator[list[Any]]:
        for s in _pages(query, WashSession.id):
            duration = int((s.end_time - s.start_time).total_seconds()) if s.end_time else ""
            yield [s.session_id, s.bay_id, s.course or "", s.state, s.error_code or "", s.request_id or "",
                   local_iso(s.start_time, zone), local_iso(s.end_time, zone), duration]

    return _csv(f"sessions_{days}", SESSION_COLUMNS, rows)


def _items(start: dt.datetime, end: dt.datetime, payments_only: bool) -> Any:
    lo, hi = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    cond = (EventLogItem.timestamp_ms >= lo) & (EventLogItem.timestamp_ms < hi)
    if payments_only:
        cond &= EventLogItem.type == "PAYMENT"
    return EventLogItem.select().where(cond)


def _ms_iso(ms: int, zone: Any) -> str:
    return local_iso(dt.datetime.fromtimestamp(ms / 1000, dt.UTC), zone)


@bp.get("/api/v1/exports/payments.csv")
@_doc("payments the devices reported (cash by denomination, QR), by the device's time of payment")
def payments_csv() -> Response:
    require_technician()
    start, end, days = _range()
    zone, names = site_zone(), _names()
    query = _items(start, end, payments_only=True)

    def rows() -> Iterator[list[Any]]:
        for it in _pages(query, EventLogItem.id):
            bank, coin = counts(it.bank), counts(it.coin)
            yield ([_ms_iso(it.timestamp_ms, zone), it.device_id, names.get(it.device_id, ""), it.status,
                    it.total_amount, cash_baht(bank, coin)]
                   + [bank.get(str(n), 0) for n in BANKNOTES] + [coin.get(str(c), 0) for c in COINS]
                   + [it.qr_charge_id or "", it.qr_net_amount or 0, int(it.amount_mismatch)])

    return _csv(f"payments_{days}", PAYMENT_COLUMNS, rows)


@bp.get("/api/v1/exports/qr-charges.csv")
@_doc("QR charges created through the gateway (amount in baht)")
def qr_charges_csv() -> Response:
    require_technician()
    start, end, days = _range()
    zone, names = site_zone(), _names()
    query = Payment.select().where((Payment.created_at >= _naive(start)) & (Payment.created_at < _naive(end)))
    key = Tuple(Payment.created_at, Payment.charge_id)

    def rows() -> Iterator[list[Any]]:
        last: tuple[dt.datetime, str] | None = None
        while True:  # keyset pages on (created_at, charge_id): the key is text, not a rowid
            q = query if last is None else query.where(key > Tuple(*last))
            page = list(q.order_by(Payment.created_at, Payment.charge_id).limit(PAGE_ROWS))
            for p in page:
                yield [local_iso(p.created_at, zone), p.charge_id, p.device_id, names.get(p.device_id, ""),
                       baht_of_satang(p.amount_satang), p.payment_method, p.status, p.reference_id or "",
                       p.description or "", local_iso(p.updated_at, zone)]
            if len(page) < PAGE_ROWS:
                return
            last = (page[-1].created_at, page[-1].charge_id)

    return _csv(f"qr-charges_{days}", CHARGE_COLUMNS, rows)


@bp.get("/api/v1/exports/event-logs.csv")
@_doc("every device event-log item (all types) timed in the range")
def event_logs_csv() -> Response:
    require_technician()
    start, end, days = _range()
    zone, names = site_zone(), _names()
    query = _items(start, end, payments_only=False)

    def rows() -> Iterator[list[Any]]:
        for it in _pages(query, EventLogItem.id):
            yield [_ms_iso(it.timestamp_ms, zone), local_iso(it.received_at, zone), it.device_id,
                   names.get(it.device_id, ""), it.type, it.status, it.total_amount, it.qr_charge_id or "",
                   "" if it.qr_net_amount is None else it.qr_net_amount,
                   json.dumps(counts(it.bank), sort_keys=True), json.dumps(counts(it.coin), sort_keys=True),
                   int(it.amount_mismatch), it.id]

    return _csv(f"event-logs_{days}", EVENT_LOG_COLUMNS, rows)
