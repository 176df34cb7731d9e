"""Per-process state of the web: config, secrets, the database and the local-broker client.

Created by `create_app` without I/O; `start()` opens the database and connects to the broker and
is called once per worker after fork (gunicorn's post_worker_init), or by tests.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from flask import Flask, current_app
from peewee import SqliteDatabase

from gateway.clock import iso_z
from gateway.config import Config, Secrets
from gateway.core.sdnotify import Notifier
from gateway.mqtt.client import BusClient
from gateway.mqtt.topics import COMMAND_EVENTS_FILTER, LIVE_FILTER, PAIRING, WASH_STATUS_FILTER
from gateway.store import open_database, schema_status
from web.live import CommandFeed, PresenceFeed, WashFeed
from web.writer import GroupWriter

log = logging.getLogger(__name__)

SCHEMA_RECHECK_SEC = 5.0
# systemd STATUS= lines of the web worker (also what the demo and tests wait for).
STATUS_CONNECTED = "serving; connected to the local broker"
STATUS_DISCONNECTED = "degraded; lost the local broker"


class WebContext:
    def __init__(self, config: Config, secrets: Secrets) -> None:
        self.config = config
        self.secrets = secrets
        self.db: SqliteDatabase | None = None
        self.writer: GroupWriter | None = None
        self.bus: BusClient | None = None
        self.feed = WashFeed()
        self.commands = CommandFeed()
        self.presence = PresenceFeed()
        self.pairing: dict[str, Any] = {"open": False, "until": None}
        self._schema_ok_until = 0.0
        self._lock = threading.Lock()

    def start(self, *, connect_bus: bool = True) -> None:
        self.db = open_database(self.config.paths.database)
        self.writer = GroupWriter(self.db)
        self.writer.start()
        if connect_bus:
            host = self.config.mqtt.bind if self.config.mqtt.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
            notifier = Notifier()
            self.bus = BusClient(host, self.config.mqtt.port, self.config.mqtt.internal_username,
                                 self.secrets.mqtt_internal_password, name="web",
                                 on_connected=lambda: self._connected(notifier),
                                 on_disconnected=lambda: _status(notifier, STATUS_DISCONNECTED))
            self.bus.on_message(WASH_STATUS_FILTER, self.feed.on_message)
            self.bus.on_message(PAIRING, self._on_pairing)
            self.bus.on_message(COMMAND_EVENTS_FILTER, self.commands.on_message)
            self.bus.on_message(LIVE_FILTER, self.presence.on_message)
            self.bus.start()

    def _connected(self, notifier: Notifier) -> None:
        self.commands.wake_all()
        _status(notifier, STATUS_CONNECTED)

    def _on_pairing(self, _topic: str, payload: bytes) -> None:
        try:
            value = json.loads(payload)
        except ValueError:
            return
        if isinstance(value, dict):
            self.pairing = value

    def pairing_open(self) -> bool:
        until = self.pairing.get("until")
        return bool(self.pairing.get("open")) and isinstance(until, str) and until > iso_z()

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.stop()
            self.writer = None
        if self.bus is not None:
            self.bus.stop()
            self.bus = None
        if self.db is not None:
            self.db.close()
            self.db = None

    def schema_current(self) -> bool:
        """True when the core has migrated the database to the version this code expects.

        A positive answer is cached for a few seconds; a negative one is re-checked each time.
        """
        now = time.monotonic()
        if now < self._schema_ok_until:
            return True
        if self.db is None:
            return False
        try:
            ok, _version = schema_status(self.db)
        except Exception:
            log.exception("schema check failed")
            ok = False
        if ok:
            self._schema_ok_until = now + SCHEMA_RECHECK_SEC
        return ok

    def db_ok(self) -> bool:
        if self.db is None:
            return False
        try:
            self.db.execute_sql("SELECT 1").fetchone()
        except Exception:
            return False
        return self.schema_current()


def _status(notifier: Notifier, text: str) -> None:
    notifier.status(text)


def ctx(app: Flask | None = None) -> WebContext:
    context: WebContext = (app or current_app).extensions["carwash"]
    return context


def require_db() -> SqliteDatabase:
    """This worker's database, or 503 SERVICE_UNAVAILABLE when it is not open."""
    from web.errors import ApiError

    db = ctx().db
    if db is None:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "database not open")
    return db


def ask_core(method: str, params: dict[str, Any], *, timeout: float | None = None) -> Any:
    """An RPC to the core; its refusal becomes the same HTTP error, silence a 503."""
    from gateway.mqtt.client import BusUnavailable, RpcTimeout
    from gateway.mqtt.rpc import RpcError
    from web.errors import ApiError

    c = ctx()
    if c.bus is None:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "not connected to the core")
    try:
        return c.bus.call(method, params, timeout=timeout or c.config.mqtt.rpc_timeout_sec)
    except RpcError as exc:
        raise ApiError(exc.status, exc.code, str(exc)) from None
    except (BusUnavailable, RpcTimeout) as exc:
        raise ApiError(503, "SERVICE_UNAVAILABLE", f"the core did not answer: {exc}") from None
