"""The store: pragmas, forward migrations (from empty and from the previous version), models."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from peewee import IntegrityError, SqliteDatabase

from gateway.clock import utc_now
from gateway.config import CloudConfig, Config, OutboxConfig, SiteConfig
from gateway.devices.registry import upload_logs
from gateway.devices.validate import log_upload
from gateway.store import LATEST, SchemaError, current_version, migrate, open_database, schema_status, write_tx
from gateway.store.migrations import MIGRATIONS
from gateway.store.models import MODELS, Device, EventLogItem, OutboxEvent, SchemaVersion
from gateway.store.outbox import add_event, state_is, stored_events
from gateway.uplink import OutboxDrainer


@pytest.fixture
def db(tmp_path: Path):
    d = open_database(tmp_path / "g.db")
    yield d
    d.close()


def test_pragmas(db: SqliteDatabase) -> None:
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert db.execute_sql("PRAGMA page_size").fetchone()[0] == 1024  # a new database


def test_an_existing_database_keeps_its_page_size(tmp_path: Path) -> None:
    import sqlite3

    con = sqlite3.connect(tmp_path / "old.db")
    con.execute("PRAGMA page_size = 4096")
    con.execute("PRAGMA journal_mode = wal")
    con.execute("CREATE TABLE t (x)")
    con.close()
    d = open_database(tmp_path / "old.db")
    try:
        assert d.execute_sql("PRAGMA page_size").fetchone()[0] == 4096
        assert d.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert migrate(d) == [m.version for m in MIGRATIONS]
    finally:
        d.close()


def test_migrate_from_empty(db: SqliteDatabase) -> None:
    assert current_version(db) == 0
    assert schema_status(db) == (False, 0)
    assert migrate(db) == [m.version for m in MIGRATIONS]
    assert schema_status(db) == (True, LATEST)
    assert migrate(db) == []  # idempotent
    assert [r.version for r in SchemaVersion.select().order_by(SchemaVersion.version)] == list(range(1, LATEST + 1))


def test_migrate_from_version_2_keeps_rows(db: SqliteDatabase) -> None:
    assert migrate(db, target=2) == [1, 2]
    assert current_version(db) == 2
    now = utc_now()
    db.execute_sql(
        'INSERT INTO "device" ("device_id","chip_id","mac_address","device_type","firmware_version","registered_at")'
        " VALUES (?,?,?,?,?,?)", ("dev-24ab3c91", "24AB3C91", "24:6F:28:AB:3C:91", "CAR_WASH", "car_wash_v1.00", now))
    db.execute_sql(
        'INSERT INTO "outbox_event" ("event_id","type","occurred_at","payload","size") VALUES (?,?,?,?,?)',
        ("e1", "device.registered", "2026-01-01T00:00:00.000Z", "{}", 2))
    assert migrate(db) == list(range(3, LATEST + 1))
    dev = Device.get_by_id("dev-24ab3c91")
    assert (dev.chip_id, dev.claimed, dev.online) == ("24AB3C91", False, False)
    ev = OutboxEvent.get(OutboxEvent.event_id == "e1")
    assert (ev.state, ev.attempts, ev.coalesce_key) == ("pending", 0, None)
    assert [(row.event_id, body) for row, body in stored_events()] == [("e1", {})]  # the payload moved (3)


def test_models_match_migrated_schema(db: SqliteDatabase) -> None:
    migrate(db)
    for model in MODELS:
        table = model._meta.table_name
        cols = {r[1]: r for r in db.execute_sql(f'PRAGMA table_info("{table}")').fetchall()}
        assert cols, f"table {table} missing"
        fields = {f.column_name: f for f in model._meta.sorted_fields}
        assert set(cols) == set(fields), f"{table}: schema {sorted(cols)} vs model {sorted(fields)}"
        for name, f in fields.items():
            notnull = bool(cols[name][3]) or bool(cols[name][5])  # NOT NULL or part of the PK
            assert notnull == (not f.null), f"{table}.{name}: NOT NULL mismatch"


def test_refuses_database_from_newer_gateway(db: SqliteDatabase) -> None:
    migrate(db)
    with write_tx(db):
        SchemaVersion.create(version=LATEST + 1, applied_at=utc_now(), description="future")
    with pytest.raises(SchemaError, match="newer"):
        migrate(db)
    assert schema_status(db) == (False, LATEST + 1)


def test_foreign_keys_enforced(db: SqliteDatabase) -> None:
    migrate(db)
    with pytest.raises(Exception, match="FOREIGN KEY"):
        with write_tx(db):
            db.execute_sql(
                'INSERT INTO "device_config" ("device_id","configs","source","reported_at") VALUES (?,?,?,?)',
                ("nobody", "{}", "sync", utc_now()))


def test_immediate_transactions_serialise_read_then_write_across_connections(tmp_path: Path) -> None:
    """Two processes' worth of connections doing read-then-write never fail with 'locked'."""
    path = tmp_path / "g.db"
    first = open_database(path)
    migrate(first)
    first.close()
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(n: int) -> None:
        conn = open_database(path, bind_models=False)  # one connection each, as separate processes
        try:
            barrier.wait(5)
            for i in range(50):
                # atomic() on our database is IMMEDIATE: the read below cannot go stale.
                with conn.atomic():
                    (count,) = conn.execute_sql('SELECT COUNT(*) FROM "outbox_event"').fetchone()
                    conn.execute_sql('INSERT INTO "outbox_event" ("event_id","type","occurred_at","size")'
                                     " VALUES (?,?,?,?)", (f"{n}-{i}-{count}", "t", "x", 2))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    check = open_database(path)
    assert OutboxEvent.select().count() == 200
    check.close()


