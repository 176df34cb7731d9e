"""Device facts in the store: registration with PIN, reported configs, lifecycle, event logs.

Every function is one IMMEDIATE transaction that also writes the outbox event of its fact, so
the cloud learns exactly what was stored. They run in the web process (the owner of these writes)
and return only after the commit: a 2xx is sent for data that is on disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import json.encoder
import secrets
from dataclasses import dataclass
from typing import Any

from peewee import SqliteDatabase

from gateway.clock import iso_z, utc_now
from gateway.devices.validate import DEDUP_KEY_LEN, Lifecycle, LogItem, Registration, device_id_for, device_type
from gateway.store import write_tx
from gateway.store.models import Device, DeviceLifecycleEvent
from gateway.store.outbox import PreparedEvent, add_event, add_events, insert_prepared

# How stale a device's stored last_seen_at may be before an upload rewrites it (presence writes it
# every minute for devices that stream).
LAST_SEEN_PRECISION = dt.timedelta(minutes=2)


class DeviceNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Registered:
    device_id: str
    pin: str
    new: bool


def register(db: SqliteDatabase, reg: Registration, *, pin_ttl_sec: int, site_id: str) -> Registered:
    """Each press of Pairing Mode: the chip's stable id and a fresh 4-digit PIN."""
    dev_id = device_id_for(reg.chip_id)
    pin = f"{secrets.randbelow(10_000):04d}"
    now = utc_now()
    expires = now + dt.timedelta(seconds=pin_ttl_sec)
    kind = device_type(reg.firmware_version)
    with write_tx(db):
        row = Device.get_or_none(Device.device_id == dev_id)
        new = row is None
        if new:
            Device.create(device_id=dev_id, chip_id=reg.chip_id, mac_address=reg.mac_address, device_type=kind,
                          firmware_version=reg.firmware_version, pairing_pin=pin, pin_expires_at=expires,
                          registered_at=now)
        else:
            (Device.update(mac_address=reg.mac_address, device_type=kind, firmware_version=reg.firmware_version,
                           pairing_pin=pin, pin_expires_at=expires, rejected=False)
             .where(Device.device_id == dev_id).execute())
        DeviceLifecycleEvent.create(device=dev_id, kind="registered", at=now,
                                    detail=json.dumps({"firmware_version": reg.firmware_version, "new": new}))
        add_event("device.registered", {"device_id": dev_id, "chip_id": reg.chip_id, "mac_address": reg.mac_address,
                                        "firmware_version": reg.firmware_version, "device_type": kind,
                                        "registered_at": iso_z(now)},
                  site_id=site_id, partition=dev_id)
    return Registered(dev_id, pin, new)


_INSERT_CONFIG = 'INSERT INTO "device_config" ("device_id", "configs", "source", "reported_at") VALUES (?, ?, ?, ?)'
_INSERT_LIFECYCLE = 'INSERT INTO "device_lifecycle_event" ("device_id", "kind", "at", "detail") VALUES (?, ?, ?, ?)'
_SEEN = 'UPDATE "device" SET "last_seen_at" = ? WHERE "device_id" = ?'
_SEEN_ONLINE = 'UPDATE "device" SET "last_seen_at" = ?, "online" = ? WHERE "device_id" = ?'
_SEEN_ONLINE_STATUS = 'UPDATE "device" SET "last_seen_at" = ?, "online" = ?, "status" = ? WHERE "device_id" = ?'


def report_configs(db: SqliteDatabase, dev_id: str, configs: dict[str, Any], *, site_id: str,
                   lifecycle: Lifecycle | None = None) -> None:
    """Store configs as reported (bare sync, or the startup/shutdown document).

    Prepared statements, not Peewee queries: it runs in the web's one writer thread, and a
    restart storm brings every device's startup document at once."""
    now = utc_now()
    at = str(now)  # the form Peewee's DateTimeField stores
    source = lifecycle.topic if lifecycle else "sync"
    events: list[tuple[str, dict[str, Any], str | None]] = []
    with write_tx(db):
        cur = db.cursor()
        if cur.execute(_EXISTS, (dev_id,)).fetchone() is None:
            raise DeviceNotFound(dev_id)
        cur.execute(_INSERT_CONFIG, (dev_id, json.dumps(configs, ensure_ascii=False), source, at))
        if lifecycle is None:
            cur.execute(_SEEN, (at, dev_id))
        else:
            online = lifecycle.topic == "startup"
            cur.execute(_INSERT_LIFECYCLE, (dev_id, lifecycle.topic, at,
                                            json.dumps({"device_status": lifecycle.device_status,
                                                        "timestamp": lifecycle.timestamp})))
            if lifecycle.device_status:
                cur.execute(_SEEN_ONLINE_STATUS, (at, online, lifecycle.device_status, dev_id))
            else:
                cur.execute(_SEEN_ONLINE, (at, online, dev_id))
            events.append(("device.lifecycle", {"device_id": dev_id, "event": lifecycle.topic,
                                                "device_status": lifecycle.device_status,
                                                "device_timestamp": lifecycle.timestamp, "at": iso_z(now)}, dev_id))
        events.append(("device.configs_reported", {"device_id": dev_id, "source": source, "configs": configs,
                                                   "at": iso_z(now)}, dev_id))
        add_events(db, events, site_id=site_id)


