"""The core's command service: dispatching device commands and tracking their outcomes.

Contract:
- RPC `commands.send {command, payload, device_ids, bulk, source}` validates everything (command
  type, payload, devices known and not rejected, APPLY_CONFIG configs against each device type's
  schema), stores the command and one PENDING result per device, answers
  `{command_id, setup_id?, device_ids, total_devices, status: "INITIATED"}` and publishes the signed
  command to every device in the background (`device/{id}/command`, QoS 1). Refusals are RpcErrors
  with the envelope's codes, so REST and cloud callers meet the same rules.
- One wildcard subscription `server/+/ack`; an ACK counts only while its (command, device) is
  pending; everything else is ignored and counted (`stats`).
- One timer task sleeps until the earliest deadline of all pending commands.
- Every outcome is stored with its SSE events (one transaction per flush, group-committed while the
  previous flush runs) and then announced on `gateway/commands/{command_id}/events`
  (`{"command_id", "setup_id", "events": [{"id", "event", "data"}]}`); the web replays from the store.
- After a restart, unfinished commands are reloaded: devices never published to are published as
  soon as they have subscribed again (at most `RECONNECT_GRACE_SEC` later), the others wait their
  remaining time or time out at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from peewee import SqliteDatabase

from gateway.access.signing import SignatureError, parse_signed_mqtt, sign_mqtt
from gateway.clock import epoch_ms, utc_now
from gateway.commands import catalogue
from gateway.commands.persist import CommandStore, StoredEvent
from gateway.commands.tracker import DeviceResult, Tracked, Tracker, Update, parse_ack
from gateway.config import Config, Secrets
from gateway.devices.badmessages import BadMessages
from gateway.devices.validate import DEVICE_ID_RE, Invalid
from gateway.droplog import Drops
from gateway.metrics_hist import ACK_BUCKETS, Buckets
from gateway.mqtt.broker import LocalBus
from gateway.mqtt.rpc import AfterReply, RpcError, RpcServer
from gateway.mqtt.topics import COMMAND_EVENTS, DEVICE_ACK_FILTER, DEVICE_COMMAND
from gateway.store.dbthread import DbThread

log = logging.getLogger(__name__)

SOURCES = ("web", "cloud", "cli")
RECONNECT_GRACE_SEC = 10.0  # devices reconnect within seconds of a gateway restart


def _invalid(exc: Invalid) -> RpcError:
    return RpcError("VALIDATION_FAILED", str(exc), 400)


class CommandService:
    def __init__(self, config: Config, secrets: Secrets, db: SqliteDatabase, bus: LocalBus,
                 bad: BadMessages | None = None) -> None:
        self.config = config
        self.bad = bad if bad is not None else BadMessages()
        self.key = secrets.device_signing_key
        self.bus = bus
        self.store = CommandStore(db, config.site.id)
        self.tracker = Tracker()
        self.drops = Drops(log)
        self.published = 0
        self.ack_latency = Buckets(ACK_BUCKETS)  # seconds from publish to final ACK (metrics)
        self.last_publish_ms = 0.0
        self._db_thread = DbThread("commands-db", db)
        self._updates: list[Update] = []
        self._flush_wanted = asyncio.Event()
        self._timer_changed = asyncio.Event()
        self._to_send: asyncio.Queue[tuple[Tracked, list[str]]] = asyncio.Queue()
        self._recovered: list[tuple[Tracked, list[str]]] = []

    # --- life ----------------------------------------------------------------------------------

    async def start(self, rpc: RpcServer) -> None:
        now_wall, now_mono, now_ms = utc_now(), time.monotonic(), epoch_ms()
        for rec in await self._db_thread.run(self.store.load_unfinished):
            t = rec.tracked
            self.tracker.add(t)
            if rec.deadline_at is not None:
                left = (rec.deadline_at - now_wall).total_seconds()
                self.tracker.arm(t.command_id, now_mono + max(0.0, left))
            if rec.unsent:
                log.info("command %s: will publish to %d devices after a restart", t.command_id, len(rec.unsent),
                         extra={"command_id": t.command_id})
                self._recovered.append((t, rec.unsent))
            elif rec.deadline_at is None:  # nothing pending: finish what a crash interrupted
                self._queue([self.tracker.time_out(t, now_ms)])
        expired = self.tracker.expire(now_mono, now_ms)
        if expired:
            log.info("%d commands timed out while the core was down", len(expired))
            self._queue(expired)
        rpc.register("commands.send", self._rpc_send)
        rpc.register("commands.stats", self._rpc_stats)
        self.bus.subscribe(DEVICE_ACK_FILTER, self._on_ack)

    def services(self) -> list[tuple[str, Any]]:
        return [("command-sender", self._sender), ("command-timer", self._timer), ("command-flush", self._flusher),
                ("command-recovery", self._recover)]

    async def _recover(self) -> None:
        """Publish what a crash left unsent once its devices have subscribed again (the broker forgot
        every session with the restart), or after `RECONNECT_GRACE_SEC` at the latest. First builds
        the config validators, off the loop (the first APPLY_CONFIG need not)."""
        await asyncio.to_thread(catalogue.warm)
        items, self._recovered = self._recovered, []
        if items:
            wanted = {DEVICE_COMMAND.format(device_id=d) for _, devices in items for d in devices}
            try:
                await self.bus.wait_subscribers(wanted, RECONNECT_GRACE_SEC)
            except TimeoutError:
                pass
            for item in items:
                self._to_send.put_nowait(item)
        await asyncio.Event().wait()  # done until the next start; returning would make the supervisor rerun it

    async def stop(self) -> None:
        """Store what is still queued (the bus may be gone: events are replayed from the store)."""
        try:
            if self._updates:
                batch, self._updates = self._updates, []
                await self._db_thread.run(self.store.apply, batch)
        finally:
            await self._db_thread.close()

    # --- sending -------------------------------------------------------------------------------

    async def _rpc_send(self, params: dict[str, Any]) -> AfterReply:
        answer, start = await self.submit(params)
        return AfterReply(answer, start)

    async def submit(self, params: dict[str, Any]) -> tuple[dict[str, Any], Callable[[], None]]:
        """Validate and store a command (`commands.send`'s params); returns the answer and the
        function that starts publishing it (call it once the answer is on its way). RpcError."""
        t_start = time.perf_counter()
        try:
            ct = catalogue.command_type(params.get("command"))
            payload = catalogue.check_payload(ct, params.get("payload"))
            device_ids = self._device_ids(params.get("device_ids"))
        except Invalid as exc:
            raise _invalid(exc) from None
        source = params.get("source", "web")
        if source not in SOURCES:
            raise RpcError("VALIDATION_FAILED", f"source must be one of {', '.join(SOURCES)}", 400)
        bulk = bool(params.get("bulk"))
        known: dict[str, tuple[str, bool]] = await self._db_thread.run(self.store.device_types, device_ids)
        missing = [d for d in device_ids if d not in known]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RpcError("DEVICE_NOT_FOUND", f"device {missing[0]} not found{more}", 404)
        rejected = [d for d in device_ids if known[d][1]]
        if rejected:
            raise RpcError("CONFLICT", f"device {rejected[0]} was rejected on this site", 409)
        if ct.name == "APPLY_CONFIG":
            checked: set[str] = set()
            for d in device_ids:
                if known[d][0] not in checked:  # the same configs: one check per device type
                    try:
                        catalogue.check_configs(d, known[d][0], payload["configs"])
                    except Invalid as exc:
                        raise _invalid(exc) from None
                    checked.add(known[d][0])
        x = catalogue.new_id()
        timeout = float(payload.get("timeout_sec") or self.config.devices.command_timeout_sec) \
            if ct.name == "UPDATE_FIRMWARE" else self.config.devices.command_timeout_sec
        t = Tracked(f"cmd-{x}", ct.name, ct.require_ack, payload, timeout, setup_id=f"setup-{x}" if bulk else None)
        for d in device_ids:
            t.results[d] = DeviceResult()
        t_checked = time.perf_counter()
        stored = await self._db_thread.run(self.store.create, t, source)
        t_stored = time.perf_counter()
        self.tracker.add(t)
        await self._announce(stored)
        # The parts of the answer's delay (bench/commands.py reads them from this line).
        log.info("command %s %s to %d device(s) from %s: checked in %.0f ms, stored in %.0f ms, answered after %.0f ms",
                 t.command_id, t.command, len(device_ids), source, (t_checked - t_start) * 1000,
                 (t_stored - t_checked) * 1000, (time.perf_counter() - t_start) * 1000,
                 extra={"command_id": t.command_id})
        out: dict[str, Any] = {"command_id": t.command_id}
        if bulk:
            out["setup_id"] = t.setup_id
        out.update({"device_ids": device_ids, "total_devices": len(device_ids), "status": "INITIATED"})
        return out, lambda: self._to_send.put_nowait((t, device_ids))

    @staticmethod
    def _device_ids(value: Any) -> list[str]:
        if not isinstance(value, list) or not value:
            raise Invalid("device_ids", "must be a non-empty list of device ids")
        out: dict[str, None] = {}
        for i, d in enumerate(value):
            if not isinstance(d, str) or not DEVICE_ID_RE.match(d):
                raise Invalid(f"device_ids[{i}]", "not a device id")
            out[d] = None  # a device listed twice is commanded (and counted) once
        if len(out) > catalogue.MAX_DEVICES:
            raise Invalid("device_ids", f"at most {catalogue.MAX_DEVICES} devices per request")
        return list(out)

    async def _sender(self) -> None:
        while True:
            t, devices = await self._to_send.get()
            if t.require_ack:
                # Armed before the first publish so a fast device's ACK is never taken for a stray one.
                self.tracker.arm(t.command_id, time.monotonic() + t.timeout_sec)
            started = time.monotonic()
            # The message names no device: one signed body (one timestamp: when publishing began)
            # serves every device. Signing it per device was most of a bulk's publish loop (about
            # 40 us of JSON and SHA-256 each, a thousand times, before the last device's turn).
            body = {"command_id": t.command_id, "command": t.command, "require_ack": t.require_ack,
                    "payload": t.payload, "timestamp": epoch_ms()}
            signed = sign_mqtt(body, self.key)
            for d in devices:
                await self.bus.publish(DEVICE_COMMAND.format(device_id=d), signed, qos=1)
                self.published += 1
            self.last_publish_ms = (time.monotonic() - started) * 1000
            log.info("command %s published to %d devices in %.0f ms", t.command_id, len(devices), self.last_publish_ms,
                     extra={"command_id": t.command_id})
            if t.require_ack:
                # Every device gets at least `timeout_sec` after its command went out.
                if t.command_id in self.tracker.pending:
                    self.tracker.arm(t.command_id, time.monotonic() + t.timeout_sec)
                    self._timer_changed.set()
                await self._db_thread.run(self.store.mark_published, t.command_id, devices,
                                  utc_now() + dt.timedelta(seconds=t.timeout_sec))
            else:
                await self._db_thread.run(self.store.mark_published, t.command_id, devices, utc_now())
                self._queue([self.tracker.sent(t.command_id, epoch_ms())])

    # --- ACKs and time -------------------------------------------------------------------------

    async def _on_ack(self, topic: str, data: bytes, client_id: str | None) -> None:
        device = topic.split("/")[1]
        try:
            msg = parse_signed_mqtt(data, self.key, require=self.config.signatures.mqtt == "require")
            ack = parse_ack(device, msg)
        except SignatureError as exc:
            self.drops.drop(exc.reason, topic, str(exc))
            self.bad.add(device, "ack", exc.reason, str(exc))
            return
        except Invalid as exc:
            self.drops.drop("invalid", topic, str(exc))
            self.bad.add(device, "ack", "invalid", str(exc))
            return
        update = self.tracker.ack(ack, epoch_ms())
        if update is not None:
            t = update.tracked
            if t.deadline is not None and ack.status != "PROGRESS":
                # From the command's last publish (its deadline is that + timeout) to this ACK.
                self.ack_latency.observe(max(0.0, time.monotonic() - (t.deadline - t.timeout_sec)))
            self._queue([update])

    async def _timer(self) -> None:
        while True:
            self._timer_changed.clear()
            deadline = self.tracker.next_deadline()
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._timer_changed.wait(), wait)
            except TimeoutError:
                pass
            expired = self.tracker.expire(time.monotonic(), epoch_ms())
            if expired:
                self._queue(expired)

    # --- storing and announcing ----------------------------------------------------------------

    def _queue(self, updates: list[Update]) -> None:
        self._updates.extend(updates)
        self._flush_wanted.set()

    async def _flusher(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted.clear()
            batch, self._updates = self._updates, []
            if not batch:
                continue
            try:
                stored = await self._db_thread.run(self.store.apply, batch)
            except Exception:
                self._updates[:0] = batch  # keep them for the retry the supervisor makes
                self._flush_wanted.set()
                raise
            await self._announce(stored)

    async def _announce(self, stored: list[StoredEvent]) -> None:
        """Wake the web's SSE streams of each command that has new stored events. Only the command
        id travels: a stream reads the events from `operation_event` anyway (ids, order, replay
        after Last-Event-ID, and a missed announcement must not lose anything)."""
        for stream in dict.fromkeys(ev.stream for ev in stored):
            body = {"command_id": stream}
            await self.bus.publish(COMMAND_EVENTS.format(command_id=stream), json.dumps(body).encode(), qos=1)

    async def _rpc_stats(self, _params: dict[str, Any]) -> dict[str, Any]:
        return {"pending_commands": len(self.tracker.pending), "published": self.published,
                "last_publish_ms": round(self.last_publish_ms, 1),
                "acks_accepted": self.tracker.accepted, "acks_ignored": dict(self.tracker.ignored),
                "dropped": dict(self.drops.counts)}
