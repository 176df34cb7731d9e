"""Peewee models of the whole gateway state.

The schema itself is created and changed only by the forward migrations in `migrations.py`
(frozen SQL); these models must match the migrated schema, which a test checks column by column.
Owners (the only process that writes a table) are listed in docs/architecture.md and repeated
here as `owner` in each model's docstring. Times are UTC; `*_ms` columns are epoch milliseconds as
devices send them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

from peewee import (
    BaseQuery,
    BigIntegerField,
    BooleanField,
    CompositeKey,
    DatabaseProxy,
    DateTimeField,
    Field,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
    TimestampField,
)

database_proxy = DatabaseProxy()


class JSONField(TextField):
    """JSON kept as text; the caller decides what goes in (configs are stored as sent)."""

    field_type = "TEXT"


class TextOrBlobField(Field):
    """Stored as given: a str as TEXT, bytes as a BLOB (SQLite keeps each value's type; Peewee's
    BlobField would turn a str into a BLOB)."""

    field_type = "BLOB"


class BaseModel(Model):
    """A foreign key `x` stored in column `x_id` also gives its model an `x_id` attribute (Peewee's
    accessor: the key without loading the row); the models declare it for the type checker."""

    class Meta:
        database = database_proxy
        legacy_table_names = False


def tuple_rows(query: BaseQuery) -> Iterable[tuple[Any, ...]]:
    """The rows of `query` as tuples (`query.tuples()`, which Peewee's stubs type as rows of the
    query's model)."""
    return cast("Iterable[tuple[Any, ...]]", query.tuples())


class SchemaVersion(BaseModel):
    """owner: core (migrations)."""

    version = IntegerField(primary_key=True)
    applied_at = DateTimeField()
    description = TextField()


class Device(BaseModel):
    """owner: web (registration, sync, claim) and core (presence); see architecture.md."""

    device_id = TextField(primary_key=True)
    chip_id = TextField(unique=True)
    mac_address = TextField()
    device_type = TextField()  # CAR_WASH | HELMET_DRYER | UNKNOWN
    firmware_version = TextField()
    name = TextField(null=True)
    claimed = BooleanField(default=False)
    rejected = BooleanField(default=False)
    pairing_pin = TextField(null=True)
    pin_expires_at = DateTimeField(null=True)
    registered_at = DateTimeField()
    claimed_at = DateTimeField(null=True)
    last_seen_at = DateTimeField(null=True)
    online = BooleanField(default=False)
    status = TextField(null=True)  # NORMAL | ERROR | OFFLINE as the device streams it
    rssi = IntegerField(null=True)
    uptime_min = BigIntegerField(null=True)


class DeviceConfig(BaseModel):
    """Configs a device reported (stored as sent) or that an APPLY_CONFIG set. owner: web/core."""

    id = IntegerField(primary_key=True)
    device = ForeignKeyField(Device, column_name="device_id", backref="configs", on_delete="CASCADE")
    device_id: str
    configs = JSONField()
    source = TextField()  # sync | startup | shutdown | apply
    reported_at = DateTimeField()


class DeviceLifecycleEvent(BaseModel):
    """registered, claimed, rejected, startup, shutdown, online, offline. owner: web/core."""

    id = IntegerField(primary_key=True)
    device = ForeignKeyField(Device, column_name="device_id", backref="lifecycle", on_delete="CASCADE")
    device_id: str
    kind = TextField()
    at = DateTimeField()
    detail = JSONField(null=True)


class DeviceStatusSample(BaseModel):
    """Downsampled rssi/status history (one row per device per bucket, bounded). owner: core."""

    device = ForeignKeyField(Device, column_name="device_id", on_delete="CASCADE")
    device_id: str
    bucket = DateTimeField()
    rssi_min = IntegerField(null=True)
    rssi_max = IntegerField(null=True)
    rssi_last = IntegerField(null=True)
    status = TextField(null=True)
    samples = IntegerField(default=0)

    class Meta:
        primary_key = CompositeKey("device", "bucket")


class EventLogItem(BaseModel):
    """One uploaded device event-log item; dedup_key makes re-uploads no-ops. owner: web."""

    id = IntegerField(primary_key=True)
    device = ForeignKeyField(Device, column_name="device_id", on_delete="RESTRICT")
    device_id: str
    dedup_key = TextField()  # unique with (device_id, timestamp_ms): migration 3
    type = TextField()
    status = TextField()
    timestamp_ms = BigIntegerField()
    total_amount = BigIntegerField()
    qr_charge_id = TextField(null=True)
    qr_net_amount = BigIntegerField(null=True)
    bank = JSONField(null=True)
    coin = JSONField(null=True)
    amount_mismatch = BooleanField(default=False)
    received_at = DateTimeField()


class Payment(BaseModel):
    """A QR charge created through the gateway. owner: web (create), core (follow-up)."""

    charge_id = TextField(primary_key=True)
    device = ForeignKeyField(Device, column_name="device_id", on_delete="RESTRICT")
    device_id: str
    amount_satang = BigIntegerField()
    payment_method = TextField()
    description = TextField(null=True)
    status = TextField()  # PENDING | SUCCEEDED | FAILED | CANCELLED
    reference_id = TextField(null=True)
    raw_data = TextField(null=True)
    expiry = TextField(null=True)
    cloud_response = JSONField(null=True)
    created_at = DateTimeField()
    updated_at = DateTimeField()
    final_delivered = BooleanField(default=False)


class BulkOperation(BaseModel):
    """owner: core."""

    setup_id = TextField(primary_key=True)
    command = TextField()
    total = IntegerField()
    created_at = DateTimeField()
    completed_at = DateTimeField(null=True)
    source = TextField()  # web | cloud


class Command(BaseModel):
    """owner: core."""

    command_id = TextField(primary_key=True)
    command = TextField()
    payload = JSONField()
    require_ack = BooleanField()
    timeout_sec = FloatField()
    bulk = ForeignKeyField(BulkOperation, column_name="setup_id", null=True, on_delete="CASCADE")
    setup_id: str | None
    created_at = DateTimeField()
    completed_at = DateTimeField(null=True)
    source = TextField()


class CommandResult(BaseModel):
    """One row per (command, device). owner: core."""

    command = ForeignKeyField(Command, column_name="command_id", backref="results", on_delete="CASCADE")
    command_id: str
    device = ForeignKeyField(Device, column_name="device_id", on_delete="CASCADE")
    device_id: str
    status = TextField()  # PENDING | SENT | PROGRESS | SUCCESS | FAILED | TIMEOUT | ERROR
    error = TextField(null=True)
    progress = JSONField(null=True)
    deadline_at = DateTimeField(null=True)
    updated_at = DateTimeField()

    class Meta:
        primary_key = CompositeKey("command", "device")


class OperationEvent(BaseModel):
    """SSE events of commands and bulk operations, stored for replay. owner: core."""

    id = IntegerField(primary_key=True)
    stream = TextField(index=True)  # command id or setup id
    event = TextField()
    data = JSONField()
    at = DateTimeField()


class FirmwareImage(BaseModel):
    """owner: web."""

    id = IntegerField(primary_key=True)
    version = TextField()
    filename = TextField(unique=True)
    sha256 = TextField()
    size = BigIntegerField()
    device_type = TextField(null=True)
    uploaded_at = DateTimeField()


class Bay(BaseModel):
    """Last known state of each configured bay. owner: core."""

    bay_id = TextField(primary_key=True)
    name = TextField()
    state = TextField()
    progress = IntegerField(default=0)
    course = TextField(null=True)
    error_code = TextField(null=True)
    session_id = TextField(null=True)
    request_id = TextField(null=True)
    plc_session_counter = BigIntegerField(null=True)
    updated_at = DateTimeField()


class WashSession(BaseModel):
    """owner: core."""

    id = IntegerField(primary_key=True)
    session_id = TextField(unique=True)
    bay = ForeignKeyField(Bay, column_name="bay_id", on_delete="RESTRICT")
    bay_id: str
    local_day = TextField()  # YYYYMMDD in the site zone, for NNN
    seq = IntegerField()
    course = TextField(null=True)
    state = TextField()  # running: STARTING/WASHING; final: DONE/CANCELED/ERROR
    error_code = TextField(null=True)
    request_id = TextField(null=True)
    start_time = DateTimeField()
    end_time = DateTimeField(null=True)


class BayReset(BaseModel):
    """A RESET of a bay's latched PLC error and its outcome. owner: core."""

    id = IntegerField(primary_key=True)
    bay = ForeignKeyField(Bay, column_name="bay_id", on_delete="RESTRICT")
    bay_id: str
    request_id = TextField()
    requested_by = TextField()  # "technician:NAME", "mqtt:ACCOUNT/CLIENT_ID", "cli:USER"
    error_code = TextField(null=True)  # the code shown when the reset was asked for
    outcome = TextField()  # CLEARED | STILL_IN_ERROR | NO_ANSWER | OFFLINE
    requested_at = DateTimeField()
    done_at = DateTimeField()


class OutboxEvent(BaseModel):
    """What the cloud must learn; written in the transaction of the fact. owner: writer of the
    fact inserts, core drains."""

    seq = IntegerField(primary_key=True)  # delivery order
    event_id = TextField()  # UUIDv7; not indexed (migration 3): rows are addressed by seq
    type = TextField()
    partition = TextField(null=True)  # e.g. device id: order is kept per partition
    occurred_at = TextField()
    size = IntegerField()  # of the payload
    state = TextField(default="pending")  # pending | sent | dead
    attempts = IntegerField(default=0)
    last_error = TextField(null=True)
    sent_at = TimestampField(null=True, utc=True, default=None)  # epoch seconds (migration 4)
    coalesce_key = TextField(null=True)


class OutboxPayload(BaseModel):
    """The event JSON of an outbox event as it is sent: TEXT, or zlib-compressed as a BLOB
    (`gateway.store.outbox.payload_bytes` reads both); written once, deleted with its event.
    owner: as OutboxEvent."""

    seq = ForeignKeyField(OutboxEvent, column_name="seq", primary_key=True, on_delete="CASCADE")
    seq_id: int
    payload = TextOrBlobField()


class TechnicianUser(BaseModel):
    """owner: web (and the `user` CLI)."""

    id = IntegerField(primary_key=True)
    username = TextField(unique=True)
    password_hash = TextField()
    created_at = DateTimeField()
    disabled = BooleanField(default=False)
    token_version = IntegerField(default=0)  # tokens carry it; bumped to end every session (users.py)


class MqttAccount(BaseModel):
    """owner: web (technician page) and the `mqtt-user` CLI; the core reads it (broker auth)."""

    id = IntegerField(primary_key=True)
    username = TextField(unique=True)
    password_hash = TextField()
    role = TextField()
    generation = IntegerField(default=0)  # bumped on a password or role change: live connections are cut
    created_at = DateTimeField()
    changed_at = DateTimeField()


MODELS: tuple[type[BaseModel], ...] = (
    SchemaVersion,
    Device,
    DeviceConfig,
    DeviceLifecycleEvent,
    DeviceStatusSample,
    EventLogItem,
    Payment,
    BulkOperation,
    Command,
    CommandResult,
    OperationEvent,
    FirmwareImage,
    Bay,
    WashSession,
    BayReset,
    OutboxEvent,
    OutboxPayload,
    TechnicianUser,
    MqttAccount,
)
