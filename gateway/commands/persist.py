"""Storing commands, per-device results and their SSE events (runs on the core's command DB thread).

The core is the only writer of `command`, `command_result`, `bulk_operation` and `operation_event`.
Event ids are assigned here from one counter (so the rows of a batch are inserted with one
statement and their ids are known before they are published); they are the SSE `id`s.
A result row's `deadline_at` is NULL until the command has been published to that device: after a
restart those rows are published again, the others wait out their remaining time.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from peewee import SQL, SqliteDatabase, fn

from gateway.clock import iso_z, utc_now
from gateway.commands.tracker import FINAL, DeviceResult, Tracked, Update
from gateway.store import write_tx
from gateway.store.models import BulkOperation, Command, CommandResult, OperationEvent
from gateway.store.outbox import add_events

_INSERT_RESULT = ('INSERT INTO "command_result" ("command_id", "device_id", "status", "updated_at") '
                  "VALUES (?, ?, 'PENDING', ?)")
_MARK_PUBLISHED = ('UPDATE "command_result" SET "deadline_at" = ? WHERE "command_id" = ? AND "deadline_at" IS NULL '
                   'AND "device_id" IN (SELECT "value" FROM json_each(?))')
_DEVICE_TYPES = ('SELECT "device_id", "device_type", "rejected" FROM "device" '
                 'WHERE "device_id" IN (SELECT "value" FROM json_each(?))')


@dataclass(frozen=True)
class StoredEvent:
    id: int
    stream: str
    event: str
    data: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.event, "data": self.data}


@dataclass
class Recovered:
    tracked: Tracked
    unsent: list[str]  # devices the command was never published to
    deadline_at: dt.datetime | None  # wall-clock deadline of the published devices


def _dumps(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


class CommandStore:
    """Not thread-safe: use from one thread (the core's command DB thread)."""

    def __init__(self, db: SqliteDatabase, site_id: str) -> None:
        self.db = db
        self.site_id = site_id
        self._next_id: int | None = None

    def _first_free_id(self) -> int:
        if self._next_id is None:
            self._next_id = (OperationEvent.select(fn.MAX(OperationEvent.id)).scalar() or 0) + 1
        return self._next_id

    def _insert_events(self, stream_events: list[tuple[str, str, dict[str, Any]]]) -> list[StoredEvent]:
        first = self._first_free_id()
        now = str(utc_now())
        stored = [StoredEvent(first + i, s, e, d) for i, (s, e, d) in enumerate(stream_events)]
        self.db.cursor().executemany(
            'INSERT INTO "operation_event" ("id", "stream", "event", "data", "at") VALUES (?, ?, ?, ?, ?)',
            [(ev.id, ev.stream, ev.event, _dumps(ev.data), now) for ev in stored])
        return stored

    def _commit_ids(self, stored: list[StoredEvent]) -> None:
        if stored:
            self._next_id = stored[-1].id + 1

    def create(self, t: Tracked, source: str) -> list[StoredEvent]:
        """Store a new command, its PENDING result rows and its first `progress` event."""
        now = utc_now()
        with write_tx(self.db):
            if t.setup_id is not None:
                BulkOperation.create(setup_id=t.setup_id, command=t.command, total=t.total, created_at=now,
                                     source=source)
            Command.create(command_id=t.command_id, command=t.command, payload=_dumps(t.payload),
                           require_ack=t.require_ack, timeout_sec=t.timeout_sec, bulk=t.setup_id, created_at=now,
                           source=source)
            # One prepared statement for every row (Peewee built the SQL of each 400-row chunk anew).
            updated = str(now)
            self.db.cursor().executemany(_INSERT_RESULT, [(t.command_id, d, updated) for d in t.results])
            stored = self._insert_events([(t.command_id, *t.progress_event())])
        self._commit_ids(stored)
        return stored

    def mark_published(self, command_id: str, devices: list[str], deadline_at: dt.datetime) -> None:
        with write_tx(self.db):
            self.db.cursor().execute(_MARK_PUBLISHED, (str(deadline_at), command_id, _dumps(devices)))

    def apply(self, updates: list[Update]) -> list[StoredEvent]:
        """Store outcomes, their events, outbox `command.result` events and side effects, atomically.

        Rows go in with one `executemany` per table: a bulk operation's ACKs arrive by the hundred."""
        now = utc_now()
        rows: list[tuple[Any, ...]] = []
        results: list[tuple[str, dict[str, Any], str | None]] = []
        configs: list[tuple[str, str, str, str]] = []
        firmware: list[tuple[str, str]] = []
        completed: list[Tracked] = []
        at, updated = iso_z(now), str(now)
        applied: dict[str, str] = {}  # command_id -> its configs as stored (the same for every device)
        for u in updates:
            t = u.tracked
            for dev in u.devices:
                r = t.results[dev]
                progress = _dumps(r.progress) if r.progress else None
                rows.append((r.status, r.error, progress, updated, t.command_id, dev))
                if r.status not in FINAL:
                    continue
                payload: dict[str, Any] = {"command_id": t.command_id, "setup_id": t.setup_id, "device_id": dev,
                                           "command": t.command, "status": r.status, "error": r.error,
                                           "at": at}
                if r.new_version is not None:
                    payload["new_version"] = r.new_version
                results.append(("command.result", payload, dev))
                if r.status == "SUCCESS" and t.command == "APPLY_CONFIG":
                    if t.command_id not in applied:
                        applied[t.command_id] = _dumps(t.payload["configs"])
                    configs.append((dev, applied[t.command_id], "apply", updated))
                elif r.status == "SUCCESS" and t.command == "UPDATE_FIRMWARE" and r.new_version:
                    firmware.append((r.new_version, dev))
            if u.completed:
                completed.append(t)
        cur = self.db.cursor
        with write_tx(self.db):
            if rows:
                cur().executemany('UPDATE "command_result" SET "status" = ?, "error" = ?, "progress" = ?, '
                                  '"updated_at" = ? WHERE "command_id" = ? AND "device_id" = ?', rows)
            add_events(self.db, results, site_id=self.site_id)
            if configs:
                cur().executemany('INSERT INTO "device_config" ("device_id", "configs", "source", "reported_at") '
                                  'VALUES (?, ?, ?, ?)', configs)
            if firmware:
                cur().executemany('UPDATE "device" SET "firmware_version" = ? WHERE "device_id" = ?', firmware)
            for t in completed:
                Command.update(completed_at=now).where(Command.command_id == t.command_id).execute()
                if t.setup_id is not None:
                    BulkOperation.update(completed_at=now).where(BulkOperation.setup_id == t.setup_id).execute()
            stored = self._insert_events([(u.tracked.command_id, e, d) for u in updates for e, d in u.events])
        self._commit_ids(stored)
        return stored

    def load_unfinished(self) -> list[Recovered]:
        """Every command not completed yet, with its devices' states, for restart recovery."""
        out = []
        for c in Command.select().where(Command.completed_at.is_null()).order_by(Command.created_at):
            t = Tracked(c.command_id, c.command, c.require_ack, json.loads(c.payload), c.timeout_sec,
                        setup_id=c.setup_id)
            unsent, deadline = [], None
            # rowid order is the order the devices were given in
            for row in CommandResult.select().where(CommandResult.command == c.command_id).order_by(SQL("rowid")):
                r = DeviceResult(row.status, row.error, int(row.updated_at.replace(tzinfo=dt.UTC)
                                                            .timestamp() * 1000),
                                 json.loads(row.progress) if row.progress else None)
                t.results[row.device_id] = r
                if r.status in ("SUCCESS", "SENT"):
                    t.completed += 1
                elif r.status in ("FAILED", "ERROR"):
                    t.failed += 1
                elif r.status == "TIMEOUT":
                    t.timeout += 1
                elif row.deadline_at is None:
                    unsent.append(row.device_id)
                else:
                    deadline = row.deadline_at if deadline is None else max(deadline, row.deadline_at)
            out.append(Recovered(t, unsent, deadline))
        return out

    def device_types(self, device_ids: list[str]) -> dict[str, tuple[str, bool]]:
        """`{device_id: (device_type, rejected)}` of the known ones among `device_ids` (one
        statement: the ids go in as one JSON array, looked up on the primary key)."""
        cur = self.db.cursor().execute(_DEVICE_TYPES, (_dumps(device_ids),))
        return {dev: (kind, bool(rejected)) for dev, kind, rejected in cur}
