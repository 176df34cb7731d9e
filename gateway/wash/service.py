"""The wash bays of the core: PLC buses, one state machine per bay, sessions, MQTT and RPC.

`WashService` is the only writer of bay state and sessions. Commands reach `judge()` from the
RPC method `wash.command` (the web's REST API) and from MQTT `wash/{bayId}/cmd` (local clients,
the cloud bridge): one function, one set of rules. Poll results and timers drive the machines;
their effects are carried out here: PLC writes through the bus scheduler, session and bay rows
(with their outbox events; `gateway.wash.store`) through one database thread (`DbThread`),
status on `wash/{bayId}/status` (retained, QoS 1), and the outcome of every MQTT command on
`wash/{bayId}/cmd/result`. `wash.scan` is `gateway.wash.scan`.

Writes (SD-card wear): a session's start and end are stored at once, with the bay row and its
`wash.status` event in the same transaction, and so are the unsaved views of the other bays.
Other state changes (WASHING, IDLE, OFFLINE, an error outside a session) only replace the bay's
unsaved view; the unsaved views of all bays are stored in one transaction every
`wash.status_save_sec` (unless a session write took them meanwhile) and at stop. `wash.status`
is coalescible (uplink.md): the cloud learns the latest state of each bay, not every step, and
its live view comes from the bridge.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import time
import uuid
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peewee import SqliteDatabase

from gateway.clock import iso_z
from gateway.config import BusConfig, Config
from gateway.mqtt.broker import LocalBus
from gateway.mqtt.rpc import RpcError, RpcServer
from gateway.mqtt.topics import WASH_CMD, WASH_CMD_FILTER, WASH_CMD_RESULT, WASH_STATUS
from gateway.store.dbthread import DbThread
from gateway.wash.machine import BayMachine, Decision, Effects, OpenSession, Verdict, View, Write
from gateway.wash.scan import scan
from gateway.wash.store import Persist, WashStore, naive_utc
from plc.bus import BayAddress, BusScheduler, BusSettings, PlcError, PollResult
from plc.profile import Profile, encode_command, load_profiles

log = logging.getLogger(__name__)

ACTIONS = ("START", "STOP", "RESET")

TICK_SEC = 0.1


@dataclass
class _Bay:
    id: str
    name: str
    profile: Profile
    bus: str
    machine: BayMachine
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    logged: tuple[str, str | None] = ("", None)
    day: str = ""
    day_seq: int = 0
    unsaved: View | None = None  # the latest view to store that no write has carried yet


@dataclass(frozen=True)
class _Batch:
    fx: Effects
    view: View



def bus_settings(c: BusConfig) -> BusSettings:
    """The gateway's bus configuration as plc/ takes it."""
    return BusSettings(name=c.name, type=c.type, device=c.device, baudrate=c.baudrate, parity=c.parity,
                       stopbits=c.stopbits, bytesize=c.bytesize, rts_direction=c.rts_direction,
                       direction_gpio=c.direction_gpio, host=c.host, port=c.port,
                       timeout=None if c.timeout_ms is None else c.timeout_ms / 1000, retries=c.retries)


