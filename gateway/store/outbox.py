"""Writing outbox events: what the cloud must learn, in the transaction of the fact (uplink.md).

Call `add_event()` inside the write transaction that stores the fact. Events with a
`coalesce_key` replace the still-pending event with the same key (bay and device status), so a
long outage leaves one event per key instead of one per change. The drainer (cloud issue) sends
them in `seq` order. An event is two rows: `outbox_event` (delivery state, changed when it is
sent) and `outbox_payload` (the JSON as it will be sent, written once). A payload longer than
`COMPRESS_OVER` bytes is stored zlib-compressed as a BLOB when that is smaller (an upload's ten
items: 3.3 KB of JSON, 0.8 KB stored: one database page instead of four); the others, and those
stored before, are TEXT. `payload_bytes()` reads either.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Iterable
from typing import Any

from peewee import SQL, Expression, SqliteDatabase

from gateway.clock import iso_z
from gateway.store.models import OutboxEvent, OutboxPayload

COMPRESS_OVER = 256
_INSERT = ('INSERT INTO "outbox_event" ("event_id", "type", "partition", "occurred_at", "size", "state", "attempts") '
           "VALUES (?, ?, ?, ?, ?, 'pending', 0)")
_INSERT_PAYLOAD = 'INSERT INTO "outbox_payload" ("seq", "payload") VALUES (?, ?)'


def state_is(state: str) -> Expression:
    """`OutboxEvent.state == 'pending'` with the state as a literal in the SQL: SQLite uses a partial
    index (`outbox_event_pending`, `_dead`, `_coalesce_pending`) only when the query names its
    state, never for a bound parameter."""
    if state not in ("pending", "dead", "sent"):
        raise ValueError(f"unknown outbox state {state!r}")
    return OutboxEvent.state == SQL(f"'{state}'")


def new_event_id() -> str:
    """A UUIDv7 (time-ordered, globally unique) as text."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64
             | 0b10 << 62 | (rand & ((1 << 62) - 1)))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def add_event(event_type: str, payload: dict[str, Any], *, site_id: str, partition: str | None = None,
              coalesce_key: str | None = None) -> str:
    """Insert one event (inside the caller's IMMEDIATE transaction); returns its id."""
    if coalesce_key is not None:
        OutboxEvent.delete().where(
            (OutboxEvent.coalesce_key == coalesce_key) & state_is("pending")
        ).execute()
    event_id = new_event_id()
    body = {"id": event_id, "type": event_type, "occurred_at": iso_z(), "site_id": site_id, "payload": payload}
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    row = OutboxEvent.create(event_id=event_id, type=event_type, partition=partition, occurred_at=body["occurred_at"],
                             size=len(data), coalesce_key=coalesce_key)
    OutboxPayload.insert(seq=row.seq, payload=_stored_form(data)).execute()
    return event_id


def add_events(db: SqliteDatabase, events: Iterable[tuple[str, dict[str, Any], str | None]], *, site_id: str) -> int:
    """Insert many non-coalescing events `(type, payload, partition)` with prepared statements
    (inside the caller's IMMEDIATE transaction, in order); returns how many. For bulk facts
    (command results)."""
    occurred = iso_z()
    cur = db.cursor()
    n = 0
    for event_type, payload, partition in events:
        event_id = new_event_id()
        body = {"id": event_id, "type": event_type, "occurred_at": occurred, "site_id": site_id, "payload": payload}
        data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        cur.execute(_INSERT, (event_id, event_type, partition, occurred, len(data)))
        cur.execute(_INSERT_PAYLOAD, (cur.lastrowid, _stored_form(data)))
        n += 1
    return n


def _stored_form(data: bytes) -> str | bytes:
    """TEXT for a short payload, a zlib BLOB for a long one when that is smaller."""
    if len(data) > COMPRESS_OVER:
        packed = zlib.compress(data, 3)
        if len(packed) < len(data):
            return packed
    return data.decode()


def payload_bytes(stored: str | bytes | memoryview) -> bytes:
    """The event JSON as sent, from an `outbox_payload.payload` value (TEXT or zlib BLOB)."""
    if isinstance(stored, str):
        return stored.encode()
    return zlib.decompress(stored)


def stored_events(*where: Expression) -> list[tuple[OutboxEvent, dict[str, Any]]]:
    """Outbox rows matching `where` (all of them when none), in seq order, each with the event as
    stored for the cloud."""
    query = OutboxEvent.select(OutboxEvent, OutboxPayload.payload).join(OutboxPayload)
    for condition in where:
        query = query.where(condition)
    return [(row, json.loads(payload_bytes(row.outboxpayload.payload)))  # type: ignore[attr-defined]  # the join's
            for row in query.order_by(OutboxEvent.seq)]


class PreparedEvent:
    """An event serialised (and compressed) ahead of its transaction, so the work is done outside
    the single writer thread; `insert_prepared` stores it with two prepared statements.

    `payload` is the event's payload, or its JSON text exactly as `json.dumps(payload,
    separators=(",", ":"), ensure_ascii=False)` writes it (a caller that builds the text from
    pieces it serialised once, as an upload's thousand items): the stored bytes are the same."""

    __slots__ = ("event_id", "event_type", "partition", "occurred_at", "size", "stored")

    def __init__(self, event_type: str, payload: dict[str, Any] | str, *, site_id: str,
                 partition: str | None = None) -> None:
        self.event_id = new_event_id()
        self.event_type = event_type
        self.partition = partition
        self.occurred_at = iso_z()
        if isinstance(payload, str):
            # The body's keys in the order of the dict below: the same bytes as json.dumps of it.
            head = {"id": self.event_id, "type": event_type, "occurred_at": self.occurred_at, "site_id": site_id}
            text = json.dumps(head, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"payload":' + payload + "}"
        else:
            body = {"id": self.event_id, "type": event_type, "occurred_at": self.occurred_at, "site_id": site_id,
                    "payload": payload}
            text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        data = text.encode()
        self.size = len(data)
        self.stored = _stored_form(data)


def insert_prepared(db: SqliteDatabase, event: PreparedEvent) -> None:
    """Insert a non-coalescing prepared event (inside the caller's IMMEDIATE transaction)."""
    cur = db.cursor()
    cur.execute(_INSERT, (event.event_id, event.event_type, event.partition, event.occurred_at, event.size))
    cur.execute(_INSERT_PAYLOAD, (cur.lastrowid, event.stored))
