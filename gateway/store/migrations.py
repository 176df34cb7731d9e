"""Forward-only schema migrations, applied by the core at start.

Each migration is frozen SQL: it must never change once released, because a site's database was
built by running it. Models (models.py) follow the latest schema; a test checks they agree.
The web never migrates: it refuses to serve (503) until `schema_status()` says current.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peewee import SqliteDatabase

from gateway.clock import utc_now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "devices, logs, payments, commands, bays, sessions, outbox, technicians",
        (
            """CREATE TABLE "device" ("device_id" TEXT NOT NULL PRIMARY KEY, "chip_id" TEXT NOT NULL,
            "mac_address" TEXT NOT NULL, "device_type" TEXT NOT NULL, "firmware_version" TEXT NOT NULL,
            "name" TEXT, "claimed" INTEGER NOT NULL DEFAULT 0, "rejected" INTEGER NOT NULL DEFAULT 0,
            "pairing_pin" TEXT, "pin_expires_at" DATETIME, "registered_at" DATETIME NOT NULL,
            "claimed_at" DATETIME, "last_seen_at" DATETIME, "online" INTEGER NOT NULL DEFAULT 0,
            "status" TEXT, "rssi" INTEGER, "uptime_min" INTEGER)""",
            'CREATE UNIQUE INDEX "device_chip_id" ON "device" ("chip_id")',
            """CREATE TABLE "device_config" ("id" INTEGER NOT NULL PRIMARY KEY, "device_id" TEXT NOT NULL,
            "configs" TEXT NOT NULL, "source" TEXT NOT NULL, "reported_at" DATETIME NOT NULL,
            FOREIGN KEY ("device_id") REFERENCES "device" ("device_id") ON DELETE CASCADE)""",
            'CREATE INDEX "device_config_device_id" ON "device_config" ("device_id", "reported_at")',
            """CREATE TABLE "device_lifecycle_event" ("id" INTEGER NOT NULL PRIMARY KEY,
            "device_id" TEXT NOT NULL, "kind" TEXT NOT NULL, "at" DATETIME NOT NULL, "detail" TEXT,
            FOREIGN KEY ("device_id") REFERENCES "device" ("device_id") ON DELETE CASCADE)""",
            'CREATE INDEX "device_lifecycle_event_device_id" ON "device_lifecycle_event" ("device_id", "at")',
            """CREATE TABLE "event_log_item" ("id" INTEGER NOT NULL PRIMARY KEY, "device_id" TEXT NOT NULL,
            "dedup_key" TEXT NOT NULL, "type" TEXT NOT NULL, "status" TEXT NOT NULL,
            "timestamp_ms" INTEGER NOT NULL, "total_amount" INTEGER NOT NULL, "qr_charge_id" TEXT,
            "qr_net_amount" INTEGER, "bank" TEXT, "coin" TEXT,
            "amount_mismatch" INTEGER NOT NULL DEFAULT 0, "received_at" DATETIME NOT NULL,
            FOREIGN KEY ("device_id") REFERENCES "device" ("device_id") ON DELETE RESTRICT)""",
            'CREATE INDEX "event_log_item_device_id" ON "event_log_item" ("device_id", "timestamp_ms")',
            'CREATE UNIQUE INDEX "event_log_item_dedup_key" ON "event_log_item" ("dedup_key")',
            """CREATE TABLE "payment" ("charge_id" TEXT NOT NULL PRIMARY KEY, "device_id" TEXT NOT NULL,
            "amount_satang" INTEGER NOT NULL, "payment_method" TEXT NOT NULL, "description" TEXT,
            "status" TEXT NOT NULL, "reference_id" TEXT, "raw_data" TEXT, "expiry" TEXT,
            "cloud_response" TEXT, "created_at" DATETIME NOT NULL, "updated_at" DATETIME NOT NULL,
            "final_delivered" INTEGER NOT NULL DEFAULT 0,
            FOREIGN KEY ("device_id") REFERENCES "device" ("device_id") ON DELETE RESTRICT)""",
            'CREATE INDEX "payment_device_id" ON "payment" ("device_id")',
            'CREATE INDEX "payment_status" ON "payment" ("status")',
            """CREATE TABLE "bulk_operation" ("setup_id" TEXT NOT NULL PRIMARY KEY, "command" TEXT NOT NULL,
            "total" INTEGER NOT NULL, "created_at" DATETIME NOT NULL, "completed_at" DATETIME,
            "source" TEXT NOT NULL)""",
            """CREATE TABLE "command" ("command_id" TEXT NOT NULL PRIMARY KEY, "command" TEXT NOT NULL,
            "payload" TEXT NOT NULL, "require_ack" INTEGER NOT NULL, "timeout_sec" REAL NOT NULL,
            "setup_id" TEXT, "created_at" DATETIME NOT NULL, "completed_at" DATETIME,
            "source" TEXT NOT NULL,
            FOREIGN KEY ("setup_id") REFERENCES "bulk_operation" ("setup_id") ON DELETE CASCADE)""",
            'CREATE INDEX "command_setup_id" ON "command" ("setup_id")',
            """CREATE TABLE "command_result" ("command_id" TEXT NOT NULL, "device_id" TEXT NOT NULL,
            "status" TEXT NOT NULL, "error" TEXT, "progress" TEXT, "deadline_at" DATETIME,
            "updated_at" DATETIME NOT NULL, PRIMARY KEY ("command_id", "device_id"),
            FOREIGN KEY ("command_id") REFERENCES "command" ("command_id") ON DELETE CASCADE,
            FOREIGN KEY ("device_id") REFERENCES "device" ("device_id") ON DELETE CASCADE)""",
            'CREATE INDEX "command_result_device_id" ON "command_result" ("device_id")',
            'CREATE INDEX "command_result_status" ON "command_result" ("status")',
            """CREATE TABLE "operation_event" ("id" INTEGER NOT NULL PRIMARY KEY, "stream" TEXT NOT NULL,
            "event" TEXT NOT NULL, "data" TEXT NOT NULL, "at" DATETIME NOT NULL)""",
            'CREATE INDEX "operation_event_stream" ON "operation_event" ("stream", "id")',
            """CREATE TABLE "bay" ("bay_id" TEXT NOT NULL PRIMARY KEY, "name" TEXT NOT NULL,
            "state" TEXT NOT NULL, "progress" INTEGER NOT NULL DEFAULT 0, "course" TEXT,
            "error_code" TEXT, "session_id" TEXT, "request_id" TEXT, "plc_session_counter" INTEGER,
            "updated_at" DATETIME NOT NULL)""",
            """CREATE TABLE "wash_session" ("id" INTEGER NOT NULL PRIMARY KEY, "session_id" TEXT NOT NULL,
            "bay_id" TEXT NOT NULL, "local_day" TEXT NOT NULL, "seq" INTEGER NOT NULL, "course" TEXT,
            "state" TEXT NOT NULL, "error_code" TEXT, "request_id" TEXT,
            "start_time" DATETIME NOT NULL, "end_time" DATETIME,
            FOREIGN KEY ("bay_id") REFERENCES "bay" ("bay_id") ON DELETE RESTRICT)""",
            'CREATE UNIQUE INDEX "wash_session_session_id" ON "wash_session" ("session_id")',
            'CREATE INDEX "wash_session_bay_id" ON "wash_session" ("bay_id", "start_time")',
            'CREATE UNIQUE INDEX "wash_session_day_seq" ON "wash_session" ("bay_id", "local_day", "seq")',
            """CREATE TABLE "outbox_event" ("seq" INTEGER NOT NULL PRIMARY KEY, "event_id" TEXT NOT NULL,
            "type" TEXT NOT NULL, "partition" TEXT, "occurred_at" TEXT NOT NULL,
            "payload" TEXT NOT NULL, "size" INTEGER NOT NULL, "state" TEXT NOT NULL DEFAULT 'pending',
            "attempts" INTEGER NOT NULL DEFAULT 0, "last_error" TEXT, "sent_at" DATETIME)""",
            'CREATE UNIQUE INDEX "outbox_event_event_id" ON "outbox_event" ("event_id")',
            'CREATE INDEX "outbox_event_state" ON "outbox_event" ("state", "seq")',
            """CREATE TABLE "technician_user" ("id" INTEGER NOT NULL PRIMARY KEY,
            "username" TEXT NOT NULL, "password_hash" TEXT NOT NULL, "created_at" DATETIME NOT NULL,
            "disabled" INTEGER NOT NULL DEFAULT 0)""",
            'CREATE UNIQUE INDEX "technician_user_username" ON "technician_user" ("username")',
        ),
    ),
    Migration(
        2,
        "device presence history, firmware store, coalescible outbox events",
        (
            """CREATE TABLE "device_status_sample" ("device_id" TEXT NOT NULL, "bucket" DATETIME NOT NULL,
            "rssi_min" INTEGER, "rssi_max" INTEGER, "rssi_last" INTEGER, "status" TEXT,
            "samples" INTEGER NOT NULL DEFAULT 0, PRIMARY KEY ("device_id", "bucket"),
            FOREIGN KEY ("device_id") REFERENCES "device" ("device_id") ON DELETE CASCADE)""",
            """CREATE TABLE "firmware_image" ("id" INTEGER NOT NULL PRIMARY KEY, "version" TEXT NOT NULL,
            "filename" TEXT NOT NULL, "sha256" TEXT NOT NULL, "size" INTEGER NOT NULL,
            "device_type" TEXT, "uploaded_at" DATETIME NOT NULL)""",
            'CREATE UNIQUE INDEX "firmware_image_filename" ON "firmware_image" ("filename")',
            'ALTER TABLE "outbox_event" ADD COLUMN "coalesce_key" TEXT',
            'CREATE INDEX "outbox_event_coalesce" ON "outbox_event" ("coalesce_key", "state")',
        ),
    ),
    Migration(
        3,
        "fewer pages per write: event logs unique per device and time, partial outbox indexes, outbox payloads "
        "in their own table",
        (
            # A unique index on a random hash put each uploaded item on its own index page; keyed by
            # device and time an upload's items land together (the hash still decides uniqueness, and
            # it covers the old (device_id, timestamp_ms) index).
            'DROP INDEX "event_log_item_dedup_key"',
            'DROP INDEX "event_log_item_device_id"',
            'CREATE UNIQUE INDEX "event_log_item_device_time_key" ON "event_log_item" '
            '("device_id", "timestamp_ms", "dedup_key")',
            # One small index per state that is looked up: the drainer's queue and its byte count
            # (pending), the technician's dead letters, and pruning by delivery time (sent), so no
            # housekeeping query reads the whole table (7 days of events). Event ids (UUIDv7) are
            # not looked up: the drainer addresses rows by seq and checks the id.
            'DROP INDEX "outbox_event_state"',
            'DROP INDEX "outbox_event_event_id"',
            'DROP INDEX "outbox_event_coalesce"',
            """CREATE INDEX "outbox_event_pending" ON "outbox_event" ("seq", "size") WHERE "state" = 'pending'""",
            """CREATE INDEX "outbox_event_dead" ON "outbox_event" ("seq") WHERE "state" = 'dead'""",
            """CREATE INDEX "outbox_event_sent" ON "outbox_event" ("sent_at") WHERE "state" = 'sent'""",
            """CREATE INDEX "outbox_event_coalesce_pending" ON "outbox_event" ("coalesce_key")
            WHERE "coalesce_key" IS NOT NULL AND "state" = 'pending'""",
            # The payload (kilobytes, on overflow pages) in a table of its own, written once: marking
            # an event sent changes the length of its row, and SQLite rewrites a row whose length
            # changed in full, overflow pages and all. New payloads are zlib BLOBs (gateway.store.outbox).
            """CREATE TABLE "outbox_payload" ("seq" INTEGER NOT NULL PRIMARY KEY, "payload" BLOB NOT NULL,
            FOREIGN KEY ("seq") REFERENCES "outbox_event" ("seq") ON DELETE CASCADE)""",
            'INSERT INTO "outbox_payload" ("seq", "payload") SELECT "seq", "payload" FROM "outbox_event"',
            'ALTER TABLE "outbox_event" DROP COLUMN "payload"',
        ),
    ),
    Migration(
        4,
        "event-log dedup keys of 16 hex digits, outbox sent_at in epoch seconds",
        (
            # The unique index already holds device and time; the key only tells apart items of one
            # device in one millisecond, and 64 bits of the SHA-256 do that. Half-length keys make
            # index entries half as big: fewer index pages written per upload (SD-card wear).
            # New keys are the same digest's first 16 digits, so re-uploads of old items still match.
            'UPDATE "event_log_item" SET "dedup_key" = substr("dedup_key", 1, 16) WHERE length("dedup_key") > 16',
            'REINDEX "event_log_item_device_time_key"',
            # A sent mark set a 26-character datetime text: each marked row grew by 24 bytes, so the
            # marks of a minute split full leaves (and their index entries were as long). Epoch
            # seconds are 4 bytes: a mark hardly changes a row's length. Half the pages per mark.
            """UPDATE "outbox_event" SET "sent_at" = CAST(strftime('%s', "sent_at") AS INTEGER)
            WHERE typeof("sent_at") = 'text'""",
            'REINDEX "outbox_event_sent"',
        ),
    ),
    Migration(
        5,
        "technician token versions, MQTT accounts",
        (
            # Tokens carry the version; bumping it ends every session of the account (web/auth.py).
            'ALTER TABLE "technician_user" ADD COLUMN "token_version" INTEGER NOT NULL DEFAULT 0',
            # Programs on the site LAN (wash backend, dashboards) with a role each (gateway/access/mqtt_accounts.py).
            """CREATE TABLE "mqtt_account" ("id" INTEGER NOT NULL PRIMARY KEY, "username" TEXT NOT NULL,
            "password_hash" TEXT NOT NULL, "role" TEXT NOT NULL, "generation" INTEGER NOT NULL DEFAULT 0,
            "created_at" DATETIME NOT NULL, "changed_at" DATETIME NOT NULL)""",
            'CREATE UNIQUE INDEX "mqtt_account_username" ON "mqtt_account" ("username")',
        ),
    ),
    Migration(
        6,
        "bay resets: who cleared which latched PLC error, when",
        (
            """CREATE TABLE "bay_reset" ("id" INTEGER NOT NULL PRIMARY KEY, "bay_id" TEXT NOT NULL,
            "request_id" TEXT NOT NULL, "requested_by" TEXT NOT NULL, "error_code" TEXT,
            "outcome" TEXT NOT NULL, "requested_at" DATETIME NOT NULL, "done_at" DATETIME NOT NULL,
            FOREIGN KEY ("bay_id") REFERENCES "bay" ("bay_id") ON DELETE RESTRICT)""",
            'CREATE INDEX "bay_reset_bay_id" ON "bay_reset" ("bay_id", "id")',
        ),
    ),
)

LATEST = MIGRATIONS[-1].version

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS "schema_version" ("version" INTEGER NOT NULL PRIMARY KEY,
    "applied_at" DATETIME NOT NULL, "description" TEXT NOT NULL)"""


