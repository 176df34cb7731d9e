"""The store: pragmas, forward migrations (from empty and from the previous version), models."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from peewee import SqliteDatabase

from gateway.clock import utc_now
from gateway.store import LATEST, SchemaError, current_version, migrate, open_database, schema_status, write_tx
from gateway.store.migrations import MIGRATIONS
from gateway.store.models import MODELS, Device, OutboxEvent, SchemaVersion


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


def test_migrate_from_empty(db: SqliteDatabase) -> None:
    assert current_version(db) == 0
    assert schema_status(db) == (False, 0)
    assert migrate(db) == [m.version for m in MIGRATIONS]
    assert schema_status(db) == (True, LATEST)
    assert migrate(db) == []  # idempotent
    assert [r.version for r in SchemaVersion.select().order_by(SchemaVersion.version)] == list(range(1, LATEST + 1))


def test_migrate_from_previous_version_keeps_rows(db: SqliteDatabase) -> None:
    assert migrate(db, target=LATEST - 1) == list(range(1, LATEST))
    assert current_version(db) == LATEST - 1
    now = utc_now()
    db.execute_sql(
        'INSERT INTO "device" ("device_id","chip_id","mac_address","device_type","firmware_version","registered_at")'
        " VALUES (?,?,?,?,?,?)", ("dev-24ab3c91", "24AB3C91", "24:6F:28:AB:3C:91", "CAR_WASH", "car_wash_v1.00", now))
    db.execute_sql(
        'INSERT INTO "outbox_event" ("event_id","type","occurred_at","payload","size") VALUES (?,?,?,?,?)',
        ("e1", "device.registered", "2026-01-01T00:00:00.000Z", "{}", 2))
    assert migrate(db) == [LATEST]
    dev = Device.get_by_id("dev-24ab3c91")
    assert (dev.chip_id, dev.claimed, dev.online) == ("24AB3C91", False, False)
    ev = OutboxEvent.get(OutboxEvent.event_id == "e1")
    assert (ev.state, ev.attempts, ev.coalesce_key) == ("pending", 0, None)


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
                    conn.execute_sql('INSERT INTO "outbox_event" ("event_id","type","occurred_at","payload","size")'
                                     " VALUES (?,?,?,?,?)", (f"{n}-{i}-{count}", "t", "x", "{}", 2))
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
