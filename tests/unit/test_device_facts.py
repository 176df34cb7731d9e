"""`registry.report_configs` with prepared statements (issue #20: a restart storm brings every
device's startup document to the web's one writer thread): the rows and events the Peewee
version stored, value for value."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from peewee import SqliteDatabase

from gateway.devices import registry, validate
from gateway.store import migrate, open_database, write_tx
from gateway.store.models import Device
from gateway.store.outbox import stored_events

NOW = dt.datetime(2026, 12, 7, 3, 50, 1, 123456)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    d = open_database(tmp_path / "g.db")
    migrate(d)
    with write_tx(d):
        Device.create(device_id="device-1", chip_id="1", mac_address="x", device_type="CAR_WASH",
                      firmware_version="f", registered_at=NOW)
    monkeypatch.setattr(registry, "utc_now", lambda: NOW)
    yield d
    d.close()


def _rows(db: SqliteDatabase, table: str, columns: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.execute_sql(f'SELECT {columns} FROM "{table}" ORDER BY 1')]


def test_startup_shutdown_and_sync_store_what_they_stored(db: SqliteDatabase) -> None:
    at = "2026-12-07 03:50:01.123456"
    for body in ({"topic_request": "startup", "device_id": "device-1", "device_status": "NORMAL",
                  "payload": {"configs": {"a": "ข", "b": [1, None]}}, "timestamp": 1},
                 {"topic_request": "shutdown", "device_id": "device-1", "payload": {"configs": {}}}):
        life = validate.lifecycle(body)
        with write_tx(db):
            registry.report_configs(db, "device-1", life.configs, site_id="s", lifecycle=life)
    assert _rows(db, "device", '"online", "status", "last_seen_at"') == [(0, "NORMAL", at)]
    with write_tx(db):
        registry.report_configs(db, "device-1", {"x": 1}, site_id="s")
    assert _rows(db, "device_config", '"id", "device_id", "configs", "source", "reported_at"') == [
        (1, "device-1", '{"a": "ข", "b": [1, null]}', "startup", at), (2, "device-1", "{}", "shutdown", at),
        (3, "device-1", '{"x": 1}', "sync", at)]
    assert _rows(db, "device_lifecycle_event", '"id", "kind", "at", "detail"') == [
        (1, "startup", at, json.dumps({"device_status": "NORMAL", "timestamp": 1})),
        (2, "shutdown", at, json.dumps({"device_status": None, "timestamp": None}))]
    events = [(row.type, row.partition, body["payload"]) for row, body in stored_events()]
    at_z = "2026-12-07T03:50:01.123Z"
    assert events == [
        ("device.lifecycle", "device-1", {"device_id": "device-1", "event": "startup", "device_status": "NORMAL",
                                          "device_timestamp": 1, "at": at_z}),
        ("device.configs_reported", "device-1", {"device_id": "device-1", "source": "startup",
                                                 "configs": {"a": "ข", "b": [1, None]}, "at": at_z}),
        ("device.lifecycle", "device-1", {"device_id": "device-1", "event": "shutdown", "device_status": None,
                                          "device_timestamp": None, "at": at_z}),
        ("device.configs_reported", "device-1", {"device_id": "device-1", "source": "shutdown", "configs": {},
                                                 "at": at_z}),
        ("device.configs_reported", "device-1", {"device_id": "device-1", "source": "sync", "configs": {"x": 1},
                                                 "at": at_z})]
    with pytest.raises(registry.DeviceNotFound), write_tx(db):
        registry.report_configs(db, "device-2", {}, site_id="s")