class WashService:
    def __init__(self, config: Config, db: SqliteDatabase, bus: LocalBus,
                 on_health: Callable[[dict[str, bool]], None]) -> None:
        self.config = config
        self.db = db
        self.bus = bus
        self.on_health = on_health
        self.zone = zoneinfo.ZoneInfo(config.site.timezone)
        self.bays: dict[str, _Bay] = {}
        self.schedulers: dict[str, BusScheduler] = {}
        self.store = WashStore(db, config.site.id, self.zone)
        self._db_thread = DbThread("wash-db", db)
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- start-up -------------------------------------------------------------------------

    async def start(self, rpc: RpcServer) -> None:
        """Load bays from config and store, republish their retained status, wire MQTT and RPC."""
        cfg = self.config
        profiles = load_profiles(cfg.wash.extra_profiles)
        self.profiles = profiles
        rows = await self._db_thread.run(self.store.load, [b.id for b in cfg.bays])
        for b in cfg.bays:
            profile = profiles.get(b.profile)
            if profile is None:
                raise ValueError(f"bay {b.id}: unknown profile {b.profile!r} (known: {', '.join(profiles)})")
            loaded = rows[b.id]
            row, open_session = loaded.row, loaded.open_session
            view = View(changed_at=time.time())
            if row is not None:
                view = View(state=row.state, progress=row.progress, course=row.course, error_code=row.error_code,
                            session_id=row.session_id, request_id=row.request_id,
                            changed_at=row.updated_at.replace(tzinfo=dt.UTC).timestamp(),
                            plc_session=row.plc_session_counter if open_session is not None else None)
            machine = BayMachine(b.id, frozenset(profile.courses.values()), start_timeout=cfg.wash.start_timeout_sec,
                                 offline_after=cfg.wash.offline_after, view=view,
                                 session_open=open_session is not None)
            self.bays[b.id] = _Bay(id=b.id, name=b.name or b.id, profile=profile, bus=b.bus, machine=machine,
                                   day=loaded.day, day_seq=loaded.day_seq)
        await self._db_thread.run(self.store.ensure_rows,
                                  [(bay.id, bay.name, bay.machine.view) for bay in self.bays.values()])
        for bay in self.bays.values():
            await self._publish(bay.id, bay.machine.view)
        for bus_cfg in cfg.buses:
            addrs = [BayAddress(b.id, b.unit, b.base, self.bays[b.id].profile,
                                (b.poll_period_ms or cfg.wash.poll_period_ms) / 1000)
                     for b in cfg.bays if b.bus == bus_cfg.name]
            if addrs:
                self.schedulers[bus_cfg.name] = BusScheduler(bus_settings(bus_cfg), addrs, self._on_poll,
                                                             offline_after=cfg.wash.offline_after,
                                                             backoff_max=cfg.wash.offline_backoff_max_sec)
        self.bus.subscribe(WASH_CMD_FILTER, self._on_mqtt_command)
        rpc.register("wash.command", self._rpc_command)
        rpc.register("wash.diagnostics", self._rpc_diagnostics)
        rpc.register("wash.scan", self._rpc_scan, concurrent=True)  # units × the bus timeout
        self._report_health()

    def services(self) -> list[tuple[str, Callable[[], Any]]]:
        return [(f"plc-bus:{name}", s.run) for name, s in self.schedulers.items()] + [("wash-ticker", self._ticker)]

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._save_unsaved()
        finally:
            await self._db_thread.close()

    # --- commands ---------------------------------------------------------------------------

    async def judge(self, bay_id: str, action: str, course: str | None, request_id: str | None,
                    by: str = "") -> Decision:
        """Decide a START/STOP/RESET for a bay and carry out what it implies; `by` names the
        sender for the reset record ("technician:NAME", "mqtt:ACCOUNT/CLIENT", "cli:USER")."""
        bay = self.bays.get(bay_id)
        if bay is None:
            return Decision(Verdict.REJECTED, 404, "BAY_NOT_FOUND", f"no bay {bay_id!r}")
        decision, fx = bay.machine.command(action, course, request_id, time.time(), str(uuid.uuid4()), by)
        if decision.verdict is Verdict.ACCEPTED:
            log.info("%s: %s accepted (requestId %s%s)", bay_id, action, decision.request_id,
                     f", by {by}" if action == "RESET" else "", extra={"bay_id": bay_id})
        await self._apply(bay, fx)
        return decision

    async def _rpc_command(self, params: dict[str, Any]) -> dict[str, Any]:
        bay_id, action = params.get("bayId"), params.get("action")
        course, request_id, by = params.get("course"), params.get("requestId"), params.get("by", "")
        if not isinstance(bay_id, str) or action not in ACTIONS:
            raise RpcError("VALIDATION_FAILED", "bayId and action START|STOP|RESET are required", 400)
        if (course is not None and not isinstance(course, str)
                or request_id is not None and not isinstance(request_id, str)):
            raise RpcError("VALIDATION_FAILED", "course and requestId must be strings", 400)
        if not isinstance(by, str):
            raise RpcError("VALIDATION_FAILED", "by must be a string", 400)
        d = await self.judge(bay_id, action, course, request_id, by)
        if d.verdict is Verdict.REJECTED:
            raise RpcError(d.code or "CONFLICT", d.message, d.status)
        view = self.bays[bay_id].machine.view
        return {"bayId": bay_id, "course": view.course if action == "START" else None, "requestId": d.request_id,
                "idempotent": d.verdict is Verdict.IDEMPOTENT, "sessionId": view.session_id}

    async def _rpc_diagnostics(self, _params: dict[str, Any]) -> dict[str, Any]:
        """Per bus: link, transactions, reconnects; per bay: polls, errors, last error, latency."""
        return {name: {"connected": s.connected, "transactions": s.transactions, "reconnects": s.reconnects,
                       "type": s.settings.type, "timeout_ms": round(s.timeout * 1000), "line": s.line_stats(),
                       "bays": s.stats()}
                for name, s in self.schedulers.items()}

    async def _rpc_scan(self, params: dict[str, Any]) -> dict[str, Any]:
        """`wash.scan` (gateway.wash.scan): unit ids × bases on one bus, between its polls."""
        bases: dict[str, set[int]] = {}
        for b in self.config.bays:
            bases.setdefault(b.bus, set()).add(b.base)
        return await scan(self.schedulers, self.profiles, bases, params)

    async def command_from(self, bay_id: str, payload: bytes, source: str) -> None:
        """A `wash/{bay}/cmd` message that came another way (the cloud bridge): same rules."""
        await self._on_mqtt_command(WASH_CMD.format(bay_id=bay_id), payload, source)

    async def _on_mqtt_command(self, topic: str, data: bytes, client_id: str | None) -> None:
        topic_bay = topic.split("/")[1]
        try:
            msg = json.loads(data)
            if not isinstance(msg, dict):
                raise ValueError("payload is not a JSON object")
            bay_id, action = msg.get("bayId"), msg.get("action")
            course, request_id = msg.get("course"), msg.get("requestId")
            if bay_id is not None and bay_id != topic_bay:
                raise ValueError(f"bayId {bay_id!r} differs from the topic's {topic_bay!r}")
            if action not in ACTIONS:
                raise ValueError("action must be START, STOP or RESET")
            if course is not None and not isinstance(course, str):
                raise ValueError("course must be a string")
            if request_id is not None and not isinstance(request_id, str):
                raise ValueError("requestId must be a string")
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("wash/%s/cmd from %r rejected: %s", topic_bay, client_id, exc)
            await self._publish_result(topic_bay, None, None,
                                       Decision(Verdict.REJECTED, 400, "VALIDATION_FAILED", str(exc)))
            return
        d = await self.judge(topic_bay, action, course, request_id, self._mqtt_sender(client_id))
        if d.verdict is Verdict.REJECTED:
            log.info("wash/%s/cmd %s from %r refused: %s %s", topic_bay, action, client_id, d.code, d.message,
                     extra={"bay_id": topic_bay})
        await self._publish_result(topic_bay, action, request_id, d)

    def _mqtt_sender(self, client_id: str | None) -> str:
        """Who sent an MQTT command, for the reset record: the account's name (authenticated),
        with the client id (chosen by the client) beside it."""
        user = self.bus.username_of(client_id) if client_id else None
        return f"mqtt:{user}/{client_id}" if user else f"mqtt:{client_id}"

    async def _publish_result(self, bay_id: str, action: str | None, request_id: str | None, d: Decision) -> None:
        body = {"bayId": bay_id, "action": action, "requestId": d.request_id or request_id,
                "accepted": d.verdict is not Verdict.REJECTED, "idempotent": d.verdict is Verdict.IDEMPOTENT,
                "errorCode": d.code, "message": d.message or None, "statusCode": d.status, "timestampUtc": iso_z()}
        await self.bus.publish(WASH_CMD_RESULT.format(bay_id=bay_id), json.dumps(body).encode(), qos=1)

    # --- PLC and time -----------------------------------------------------------------------

    def _on_poll(self, result: PollResult) -> None:
        bay = self.bays.get(result.bay_id)
        if bay is None:
            return
        now = time.time()
        if result.status is not None:
            fx = bay.machine.on_poll(result.status, now)
        else:
            fx = bay.machine.on_poll_failed(now)
        if fx:
            self._spawn(self._apply(bay, fx))

    async def _ticker(self) -> None:
        save_every = self.config.wash.status_save_sec
        next_save = time.monotonic() + save_every
        while True:
            await asyncio.sleep(TICK_SEC)
            now = time.time()
            for bay in self.bays.values():
                fx = bay.machine.tick(now)
                if fx:
                    await self._apply(bay, fx)
            if time.monotonic() >= next_save:
                next_save = time.monotonic() + save_every
                await self._save_unsaved()

    async def _save_unsaved(self) -> None:
        """Store every bay's unsaved view in one transaction."""
        items = self._take_unsaved()
        if items:
            await self._store(items)

    def _take_unsaved(self) -> list[Persist]:
        items: list[Persist] = [(b.id, b.name, b.unsaved, []) for b in self.bays.values() if b.unsaved is not None]
        for bay in self.bays.values():
            bay.unsaved = None
        return items

    async def _store(self, items: list[Persist]) -> None:
        """Persist in one transaction; unsaved views taken for it are given back if it fails."""
        try:
            await self._db_thread.run(self.store.persist, items)
        except BaseException:
            for bay_id, _name, view, sessions in items:  # unless a newer view came meanwhile
                if not sessions and self.bays[bay_id].unsaved is None:
                    self.bays[bay_id].unsaved = view
            raise

    # --- effects ----------------------------------------------------------------------------

    def _prepare(self, bay: _Bay, fx: Effects) -> _Batch:
        """Fix what the effects mean *now* (session ids, the view to persist and publish), so that
        carrying them out later, after other effects of the same bay, stays in order and exact."""
        for s in fx.sessions:
            if isinstance(s, OpenSession):
                bay.machine.view.session_id = self._next_session_id(bay, s.at)
        return _Batch(fx, _copy_view(bay.machine.view))

    async def _carry_out(self, bay: _Bay, batch: _Batch) -> None:
        fx, view = batch.fx, batch.view
        for w in fx.writes:
            self._spawn(self._write(bay, w))
        async with bay.lock:  # FIFO: effects of one bay are stored and published in order
            if fx.resets:
                await self._db_thread.run(self.store.persist_resets, bay.id, fx.resets)
            if fx.sessions:
                bay.unsaved = None  # this write carries a newer view
                # The other bays' unsaved views ride along: one commit instead of two.
                await self._store([(bay.id, bay.name, view, fx.sessions), *self._take_unsaved()])
            elif fx.persist:
                bay.unsaved = view
            if fx.publish or fx.sessions:
                if (view.state, view.error_code) != bay.logged:
                    log.info("%s: %s%s", bay.id, view.state, f" ({view.error_code})" if view.error_code else "",
                             extra={"bay_id": bay.id})
                    bay.logged = (view.state, view.error_code)
                await self._publish(bay.id, view)
                self._report_health()

    def _apply(self, bay: _Bay, fx: Effects) -> Any:
        """Prepare now; return the coroutine that carries the effects out."""
        return self._carry_out(bay, self._prepare(bay, fx))

    async def _write(self, bay: _Bay, w: Write) -> None:
        scheduler = self.schedulers.get(bay.bus)
        if scheduler is None:
            return
        code = bay.profile.course_code(w.course) if w.course else 0
        regs = encode_command(bay.profile, w.action, code or 0, w.seq)
        try:
            await scheduler.write(bay.id, bay.profile.command_offset, regs)
        except PlcError as exc:
            # The machine's timers turn an unanswered START into START_TIMEOUT.
            log.warning("%s: writing %s failed: %s", bay.id, w.action, exc, extra={"bay_id": bay.id})

    def _next_session_id(self, bay: _Bay, at: float) -> str:
        local = dt.datetime.fromtimestamp(at, self.zone)
        day = local.strftime("%Y%m%d")
        if day != bay.day:
            bay.day, bay.day_seq = day, 0
        bay.day_seq += 1
        return f"{local.strftime('%Y%m%d-%H%M%S')}-{bay.id}-{bay.day_seq:03d}"

    async def _publish(self, bay_id: str, v: View) -> None:
        body = {"bayId": bay_id, "sessionId": v.session_id, "requestId": v.request_id, "state": v.state,
                "progress": v.progress, "course": v.course, "errorCode": v.error_code,
                "timestampUtc": iso_z(naive_utc(v.changed_at))}
        await self.bus.publish(WASH_STATUS.format(bay_id=bay_id), json.dumps(body).encode(), qos=1, retain=True)

    def _report_health(self) -> None:
        self.on_health({b.id: b.machine.view.state != "OFFLINE" for b in self.bays.values()})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("wash: carrying out effects failed", exc_info=task.exception())


def _copy_view(v: View) -> View:
    return dataclasses.replace(v)