def test_hot_queries_read_through_indexes_never_the_whole_table(db: SqliteDatabase) -> None:
    """The statements the gateway runs on its two big tables (the outbox: 7 days of events; the
    device event logs: forever), captured as they execute, are planned on an index: an upload's
    duplicate check, the coalescing delete, the drainer's queue, marks and housekeeping, the
    technician's dead letters. A full scan of either table is a failure."""
    migrate(db)
    with write_tx(db):
        Device.create(device_id="device-24ab3c91", chip_id="24AB3C91", mac_address="24:6F:28:AB:3C:91",
                      device_type="CAR_WASH", firmware_version="car_wash_v1.00", registered_at=utc_now())
    body = {"device_id": "device-24ab3c91",
            "items": [{"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": 1_760_000_000_000 + i, "total_amount": 20,
                       "bank": {"20": 1}, "coin": {}} for i in range(10)]}
    dev, items = log_upload(body)
    config = Config(site=SiteConfig(id="site-1"), cloud=CloudConfig(url="http://127.0.0.1:9"),
                    outbox=OutboxConfig(mark_sent_delay_sec=300))
    drainer = OutboxDrainer(config, "key", db)
    captured: list[str] = []
    db.connection().set_trace_callback(captured.append)  # expanded SQL, as executed
    try:
        assert upload_logs(db, dev, items, site_id="site-1").stored == 10
        assert upload_logs(db, dev, items, site_id="site-1").stored == 0  # every item known
        for n in range(2):
            with write_tx(db):
                add_event("wash.status", {"n": n}, site_id="site-1", partition="bay:bay1",
                          coalesce_key="wash.status:bay1")
        rows, _ = drainer._fetch()
        drainer._mark_sent(rows)
        assert drainer.write_marks() == 2
        drainer.housekeeping()
        list(OutboxEvent.select().where(state_is("dead")).order_by(OutboxEvent.seq.desc()).limit(100))
        OutboxEvent.select().where(state_is("pending")).count()
    finally:
        db.connection().set_trace_callback(None)
    used: set[str] = set()
    checked = 0
    for sql in captured:
        if not re.search(r'"(outbox_event|event_log_item)"', sql) or sql.lstrip().upper().startswith(
                ("INSERT", "BEGIN", "COMMIT", "SAVEPOINT", "RELEASE")):
            continue
        plan = [row[3] for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql).fetchall()]
        checked += 1
        scans = [line for line in plan if re.fullmatch(r"SCAN \w+", line)]
        assert not scans, f"full table scan: {sql}\n{plan}"
        used.update(re.findall(r"INDEX (\w+)", " ".join(plan)))
    assert checked >= 8
    assert {"event_log_item_device_time_key", "outbox_event_coalesce_pending", "outbox_event_pending",
            "outbox_event_dead", "outbox_event_sent"} <= used, used


def test_event_log_items_stay_unique_per_device_after_migration_3(db: SqliteDatabase) -> None:
    migrate(db)
    now = utc_now()
    with write_tx(db):
        Device.create(device_id="device-1", chip_id="1", mac_address="m", device_type="CAR_WASH",
                      firmware_version="v", registered_at=now)
    row = {"device": "device-1", "dedup_key": "k", "type": "PAYMENT", "status": "SUCCESS", "timestamp_ms": 1,
           "total_amount": 20, "received_at": now}
    with write_tx(db):
        EventLogItem.insert(row).execute()
    with pytest.raises(IntegrityError), write_tx(db):
        EventLogItem.insert(row).execute()


