"""The drainer's side of the outbox tables: the SQL that reads the queue and settles its rows.

Contract: plain functions of a Peewee database, called from the drainer's worker thread (never
the event loop); each write is one IMMEDIATE transaction. A row is always addressed by `seq`
*and* `event_id` and only while pending: a coalesced event deleted meanwhile may have left its
seq to a new, never sent row (seq has no AUTOINCREMENT). Every query runs through a partial
index of its state (`pending`, `dead`, `sent`): none reads the whole table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from peewee import SqliteDatabase

from gateway.store.db import write_tx
from gateway.store.outbox import payload_bytes

COALESCIBLE_TYPES: tuple[str, ...] = ("wash.status", "device.status")
PROTECTED_TYPES: tuple[str, ...] = ("device.event_logs", "wash.session", "payment.updated", "command.result")

_BY_ROW = 'UPDATE "outbox_event" SET {set} WHERE "seq" = ? AND "event_id" = ? AND "state" = \'pending\''


@dataclass(frozen=True)
class Row:
    """A pending event as sent: its position, id, type and the stored JSON."""

    seq: int
    event_id: str
    type: str
    data: bytes


@dataclass
class Dropped:
    """What `drop_over_cap` deleted, and how far the pending total still is over the cap."""

    by_type: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    excess: int = 0


def pending_head(db: SqliteDatabase, limit: int, skip: set[str]) -> tuple[list[Row], bool]:
    """The first `limit` pending events in `seq` order with their payloads, those in `skip`
    (delivered, not yet marked) left out and not decoded; and whether that was the whole queue."""
    cur = db.execute_sql(
        'SELECT e."seq", e."event_id", e."type", p."payload" FROM "outbox_event" e '
        'JOIN "outbox_payload" p ON p."seq" = e."seq" WHERE e."state" = \'pending\' ORDER BY e."seq" LIMIT ?',
        (limit,))
    fetched = cur.fetchall()  # fetch everything: the read snapshot ends here
    rows = [Row(int(seq), str(event_id), str(typ), payload_bytes(payload))
            for seq, event_id, typ, payload in fetched if event_id not in skip]
    return rows, len(fetched) < limit


def mark_sent(db: SqliteDatabase, marks: dict[str, int], sent_at: int) -> None:
    """Delivered events (id -> seq) become `sent` at `sent_at` (epoch seconds), in one transaction.
    A delivered row deleted meanwhile (coalesced, or dropped over the cap) matches nothing."""
    with write_tx(db):
        db.cursor().executemany(
            _BY_ROW.format(set='"state" = \'sent\', "sent_at" = ?, "attempts" = "attempts" + 1'),
            [(sent_at, seq, event_id) for event_id, seq in marks.items()])


def mark_attempt(db: SqliteDatabase, rows: list[Row], error: str) -> None:
    """A failed attempt: counted, with its error (first 500 characters)."""
    with write_tx(db):
        db.cursor().executemany(_BY_ROW.format(set='"attempts" = "attempts" + 1, "last_error" = ?'),
                                [(error[:500], r.seq, r.event_id) for r in rows])


def mark_dead(db: SqliteDatabase, row: Row, error: str) -> None:
    """Refused by the cloud: parked as `dead` with its error, out of the ordered stream."""
    with write_tx(db):
        db.execute_sql(_BY_ROW.format(set='"state" = \'dead\', "attempts" = "attempts" + 1, "last_error" = ?'),
                       (error[:500], row.seq, row.event_id))


def prune_sent_before(db: SqliteDatabase, cutoff: int) -> int:
    """Delete sent events marked before `cutoff` (epoch seconds); returns how many."""
    with write_tx(db):
        cur = db.execute_sql('DELETE FROM "outbox_event" WHERE "state" = \'sent\' AND "sent_at" < ?', (cutoff,))
    return max(int(cur.rowcount), 0)


def drop_over_cap(db: SqliteDatabase, cap: int) -> Dropped:
    """While the pending total exceeds `cap` bytes, delete the oldest pending coalescible events,
    then the oldest of the other types that are not protected; protected ones are never deleted."""
    out = Dropped()
    with write_tx(db):
        (total,) = db.execute_sql(
            'SELECT COALESCE(SUM("size"), 0) FROM "outbox_event" WHERE "state" = \'pending\'').fetchone()
        excess = int(total) - cap
        protected = ",".join("?" * len(PROTECTED_TYPES))
        coalescible = ",".join("?" * len(COALESCIBLE_TYPES))
        tiers: list[tuple[str, tuple[str, ...]]] = [
            (f'"type" IN ({coalescible})', COALESCIBLE_TYPES),
            (f'"type" NOT IN ({coalescible}) AND "type" NOT IN ({protected})', COALESCIBLE_TYPES + PROTECTED_TYPES),
        ]
        for where, params in tiers:
            if excess <= 0:
                break
            cur = db.execute_sql(
                f'SELECT "seq", "type", "size" FROM "outbox_event" WHERE "state" = \'pending\' AND {where} '
                'ORDER BY "seq"', params)
            cutoff = None
            freed = 0
            for seq, typ, size in cur:
                freed += int(size)
                out.by_type[typ] = out.by_type.get(typ, 0) + 1
                cutoff = seq
                if freed >= excess:
                    break
            cur.close()
            if cutoff is not None:
                db.execute_sql(f'DELETE FROM "outbox_event" WHERE "state" = \'pending\' AND {where} AND "seq" <= ?',
                               (*params, cutoff))
                excess -= freed
                out.bytes += freed
    out.excess = excess
    return out


def queue_figures(db: SqliteDatabase) -> tuple[int, int, int]:
    """(pending events, their bytes, dead events)."""
    (pending, pending_bytes), = db.execute_sql(
        'SELECT COUNT(*), COALESCE(SUM("size"), 0) FROM "outbox_event" WHERE "state" = \'pending\'').fetchall()
    (dead,), = db.execute_sql('SELECT COUNT(*) FROM "outbox_event" WHERE "state" = \'dead\'').fetchall()
    return int(pending), int(pending_bytes), int(dead)