class SchemaError(Exception):
    """The database is from a newer gateway, or otherwise unusable."""


def current_version(db: SqliteDatabase) -> int:
    """The highest applied migration, 0 for an empty database."""
    row = db.execute_sql(
        "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
    ).fetchone()
    if row is None:
        return 0
    (v,) = db.execute_sql('SELECT COALESCE(MAX("version"), 0) FROM "schema_version"').fetchone()
    return int(v)


def schema_status(db: SqliteDatabase) -> tuple[bool, int]:
    """(is current, version): what the web checks before serving."""
    v = current_version(db)
    return v == LATEST, v


def migrate(db: SqliteDatabase, target: int = LATEST) -> list[int]:
    """Apply the missing migrations up to `target`, each in its own IMMEDIATE transaction.

    Returns the versions applied. Refuses a database newer than this code knows.
    """
    applied: list[int] = []
    with db.atomic(lock_type="IMMEDIATE"):
        db.execute_sql(_VERSION_TABLE)
    have = current_version(db)
    if have > LATEST:
        raise SchemaError(f"database schema version {have} is newer than this gateway's {LATEST}")
    for m in MIGRATIONS:
        if m.version <= have or m.version > target:
            continue
        with db.atomic(lock_type="IMMEDIATE"):
            # Re-read inside the lock: another core (a mistaken second start) may have migrated.
            if current_version(db) >= m.version:
                continue
            for stmt in m.statements:
                db.execute_sql(stmt)
            db.execute_sql(
                'INSERT INTO "schema_version" ("version", "applied_at", "description") VALUES (?, ?, ?)',
                (m.version, utc_now(), m.description),
            )
        log.info("database schema migrated to version %d: %s", m.version, m.description)
        applied.append(m.version)
    return applied