def test_migration_4_shortens_dedup_keys_and_re_uploads_still_match(db: SqliteDatabase) -> None:
    migrate(db, target=3)
    now = utc_now()
    with write_tx(db):
        Device.create(device_id="device-1", chip_id="1", mac_address="m", device_type="CAR_WASH",
                      firmware_version="v", registered_at=now)
    body = {"device_id": "device-1", "items": [
        {"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": 1_760_000_000_000 + i, "total_amount": 20,
         "bank": {"20": 1}, "coin": {}} for i in range(3)]}
    dev, items = log_upload(body)
    # Version 3 stored the whole digest, whose first 16 digits are today's key.
    old_keys = [_full_digest(it, dev) for it in items]
    for it, key in zip(items[:2], old_keys, strict=False):
        db.execute_sql(
            'INSERT INTO "event_log_item" ("device_id","dedup_key","type","status","timestamp_ms","total_amount",'
            '"amount_mismatch","received_at") VALUES (?,?,?,?,?,?,0,?)',
            (dev, key, it.type, it.status, it.timestamp_ms, it.total_amount, now))
    assert migrate(db, target=4) == [4]
    assert sorted(k for (k,) in db.execute_sql('SELECT "dedup_key" FROM "event_log_item"')) == sorted(
        k[:16] for k in old_keys[:2])
    r = upload_logs(db, dev, items, site_id="site-1")  # two known from before the migration, one new
    assert (r.length, r.stored) == (3, 1)
    assert EventLogItem.select().count() == 3


def test_migration_4_stores_sent_at_in_epoch_seconds(db: SqliteDatabase) -> None:
    migrate(db, target=3)
    for seq, sent_at in ((1, "2026-12-03 22:04:17.654321"), (2, None)):
        db.execute_sql('INSERT INTO "outbox_event" ("seq","event_id","type","occurred_at","size","state","sent_at")'
                       " VALUES (?,?,?,?,?,?,?)", (seq, f"e{seq}", "wash.status", "x", 2,
                                                   "sent" if sent_at else "pending", sent_at))
    assert migrate(db, target=4) == [4]
    assert db.execute_sql('SELECT "sent_at", typeof("sent_at") FROM "outbox_event" ORDER BY "seq"').fetchall() == [
        (1_796_335_457, "integer"), (None, "null")]
    assert OutboxEvent.get_by_id(1).sent_at == dt.datetime(2026, 12, 3, 22, 4, 17)  # naive UTC, as before
    assert OutboxEvent.get_by_id(2).sent_at is None


def _full_digest(it: Any, device: str) -> str:
    """The key as migrations 1-3 stored it (the whole SHA-256 of the same identity)."""
    ident = json.dumps([device, it.timestamp_ms, it.type, it.status, it.total_amount, it.qr_charge_id,
                        it.qr_net_amount, sorted(it.bank.items()), sorted(it.coin.items())], separators=(",", ":"))
    return hashlib.sha256(ident.encode()).hexdigest()


def test_long_payloads_stored_compressed_short_ones_as_text(db: SqliteDatabase) -> None:
    migrate(db)
    items = [{"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": 1_760_000_000_000 + i, "total_amount": 40,
              "bank": {"20": 2, "50": 0, "100": 0, "500": 0, "1000": 0}, "coin": {"1": 0, "2": 0, "5": 0, "10": 0},
              "dedup_key": f"{i:064x}"} for i in range(10)]
    with write_tx(db):
        add_event("device.event_logs", {"device_id": "device-1", "items": items}, site_id="site-1")
        add_event("wash.status", {"bayId": "bay1", "state": "IDLE"}, site_id="site-1")
    stored = [v for (v,) in db.execute_sql('SELECT "payload" FROM "outbox_payload" ORDER BY "seq"')]
    (logs, logs_body), (status, status_body) = stored_events()
    assert isinstance(stored[0], bytes) and len(stored[0]) * 3 < logs.size  # an upload's items: a third or less
    assert isinstance(stored[1], str) and len(stored[1].encode()) == status.size
    assert logs_body["payload"]["items"] == items and status_body["payload"]["state"] == "IDLE"