@dataclass(frozen=True)
class Uploaded:
    length: int
    stored: int
    mismatches: int


_KNOWN = ('SELECT "dedup_key" FROM "event_log_item" WHERE "device_id" = ? '
          'AND "timestamp_ms" IN (SELECT "value" FROM json_each(?)) '
          'AND "dedup_key" IN (SELECT "value" FROM json_each(?))')
_INSERT_ITEM = ('INSERT INTO "event_log_item" ("device_id", "dedup_key", "type", "status", "timestamp_ms", '
                '"total_amount", "qr_charge_id", "qr_net_amount", "bank", "coin", "amount_mismatch", "received_at") '
                'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)')
_TOUCH = ('UPDATE "device" SET "last_seen_at" = ? WHERE "device_id" = ? '
          'AND ("last_seen_at" IS NULL OR "last_seen_at" < ?)')
_EXISTS = 'SELECT 1 FROM "device" WHERE "device_id" = ?'


@dataclass(frozen=True)
class PreparedUpload:
    """An upload worked out before its transaction (keys, rows, the outbox event as if every item
    were new), so the writer thread only runs a handful of prepared statements."""

    dev_id: str
    length: int
    site_id: str
    now: dt.datetime
    keys: list[str]  # of the rows, in order
    rows: list[tuple[Any, ...]]  # event_log_item rows, one per distinct item
    pieces: list[str]  # the JSON of the outbox event's item of each row
    timestamps_json: str  # the distinct timestamps, for the known-items query
    keys_json: str
    event: PreparedEvent  # `device.event_logs` with every row


# The JSON of a str as json.dumps writes it: ASCII-escaped (its default, the dedup key's identity),
# or not (ensure_ascii=False, the outbox event's).
_ascii = json.encoder.encode_basestring_ascii
_text = json.encoder.encode_basestring


def _map_forms(value: dict[str, int]) -> tuple[str | None, str, str, int]:
    """A note or coin map's forms: its row column (None when empty), its JSON in the outbox event,
    its part of the dedup key's identity, and the money it counts."""
    return (json.dumps(value) if value else None, json.dumps(value, separators=(",", ":"), ensure_ascii=False),
            json.dumps(sorted(value.items()), separators=(",", ":")), sum(int(k) * n for k, n in value.items()))


def prepare_upload(dev_id: str, items: list[LogItem], *, site_id: str) -> PreparedUpload:
    """Pure: no I/O. Run it in the request's thread, then `store_upload` in the transaction.

    `items` as `validate.log_upload` returns them (exact ints). Each item's key, row and event JSON
    are built from pieces serialised once per upload (a device's items repeat a few types and note
    and coin counts): the bytes `LogItem.dedup_key` and json.dumps of the event's dicts would give
    (tests/unit/test_log_items.py holds the item-by-item construction they replace)."""
    now = utc_now()
    received = str(now)  # the form Peewee's DateTimeField stores
    seen: set[str] = set()
    keys: list[str] = []
    rows: list[tuple[Any, ...]] = []
    pieces: list[str] = []
    dev_ascii = _ascii(dev_id)
    maps: dict[tuple[tuple[str, int], ...], tuple[str | None, str, str, int]] = {}
    words: dict[str, tuple[str, str]] = {}  # type or status: (ASCII JSON, JSON)
    sha256 = hashlib.sha256
    for typ, status, ts, total, charge, net, bank, coin in items:
        b = maps.get(bk := tuple(bank.items()))
        if b is None:
            b = maps[bk] = _map_forms(bank)
        c = maps.get(ck := tuple(coin.items()))
        if c is None:
            c = maps[ck] = _map_forms(coin)
        t = words.get(typ)
        if t is None:
            t = words[typ] = (_ascii(typ), _text(typ))
        s = words.get(status)
        if s is None:
            s = words[status] = (_ascii(status), _text(status))
        charge_a, charge_t = ("null", "null") if charge is None else (_ascii(charge), _text(charge))
        net_j = "null" if net is None else str(net)
        # json.dumps([dev, ts, type, status, total, charge, net, sorted(bank), sorted(coin)]), compact
        ident = f"[{dev_ascii},{ts},{t[0]},{s[0]},{total},{charge_a},{net_j},{b[2]},{c[2]}]"
        key = sha256(ident.encode()).hexdigest()[:DEDUP_KEY_LEN]
        if key in seen:
            continue  # the same item twice in one upload counts once too
        seen.add(key)
        mismatch = b[3] + c[3] + (net or 0) != total
        keys.append(key)
        rows.append((dev_id, key, typ, status, ts, total, charge, net, b[0], c[0], mismatch, received))
        pieces.append(f'{{"type":{t[1]},"status":{s[1]},"timestamp":{ts},"total_amount":{total},'
                      f'"qr":{{"chargeId":{charge_t},"net_amount":{net_j}}},"bank":{b[1]},"coin":{c[1]},'
                      f'"amount_mismatch":{"true" if mismatch else "false"},"dedup_key":"{key}"}}')
    return PreparedUpload(dev_id, len(items), site_id, now, keys, rows, pieces,
                          json.dumps(sorted({it.timestamp_ms for it in items})), json.dumps(keys),
                          _logs_event(dev_id, pieces, now, site_id))


