"""Writing outbox events: what the cloud must learn, in the transaction of the fact (uplink.md).

Call `add_event()` inside the write transaction that stores the fact. Events with a
`coalesce_key` replace the still-pending event with the same key (bay and device status), so a
long outage leaves one event per key instead of one per change. The drainer (cloud issue) sends
them in `seq` order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from peewee import SqliteDatabase

from gateway.clock import iso_z
from gateway.store.models import OutboxEvent

_INSERT = ('INSERT INTO "outbox_event" ("event_id", "type", "partition", "occurred_at", "payload", "size", "state", '
           '"attempts") VALUES (?, ?, ?, ?, ?, ?, \'pending\', 0)')


def new_event_id() -> str:
    """A UUIDv7 (time-ordered, globally unique) as text."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def add_event(event_type: str, payload: dict[str, Any], *, site_id: str, partition: str | None = None,
              coalesce_key: str | None = None) -> str:
    """Insert one event (inside the caller's IMMEDIATE transaction); returns its id."""
    if coalesce_key is not None:
        OutboxEvent.delete().where(
            (OutboxEvent.coalesce_key == coalesce_key) & (OutboxEvent.state == "pending")
        ).execute()
    event_id = new_event_id()
    body = {"id": event_id, "type": event_type, "occurred_at": iso_z(), "site_id": site_id, "payload": payload}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    OutboxEvent.create(event_id=event_id, type=event_type, partition=partition, occurred_at=body["occurred_at"],
                       payload=text, size=len(text.encode()), coalesce_key=coalesce_key)
    return event_id


def add_events(db: SqliteDatabase, events: Iterable[tuple[str, dict[str, Any], str | None]], *, site_id: str) -> int:
    """Insert many non-coalescing events `(type, payload, partition)` with one statement (inside the
    caller's IMMEDIATE transaction, in order); returns how many. For bulk facts (command results)."""
    occurred = iso_z()
    rows = []
    for event_type, payload, partition in events:
        event_id = new_event_id()
        body = {"id": event_id, "type": event_type, "occurred_at": occurred, "site_id": site_id, "payload": payload}
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        rows.append((event_id, event_type, partition, occurred, text, len(text.encode())))
    if rows:
        db.cursor().executemany(_INSERT, rows)
    return len(rows)
