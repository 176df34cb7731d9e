"""CSV exports and the Money chart series against the database (Flask's test client, a real
SQLite file): each export opened as Excel would (UTF-8 BOM, Thai intact), its rows checked
against the database read with plain sqlite3, day edges at the site's midnight, keyset pages
joined without loss, auth and range errors."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import sqlite3
import zoneinfo
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from gateway.config import load_config, load_secrets
from gateway.store import migrate, open_database
from gateway.store.models import Bay, Device, EventLogItem, Payment, WashSession
from sim.demo import ensure_demo_user, free_port, write_demo_site
from web import exports
from web.app import create_app

ZONE = zoneinfo.ZoneInfo("Asia/Bangkok")  # the demo site's zone
THAI_NAME = "ตู้หน้าร้าน"
FORMULA = '=HYPERLINK("http://evil.example","pay")'  # a device's description a spreadsheet must not run


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[FlaskClient, str, dt.date]]:
    """A demo-configured app over a database seeded around day D (three days ago, so the 7-day
    chart holds it): the test client, the database path and D."""
    cfg_path = write_demo_site(tmp_path, web_port=free_port(), mqtt_port=free_port())
    cfg = load_config(cfg_path)
    db = open_database(cfg.paths.database)
    migrate(db)
    day = dt.datetime.now(ZONE).date() - dt.timedelta(days=3)
    with db.atomic():
        _seed(day)
    db.close()
    ensure_demo_user(cfg_path)
    app = create_app(cfg, load_secrets(cfg))
    app.extensions["carwash"].start(connect_bus=False)
    try:
        yield app.test_client(), str(cfg.paths.database), day
    finally:
        app.extensions["carwash"].stop()


def local(day: dt.date, h: int = 0, mi: int = 0, s: int = 0) -> dt.datetime:
    """Naive UTC (as stored) of a site-local time on `day`."""
    return dt.datetime.combine(day, dt.time(h, mi, s), ZONE).astimezone(dt.UTC).replace(tzinfo=None)


def _seed(d: dt.date) -> None:
    now = local(d)
    for dev, name in (("dev-a", THAI_NAME), ("dev-b", None)):
        Device.create(device_id=dev, chip_id=dev, mac_address="00:00:00:00:00:00", device_type="CAR_WASH",
                      firmware_version="1.0.0", name=name, claimed=True, registered_at=now)
    for bay in ("bay1", "bay2"):
        Bay.create(bay_id=bay, name=bay, state="IDLE", updated_at=now)
    next_day, after = d + dt.timedelta(days=1), d + dt.timedelta(days=2)
    sessions = [  # (id, bay, start, end, state, error)
        ("in-first", "bay1", local(d), local(d, 0, 5), "DONE", None),  # the first instant of the range
        ("in-error", "bay2", local(d, 13), None, "ERROR", "E_PUMP"),
        ("in-last", "bay1", local(next_day, 23, 59, 59), local(after, 0, 4), "DONE", None),
        ("out-before", "bay1", local(d) - dt.timedelta(seconds=1), local(d, 0, 4), "DONE", None),
        ("out-after", "bay2", local(after), None, "STARTING", None),
    ]
    for i, (sid, bay, start, end, state, error) in enumerate(sessions):
        WashSession.create(session_id=sid, bay=bay, local_day=start.strftime("%Y%m%d"), seq=i, course="BASIC",
                           state=state, error_code=error, request_id=f"req-{i}", start_time=start, end_time=end)

    def ms(t: dt.datetime) -> int:
        return int(t.replace(tzinfo=dt.UTC).timestamp() * 1000)

    items = [  # (device, type, status, time, total, qr id, qr net, bank, coin)
        ("dev-a", "PAYMENT", "SUCCEEDED", local(d, 8), 175, None, 0, {"20": 2, "100": 1}, {"10": 3, "5": 1}),
        ("dev-a", "PAYMENT", "SUCCEEDED", local(d, 9), 50, "chg-1", 50, {}, {}),
        ("dev-b", "PAYMENT", "FAILED", local(next_day, 10), 80, "chg-2", 80, {}, {}),
        ("dev-b", "DOOR_OPEN", "SUCCEEDED", local(next_day, 11), 0, None, None, None, None),
        ("dev-b", "PAYMENT", "SUCCEEDED", local(after, 0), 20, None, 0, {"20": 1}, {}),  # outside
    ]
    items += [("dev-b", "PAYMENT", "SUCCEEDED", local(next_day, 12, i), 10, None, 0, {}, {"10": 1}) for i in range(5)]
    for i, (dev, kind, status, t, total, qr_id, qr, bank, coin) in enumerate(items):
        EventLogItem.create(device=dev, dedup_key=f"k{i}", type=kind, status=status, timestamp_ms=ms(t),
                            total_amount=total, qr_charge_id=qr_id, qr_net_amount=qr,
                            bank=None if bank is None else json.dumps(bank),
                            coin=None if coin is None else json.dumps(coin), received_at=local(after, 1))
    for cid, satang, t, text in (("chg-1", 5000, local(d, 9), "ล้างรถ"), ("chg-3", 12345, local(next_day, 22), FORMULA),
                                 ("chg-out", 100, local(after, 0, 1), "")):
        Payment.create(charge_id=cid, device="dev-a", amount_satang=satang, payment_method="QR_PROMPT_PAY",
                       description=text, status="SUCCEEDED", created_at=t, updated_at=t)


def download(client: FlaskClient, kind: str, d: dt.date, **headers: str) -> list[dict[str, str]]:
    """An export of days D and D+1 as Excel reads it: BOM, then UTF-8 CSV with a header row."""
    r = client.get(f"/api/v1/exports/{kind}.csv?from={d}&to={d + dt.timedelta(days=1)}", headers=headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert r.headers["Content-Disposition"] == (f'attachment; filename="{kind}_{d}_{d + dt.timedelta(days=1)}.csv"')
    raw = r.get_data()
    assert raw.startswith(b"\xef\xbb\xbf") and b"\r\n" in raw
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))


def rows_of(db_path: str, sql: str, *args: object) -> list[sqlite3.Row]:
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def login(client: FlaskClient) -> None:
    client.get("/login")
    csrf = client.get_cookie("cw_csrf").value
    assert client.post("/login", data={"username": "demo", "password": "demo", "csrf": csrf}).status_code == 302


def utc_of(local_iso: str) -> str:
    """A CSV instant (site zone, with offset) as the database's naive UTC text."""
    t = dt.datetime.fromisoformat(local_iso)
    assert t.utcoffset() == dt.timedelta(hours=7), local_iso
    return t.astimezone(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")


def test_exports_match_the_database(site: tuple[FlaskClient, str, dt.date], monkeypatch: pytest.MonkeyPatch) -> None:
    client, db_path, d = site
    monkeypatch.setattr(exports, "PAGE_ROWS", 2)  # several keyset pages per export
    login(client)  # the page's session; the Bearer token is checked below
    lo, hi = local(d).isoformat(sep=" "), local(d + dt.timedelta(days=2)).isoformat(sep=" ")

    sessions = download(client, "sessions", d)
    assert [r["session_id"] for r in sessions] == ["in-first", "in-error", "in-last"]  # the day edges
    db = rows_of(db_path, 'SELECT * FROM "wash_session" WHERE "start_time" >= ? AND "start_time" < ? ORDER BY "id"',
                 lo, hi)
    assert list(sessions[0]) == exports.SESSION_COLUMNS
    for row, want in zip(sessions, db, strict=True):
        assert (row["session_id"], row["bay_id"], row["state"], row["course"], row["request_id"]) == (
            want["session_id"], want["bay_id"], want["state"], want["course"], want["request_id"])
        assert row["error_code"] == (want["error_code"] or "")
        assert utc_of(row["start_time"]) == want["start_time"]
        assert (utc_of(row["end_time"]) if row["end_time"] else None) == want["end_time"]
    assert sessions[0]["start_time"] == f"{d}T00:00:00+07:00" and sessions[0]["duration_s"] == "300"

    lo_ms, hi_ms = (int(dt.datetime.fromisoformat(x).replace(tzinfo=dt.UTC).timestamp() * 1000) for x in (lo, hi))
    items = rows_of(db_path, 'SELECT * FROM "event_log_item" WHERE "timestamp_ms" >= ? AND "timestamp_ms" < ? '
                    'ORDER BY "id"', lo_ms, hi_ms)
    payments = download(client, "payments", d)
    paid = [i for i in items if i["type"] == "PAYMENT"]
    assert len(payments) == len(paid) == 8
    for row, want in zip(payments, paid, strict=True):
        bank, coin = json.loads(want["bank"]), json.loads(want["coin"])
        assert row["device_id"] == want["device_id"] and row["status"] == want["status"]
        assert int(row["total_baht"]) == want["total_amount"]
        assert int(row["cash_baht"]) == (sum(int(k) * v for k, v in bank.items())
                                         + sum(int(k) * v for k, v in coin.items()))
        for n in ("20", "50", "100", "500", "1000"):
            assert int(row[f"note_{n}"]) == bank.get(n, 0)
        for c in ("1", "2", "5", "10"):
            assert int(row[f"coin_{c}"]) == coin.get(c, 0)
        assert row["qr_charge_id"] == (want["qr_charge_id"] or "") and int(row["qr_net_baht"]) == want["qr_net_amount"]
        stamp = dt.datetime.fromisoformat(row["time"])
        assert int(stamp.timestamp() * 1000) == want["timestamp_ms"] and stamp.utcoffset() == dt.timedelta(hours=7)
    assert payments[0]["device_name"] == THAI_NAME and payments[0]["cash_baht"] == "175"

    logs = download(client, "event-logs", d)
    assert [int(r["id"]) for r in logs] == [i["id"] for i in items] and len(items) == 9
    door = next(r for r in logs if r["type"] == "DOOR_OPEN")
    assert (door["bank"], door["qr_net_baht"]) == ("{}", "")

    charges = download(client, "qr-charges", d, Authorization="Bearer " + token(client))
    db_charges = rows_of(db_path, 'SELECT * FROM "payment" WHERE "created_at" >= ? AND "created_at" < ? '
                         'ORDER BY "created_at", "charge_id"', lo, hi)
    assert [r["charge_id"] for r in charges] == [c["charge_id"] for c in db_charges] == ["chg-1", "chg-3"]
    for row, want in zip(charges, db_charges, strict=True):
        assert Decimal(row["amount_baht"]) * 100 == want["amount_satang"]
        assert utc_of(row["created_at"]) == want["created_at"]
    assert charges[0]["description"] == "ล้างรถ" and charges[1]["description"] == "'" + FORMULA  # kept as text
    assert charges[1]["amount_baht"] == "123.45"


def token(client: FlaskClient) -> str:
    r = client.post("/api/v1/auth/login", json={"username": "demo", "password": "demo"})
    return str(r.get_json()["data"]["token"])


def test_exports_refuse_without_a_technician_and_with_a_bad_range(site: tuple[FlaskClient, str, dt.date]) -> None:
    client, _, d = site
    for kind in exports.KINDS:
        r = client.get(f"/api/v1/exports/{kind}.csv")
        assert r.status_code == 401 and r.get_json()["errorCode"] == "UNAUTHORIZED"
    login(client)
    for query in (f"from={d}&to={d - dt.timedelta(days=1)}", "from=yesterday", f"from={d - dt.timedelta(days=400)}"):
        r = client.get(f"/api/v1/exports/sessions.csv?{query}")
        assert r.status_code == 400 and r.get_json()["errorCode"] == "VALIDATION_FAILED", query
    # Default range: today, a header row only.
    r = client.get("/api/v1/exports/payments.csv")
    assert r.status_code == 200 and r.get_data().decode("utf-8-sig").count("\r\n") == 1


def test_chart_series_match_the_database(site: tuple[FlaskClient, str, dt.date]) -> None:
    client, _, d = site
    assert client.get("/api/v1/reports/money").status_code == 401
    login(client)
    assert client.get("/api/v1/reports/money?range=1y").status_code == 400
    data = client.get("/api/v1/reports/money?range=7d").get_json()["data"]
    assert data["timezone"] == "Asia/Bangkok" and data["bucket"] == "day" and len(data["x"]) == 7
    i = data["x"].index(int(dt.datetime.combine(d, dt.time(), ZONE).timestamp()))  # the site's midnight of D
    assert data["revenue"]["cash"][i] == 175 and data["revenue"]["qr"][i] == 50
    assert data["revenue"]["cash"][i + 1] == 50 and data["revenue"]["qr"][i + 1] == 0  # the FAILED QR left out
    assert data["revenue"]["cash"][i + 2] == 20
    assert data["sessions"]["bay1"][i] == 1 and data["sessions"]["bay1"][i + 1] == 1
    assert data["sessions"]["bay1"][i - 1] == 1 and data["sessions"]["bay2"][i + 2] == 1
    assert data["errors"] == {"E_PUMP": [1 if j == i else 0 for j in range(7)]}
    assert set(data["sessions"]) == {"bay1", "bay2"}  # this site configures no bays: the ones with sessions
    # The page's table: per device and site day, from the same summed rows.
    html = client.get("/money").get_data(as_text=True)
    assert f"<td>{d}</td><td>dev-a</td><td>175</td>" in html
    assert f"<td>{d + dt.timedelta(days=1)}</td><td>dev-b</td><td>50</td>" in html
    hourly = client.get("/api/v1/reports/money?range=today").get_json()["data"]
    assert hourly["bucket"] == "hour" and len(hourly["x"]) == 24 and len(hourly["revenue"]["cash"]) == 24