def _logs_event(dev_id: str, pieces: list[str], now: dt.datetime, site_id: str) -> PreparedEvent:
    """`device.event_logs`: {"device_id", "items", "received_at"}, its items' JSON given."""
    payload = f'{{"device_id":{_text(dev_id)},"items":[{",".join(pieces)}],"received_at":{_text(iso_z(now))}}}'
    return PreparedEvent("device.event_logs", payload, site_id=site_id, partition=dev_id)


def store_upload(db: SqliteDatabase, p: PreparedUpload) -> Uploaded:
    """Store every new item of a prepared upload (inside the caller's IMMEDIATE transaction);
    a re-uploaded item stores nothing but counts. Five statements whatever the size."""
    cur = db.cursor()
    if cur.execute(_EXISTS, (p.dev_id,)).fetchone() is None:
        raise DeviceNotFound(p.dev_id)
    # Which items are known already, through the unique index on device, time and key.
    known = {k for (k,) in cur.execute(_KNOWN, (p.dev_id, p.timestamps_json, p.keys_json))}
    rows, event = p.rows, p.event
    if known:  # a re-upload: store the rest, and tell the cloud only about them
        fresh = [i for i, k in enumerate(p.keys) if k not in known]
        rows = [rows[i] for i in fresh]
        event = _logs_event(p.dev_id, [p.pieces[i] for i in fresh], p.now, p.site_id)
    if rows:
        cur.executemany(_INSERT_ITEM, rows)
        insert_prepared(db, event)
    # Presence keeps last_seen_at for streaming devices; an upload rewrites it only when it is
    # older than LAST_SEEN_PRECISION, so most uploads leave the device's page untouched.
    cur.execute(_TOUCH, (str(p.now), p.dev_id, str(p.now - LAST_SEEN_PRECISION)))
    return Uploaded(p.length, len(rows), sum(1 for r in rows if r[10]))


def upload_logs(db: SqliteDatabase, dev_id: str, items: list[LogItem], *, site_id: str) -> Uploaded:
    """Store every new item in one transaction; a re-uploaded item stores nothing but counts."""
    prepared = prepare_upload(dev_id, items, site_id=site_id)
    with write_tx(db):
        return store_upload(db, prepared)


class ClaimRefused(Exception):
    """The PIN given does not match the device's current one (or it expired)."""


def claim(db: SqliteDatabase, dev_id: str, name: str, *, pin: str | None, site_id: str, by: str | None) -> None:
    """A technician takes a pending device into the site under a name."""
    now = utc_now()
    with write_tx(db):
        d = Device.get_or_none(Device.device_id == dev_id)
        if d is None:
            raise DeviceNotFound(dev_id)
        if pin is not None and (d.pairing_pin != pin or d.pin_expires_at is None or d.pin_expires_at <= now):
            raise ClaimRefused("the PIN does not match the device's current PIN, or it expired")
        (Device.update(claimed=True, rejected=False, name=name, claimed_at=now, pairing_pin=None, pin_expires_at=None)
         .where(Device.device_id == dev_id).execute())
        DeviceLifecycleEvent.create(device=dev_id, kind="claimed", at=now, detail=json.dumps({"name": name, "by": by}))
        add_event("device.claimed", {"device_id": dev_id, "name": name, "claimed_at": iso_z(now)},
                  site_id=site_id, partition=dev_id)


def reject(db: SqliteDatabase, dev_id: str, *, by: str | None) -> None:
    """A pending device is not ours: hidden from the pending list until it registers again."""
    now = utc_now()
    with write_tx(db):
        n = (Device.update(rejected=True, claimed=False, pairing_pin=None, pin_expires_at=None)
             .where(Device.device_id == dev_id).execute())
        if n == 0:
            raise DeviceNotFound(dev_id)
        DeviceLifecycleEvent.create(device=dev_id, kind="rejected", at=now, detail=json.dumps({"by": by}))
