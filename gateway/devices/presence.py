"""Device presence from `server/{device_id}/streaming` (device-api.md §4), owned by the core.

Each message is verified (`sha256`, unless `signatures.mqtt = "off"`), then updates the device's
last seen, rssi, status and uptime in memory, and the rssi history of its `BUCKET_MIN`-minute
bucket (min/max/last over every message). Every accepted message is published at once, retained,
on `gateway/live/{device_id}` (internal users only; not forwarded to the cloud): the web shows last
seen, rssi and status from there. The store is written in batches: at most one
transaction every `devices.presence_save_sec` (15 min) for the devices that streamed (SD-card
wear: a lone commit costs ~15 KiB, bench commit_cost), plus one at once for each online / offline
transition (with its lifecycle row and a coalesced `device.status` outbox event), which pages,
filters and the bridge need at once. A crash loses at most one save's last seen and rssi history.
A device silent for `offline_after_intervals` streaming intervals is offline; its next message
brings it back. History is one `device_status_sample` row per device per bucket, kept
`HISTORY_DAYS` days. Dropped messages are counted per reason and logged at most once a minute per
reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from peewee import SqliteDatabase

from gateway.access.signing import SignatureError, parse_signed_mqtt
from gateway.clock import iso_z, utc_now
from gateway.config import Config, Secrets
from gateway.devices.badmessages import BadMessages
from gateway.devices.validate import DEVICE_STATUSES, MAX_INT
from gateway.droplog import Drops
from gateway.mqtt.broker import LocalBus
from gateway.mqtt.topics import DEVICE_STREAMING_FILTER, LIVE, PRESENCE
from gateway.store import write_tx
from gateway.store.dbthread import DbThread
from gateway.store.models import Device, DeviceLifecycleEvent, DeviceStatusSample
from gateway.store.outbox import add_event

log = logging.getLogger(__name__)

CHECK_SEC = 1.0
BUCKET_MIN = 15
HISTORY_DAYS = 7
LOG_EVERY_SEC = 60.0
UNKNOWN_RECHECK_SEC = 5.0


@dataclass
class _Seen:
    at: float  # time.monotonic() of the last message
    wall: dt.datetime
    rssi: int | None
    status: str | None
    uptime: int | None
    online: bool
    dirty: bool = True


@dataclass
class _Sample:
    """The rssi history of one device and bucket since the last save."""

    rssi_min: int | None = None
    rssi_max: int | None = None
    rssi_last: int | None = None
    status: str | None = None
    samples: int = 0

    def add(self, rssi: int | None, status: str | None) -> None:
        if rssi is not None:
            self.rssi_min = rssi if self.rssi_min is None else min(self.rssi_min, rssi)
            self.rssi_max = rssi if self.rssi_max is None else max(self.rssi_max, rssi)
        self.rssi_last, self.status, self.samples = rssi, status, self.samples + 1


def _body(dev: str, s: _Seen) -> bytes:
    return json.dumps({"device_id": dev, "online": s.online, "rssi": s.rssi, "status": s.status, "uptime": s.uptime,
                       "last_seen_at": iso_z(s.wall)}).encode()


def _bucket(at: dt.datetime) -> dt.datetime:
    return at.replace(minute=at.minute - at.minute % BUCKET_MIN, second=0, microsecond=0)


class PresenceService:
    def __init__(self, config: Config, secrets: Secrets, db: SqliteDatabase, bus: LocalBus,
                 bad: BadMessages | None = None) -> None:
        self.config = config
        self.bad = bad if bad is not None else BadMessages()
        self.key = secrets.device_signing_key
        self.db = db
        self.bus = bus
        self.timeout = config.devices.streaming_interval_sec * config.devices.offline_after_intervals
        self.save_every = config.devices.presence_save_sec
        self.seen: dict[str, _Seen] = {}
        self._samples: dict[tuple[str, dt.datetime], _Sample] = {}
        self.known: set[str] = set()
        self._drops = Drops(log, LOG_EVERY_SEC)
        self.dropped = self._drops.counts
        self.accepted = 0
        self._unknown_checked: dict[str, float] = {}
        self._db_thread = DbThread("presence-db", db)

    async def start(self) -> None:
        self.known = set(await self._db_thread.run(lambda: [d.device_id for d in Device.select(Device.device_id)]))
        self.bus.subscribe(DEVICE_STREAMING_FILTER, self._on_streaming)

    def services(self) -> list[tuple[str, Any]]:
        return [("device-presence", self._run)]

    async def stop(self) -> None:
        try:
            await self._db_thread.run(self._flush, *self._take_dirty())
        finally:
            await self._db_thread.close()

    # --- messages ------------------------------------------------------------------------------

    def _drop(self, reason: str, topic: str, detail: str) -> None:
        self._drops.drop(reason, topic, detail)
        if reason != "unknown_device":
            self.bad.add(topic.split("/")[1], "streaming", reason, detail)

    async def _on_streaming(self, topic: str, data: bytes, client_id: str | None) -> None:
        dev = topic.split("/")[1]
        try:
            msg = parse_signed_mqtt(data, self.key, require=self.config.signatures.mqtt == "require")
        except SignatureError as exc:
            self._drop(exc.reason, topic, str(exc))
            return
        if "device_id" in msg and msg["device_id"] != dev:
            self._drop("device_mismatch", topic, f"device_id {msg['device_id']!r} is not the topic's")
            return
        rssi, status, uptime = msg.get("rssi"), msg.get("status"), msg.get("uptime")
        if rssi is not None and (isinstance(rssi, bool) or not isinstance(rssi, int) or not -150 <= rssi <= 50):
            self._drop("invalid", topic, "rssi must be an integer dBm")
            return
        if status is not None and status not in DEVICE_STATUSES:
            self._drop("invalid", topic, "status must be NORMAL, ERROR or OFFLINE")
            return
        if uptime is not None and (isinstance(uptime, bool) or not isinstance(uptime, int)
                                   or not 0 <= uptime <= MAX_INT):
            self._drop("invalid", topic, "uptime must be minutes")
            return
        if dev not in self.known:
            # Registered since we last looked? Ask the store, at most once per UNKNOWN_RECHECK_SEC per id, so
            # a flood of messages from unknown ids costs no database work.
            now = time.monotonic()
            if now - self._unknown_checked.get(dev, -UNKNOWN_RECHECK_SEC) >= UNKNOWN_RECHECK_SEC:
                self._unknown_checked[dev] = now
                if len(self._unknown_checked) > 10_000:
                    self._unknown_checked.clear()
                found = await self._db_thread.run(lambda: Device.select().where(Device.device_id == dev).exists())
                if found:
                    self.known.add(dev)
            if dev not in self.known:
                self._drop("unknown_device", topic, "not registered")
                return
        self.accepted += 1
        prev = self.seen.get(dev)
        was_online = prev.online if prev else False
        wall = utc_now()
        self.seen[dev] = _Seen(time.monotonic(), wall, rssi, status, uptime, True)
        self._samples.setdefault((dev, _bucket(wall)), _Sample()).add(rssi, status)
        if not was_online:
            await self._db_thread.run(self._transition, dev, True, self.seen[dev])
            await self._publish(dev, self.seen[dev])
        await self._publish_live(dev, self.seen[dev])

    # --- time ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            await asyncio.sleep(CHECK_SEC)
            now = time.monotonic()
            for dev, s in list(self.seen.items()):
                if s.online and now - s.at > self.timeout:
                    s.online = False
                    await self._db_thread.run(self._transition, dev, False, s)
                    await self._publish(dev, s)
                    await self._publish_live(dev, s)
            if now - last_flush >= self.save_every:
                last_flush = now
                await self._db_thread.run(self._flush, *self._take_dirty())

    async def _publish(self, dev: str, s: _Seen) -> None:
        """Online/offline transitions, retained on `gateway/presence/{device_id}` (internal users;
        the cloud bridge forwards them)."""
        await self.bus.publish(PRESENCE.format(device_id=dev), _body(dev, s), qos=1, retain=True)

    async def _publish_live(self, dev: str, s: _Seen) -> None:
        """The device's latest state, retained on `gateway/live/{device_id}` (the web's view between
        saves; QoS 0: the next message replaces a lost one)."""
        await self.bus.publish(LIVE.format(device_id=dev), _body(dev, s), qos=0, retain=True)

    def _take_dirty(self) -> tuple[dict[str, _Seen], dict[tuple[str, dt.datetime], _Sample]]:
        out = {}
        for dev, s in self.seen.items():
            if s.dirty:
                out[dev] = _Seen(s.at, s.wall, s.rssi, s.status, s.uptime, s.online, True)
                s.dirty = False
        samples, self._samples = self._samples, {}
        return out, samples


    # --- database thread -----------------------------------------------------------------------

    def _transition(self, dev: str, online: bool, s: _Seen) -> None:
        now = utc_now()
        with write_tx(self.db):
            Device.update(online=online, last_seen_at=s.wall, rssi=s.rssi, status=s.status,
                          uptime_min=s.uptime).where(Device.device_id == dev).execute()
            DeviceLifecycleEvent.create(device=dev, kind="online" if online else "offline", at=now,
                                        detail=json.dumps({"rssi": s.rssi, "status": s.status}))
            add_event("device.status", {"device_id": dev, "online": online, "rssi": s.rssi, "status": s.status,
                                        "uptime": s.uptime, "last_seen_at": iso_z(s.wall)},
                      site_id=self.config.site.id, partition=dev, coalesce_key=f"device.status:{dev}")
        log.info("device %s %s", dev, "online" if online else "offline", extra={"device_id": dev})

    def _flush(self, batch: dict[str, _Seen], samples: dict[tuple[str, dt.datetime], _Sample]) -> None:
        if not batch and not samples:
            return
        with write_tx(self.db):
            for dev, s in batch.items():
                Device.update(last_seen_at=s.wall, rssi=s.rssi, status=s.status, uptime_min=s.uptime).where(
                    Device.device_id == dev).execute()
            for (dev, bucket), smp in samples.items():
                row = DeviceStatusSample.get_or_none((DeviceStatusSample.device == dev)
                                                     & (DeviceStatusSample.bucket == bucket))
                if row is None:
                    DeviceStatusSample.create(device=dev, bucket=bucket, rssi_min=smp.rssi_min, rssi_max=smp.rssi_max,
                                              rssi_last=smp.rssi_last, status=smp.status, samples=smp.samples)
                    continue
                if smp.rssi_min is not None:
                    row.rssi_min = smp.rssi_min if row.rssi_min is None else min(row.rssi_min, smp.rssi_min)
                if smp.rssi_max is not None:
                    row.rssi_max = smp.rssi_max if row.rssi_max is None else max(row.rssi_max, smp.rssi_max)
                row.rssi_last, row.status, row.samples = smp.rssi_last, smp.status, row.samples + smp.samples
                row.save()
            cutoff = utc_now() - dt.timedelta(days=HISTORY_DAYS)
            DeviceStatusSample.delete().where(DeviceStatusSample.bucket < cutoff).execute()
