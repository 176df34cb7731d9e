"""The core process: store, embedded broker, RPC, health, systemd notifications.

Contract
- `CoreApp(config, secrets, notifier)` does no I/O. `await app.run(stop)` builds the core's parts
  (`CoreParts`: opens and migrates the store, starts the broker, the RPC server and every service,
  registering each one's stop as soon as it started), tells systemd READY=1, sets `ready`, runs
  every long-lived service under the supervisor until `stop` is set (or the supervisor fails),
  then stops the parts in the reverse order of their start (STOPPING=1) within
  `SHUTDOWN_BUDGET` seconds and closes the database. A part that fails to start stops the ones
  started before it and the error propagates.
- `app.parts` is the fully-built `CoreParts` from `ready` on (kept after the stop for inspection);
  only `bridge` is optional (None when `[cloud.bridge]` is off).
- The core's own RPC methods (`ping`, `broker.stats`, `devices.bad_messages`, `uplink.*`) are
  here; each service registers its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peewee import SqliteDatabase

from gateway import __version__
from gateway.access import mqtt_accounts
from gateway.access.recovery import RecoveryCodes
from gateway.clock import iso_z
from gateway.commands.service import CommandService
from gateway.config import Config, MqttConfig, Secrets
from gateway.core.gpio import PAIRING_SEC, GpioService
from gateway.core.health import PiMonitor
from gateway.core.sdnotify import Notifier
from gateway.core.supervisor import Service, Supervisor
from gateway.devices.badmessages import BadMessages
from gateway.devices.pairing import PairingWindow
from gateway.devices.presence import PresenceService
from gateway.mqtt.broker import BrokerSettings, LocalBus
from gateway.mqtt.rpc import RpcError, RpcServer
from gateway.mqtt.topics import HEALTH, STATUS
from gateway.payments.follower import PaymentFollower
from gateway.store import migrate, open_database
from gateway.uplink.bridge import BridgeSettings, CloudBridge, is_forwarded
from gateway.uplink.drainer import OutboxDrainer
from gateway.wash.service import WashService

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET = 4.0
UPLINK_HEALTH_SEC = 2.0
MQTT_ACCOUNTS_RELOAD_SEC = 1.0  # an account added, changed or removed takes effect within this
TEST_HOOKS_ENV = "CARWASH_GATEWAY_TEST_HOOKS"


def _log_stuck(what: str) -> None:
    """Say which tasks hold up the shutdown (with their stacks), once."""
    current = asyncio.current_task()
    for t in asyncio.all_tasks():
        if t is not current and not t.done():
            frames = t.get_stack(limit=3)
            where = " <- ".join(f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno}" for f in frames)
            log.error("shutdown: %s: pending task %s at %s", what, t.get_name(), where or "?")


def _dead_letters(db: SqliteDatabase, seqs: list[int], action: str) -> int:
    """Requeue (pending again, attempts reset) or discard dead outbox events; others are untouched."""
    from gateway.store import write_tx
    from gateway.store.models import OutboxEvent
    from gateway.store.outbox import state_is

    with write_tx(db):
        q = OutboxEvent.seq.in_(seqs) & state_is("dead")
        if action == "requeue":
            return int(OutboxEvent.update(state="pending", attempts=0, last_error=None).where(q).execute())
        return int(OutboxEvent.delete().where(q).execute())


class Health:
    """What the core knows of the parts it owns; published retained on `gateway/health`."""

    def __init__(self, cloud_configured: bool) -> None:
        self.cloud_configured = cloud_configured
        self.plc: dict[str, bool] = {}
        self.cloud = False
        self.uplink: dict[str, Any] = {}
        self.pi: dict[str, Any] = {"attention": False, "warnings": []}  # PiMonitor.summary()

    def snapshot(self) -> dict[str, Any]:
        return {"plc": dict(self.plc), "cloud": self.cloud, "cloud_configured": self.cloud_configured,
                "uplink": dict(self.uplink), "pi": dict(self.pi), "at": iso_z()}


# Descriptors besides MQTT connections: database, WAL, serial ports, PLC and cloud sockets, logs.
FD_RESERVE = 256


def broker_settings(mqtt: MqttConfig, internal_password: str) -> BrokerSettings:
    """The `[mqtt]` section as the broker takes it (BrokerSettings uses the same names)."""
    names = {f.name for f in dataclasses.fields(BrokerSettings)} - {"internal_password"}
    return BrokerSettings(internal_password=internal_password, **{n: getattr(mqtt, n) for n in names})


def ensure_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `needed` (never above the hard limit) and return it. Under
    systemd the soft limit is 1024 whatever the hard one: without this, `mqtt.max_connections`
    above about 1000 would fail in accept() rather than be refused cleanly."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < needed:
        log.warning("only %d file descriptors allowed (hard limit): mqtt.max_connections needs about %d", soft, needed)
    return soft


@dataclass(frozen=True)
class CoreParts:
    """Everything the core runs, built and started: no part is missing (bridge: configured off)."""

    db: SqliteDatabase
    bus: LocalBus
    rpc: RpcServer
    health: HealthReporter
    wash: WashService
    presence: PresenceService
    pairing: PairingWindow
    commands: CommandService
    drainer: OutboxDrainer
    payments: PaymentFollower
    gpio: GpioService
    pi: PiMonitor
    bridge: CloudBridge | None

    def services(self) -> list[Service]:
        """Every long-lived task of the parts, for the supervisor."""
        parts = (self.wash.services() + self.presence.services() + self.pairing.services()
                 + self.commands.services() + self.payments.services() + self.gpio.services())
        services = [Service("bus-dispatch", self.bus.dispatch_forever)]
        services += [Service(name, run) for name, run in parts]
        services.append(Service("uplink-drainer", self.drainer.run))
        services.append(Service("pi-health", self.pi.run))
        if self.bridge is not None:
            services.append(Service("cloud-bridge", self.bridge.run))
        return services


class HealthReporter:
    """Publishes `Health` retained on `gateway/health` when it changes."""

    def __init__(self, bus: LocalBus, health: Health, loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.health = health
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    def on_plc(self, plc: dict[str, bool]) -> None:
        """The wash service's view of its bays (online or not); published when it changed."""
        if plc == self.health.plc:
            return
        self.health.plc = dict(plc)
        # Health changes are rare (a bay going offline or back): one small task each.
        task = asyncio.get_running_loop().create_task(self.publish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_pi_threadsafe(self, summary: dict[str, Any]) -> None:
        """The Pi's warnings changed (PiMonitor calls this from its thread): published on the loop."""

        def apply() -> None:
            if summary != self.health.pi:
                self.health.pi = summary
                if self.bus.started:
                    task = self._loop.create_task(self.publish())
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

        with contextlib.suppress(RuntimeError):  # the loop closed while the reading ran
            self._loop.call_soon_threadsafe(apply)

    async def publish(self) -> None:
        await self.bus.publish(HEALTH, json.dumps(self.health.snapshot()).encode(), retain=True)

    async def drain(self) -> None:
        """Wait for the publishes under way."""
        await asyncio.gather(*self._tasks, return_exceptions=True)


class CoreApp:
    def __init__(self, config: Config, secrets: Secrets, notifier: Notifier | None = None) -> None:
        self.config = config
        self.secrets = secrets
        self.notifier = notifier or Notifier()
        self.health = Health(cloud_configured=bool(config.cloud.url))
        self.started_at = time.monotonic()
        self.ready = asyncio.Event()
        self.bad_messages = BadMessages()  # malformed ACK/streaming per device (RPC devices.bad_messages)
        self._parts: CoreParts | None = None
        self._orderly_stop = False

    @property
    def parts(self) -> CoreParts:
        """The running core's parts (from `ready` on)."""
        if self._parts is None:
            raise RuntimeError("the core is not running yet")
        return self._parts

    def _on_plc_health(self, plc: dict[str, bool]) -> None:
        self.parts.health.on_plc(plc)

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        t0 = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            parts = self._parts = await self._build(stack)
            services = parts.services()
            services += [Service("mqtt-accounts", lambda: self._reload_mqtt_accounts(parts)),
                         Service("uplink-health", lambda: self._uplink_health(parts))]
            if self.notifier.watchdog_interval:
                services.append(Service("watchdog", self._watchdog, backoff_min=0.1))
            task = asyncio.create_task(Supervisor(services).run(), name="supervisor")
            elapsed = time.monotonic() - t0
            self.notifier.ready(f"running: MQTT on {cfg.mqtt.bind}:{cfg.mqtt.port}")
            self.ready.set()
            log.info("core ready in %.0f ms (MQTT %s:%d, site %s)",
                     elapsed * 1000, cfg.mqtt.bind, cfg.mqtt.port, cfg.site.id)
            stop_wait = asyncio.create_task(stop.wait(), name="stop-wait")
            done, _ = await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            self.notifier.stopping()
            log.info("core stopping")
            for t in (task, stop_wait):
                t.cancel()
            _, pending = await asyncio.wait({task, stop_wait}, timeout=SHUTDOWN_BUDGET / 2)
            if pending:
                _log_stuck("services did not stop")
            failure = task.exception() if task in done else None
            if failure is not None:
                raise failure
            self._orderly_stop = True
        log.info("core stopped")

    async def _build(self, stack: contextlib.AsyncExitStack) -> CoreParts:
        """Open, start and wire every part; each one's stop is pushed on `stack` once it started,
        so the stack stops them in reverse order (also when a later part fails to start)."""
        cfg, secrets = self.config, self.secrets
        self.notifier.status("opening the database")
        db = open_database(cfg.paths.database)
        stack.callback(db.close)
        applied = migrate(db)
        if applied:
            log.info("applied schema migrations %s", applied)
        bus = LocalBus(broker_settings(cfg.mqtt, secrets.mqtt_internal_password))
        health = HealthReporter(bus, self.health, asyncio.get_running_loop())
        pi = PiMonitor(Path(cfg.health.sys_root), Path(cfg.paths.database).parent,
                       check_sec=cfg.health.check_sec, disk_warn_percent=cfg.health.disk_warn_percent,
                       temperature_warn_c=cfg.health.temperature_warn_c,
                       on_change=lambda: health.on_pi_threadsafe(pi.summary()))
        pi.marker.start()  # removed only by an orderly stop: its presence at start means a power cut or a crash
        stack.callback(lambda: pi.marker.stop() if self._orderly_stop else None)
        await asyncio.to_thread(pi.read)
        self.health.pi = pi.summary()
        self.notifier.status("starting the MQTT broker")
        ensure_fd_limit(cfg.mqtt.max_connections + FD_RESERVE)
        stack.push_async_callback(self._stop_bus, bus, health)
        await bus.reload_accounts(mqtt_accounts.load(db))
        await bus.start()
        rpc = RpcServer(bus)
        await self._publish_retained(bus, health)

        wash = WashService(cfg, db, bus, health.on_plc)
        stack.push_async_callback(self._stop_wash, wash)
        await wash.start(rpc)
        presence = PresenceService(cfg, secrets, db, bus, self.bad_messages)
        stack.push_async_callback(presence.stop)
        await presence.start()
        pairing = PairingWindow(bus, cfg.devices.pairing_window_sec)
        await pairing.start(rpc)
        commands = CommandService(cfg, secrets, db, bus, self.bad_messages)
        stack.push_async_callback(commands.stop)
        await commands.start(rpc)
        drainer = OutboxDrainer(cfg, secrets.cloud_key, db)
        payments = PaymentFollower(cfg, secrets, db, bus)
        stack.push_async_callback(payments.stop)
        await payments.start(rpc)
        recovery = RecoveryCodes(db)
        recovery.register(rpc)

        async def short_press() -> None:
            await pairing.open(PAIRING_SEC, by="service button")

        async def long_press() -> None:
            recovery.issue()

        gpio = GpioService(cfg.gpio, self.health.snapshot, short_press, long_press)
        gpio.start()
        stack.callback(gpio.stop)
        bridge = make_bridge(self.config, self.secrets, bus, wash, commands, payments) \
            if cfg.cloud.bridge.enabled else None
        self._register_rpc(rpc, db, bus, drainer, pi)
        return CoreParts(db=db, bus=bus, rpc=rpc, health=health, wash=wash, presence=presence, pairing=pairing,
                         commands=commands, drainer=drainer, payments=payments, gpio=gpio, pi=pi, bridge=bridge)

    async def _stop_wash(self, wash: WashService) -> None:
        try:
            await asyncio.wait_for(wash.stop(), SHUTDOWN_BUDGET / 2)
        except TimeoutError:
            _log_stuck("the wash service did not stop")

    async def _stop_bus(self, bus: LocalBus, health: HealthReporter) -> None:
        """Say offline (retained), let health publishes end, stop the broker (bounded)."""
        if bus.started:
            offline = {"online": False, "version": __version__, "since": iso_z(), "site_id": self.config.site.id}
            await bus.publish(STATUS, json.dumps(offline).encode(), retain=True)
        await health.drain()
        try:
            await asyncio.wait_for(bus.stop(), SHUTDOWN_BUDGET)
        except TimeoutError:
            log.warning("broker shutdown took longer than %.0f s; leaving it", SHUTDOWN_BUDGET)

    def _register_rpc(self, rpc: RpcServer, db: SqliteDatabase, bus: LocalBus, drainer: OutboxDrainer,
                      pi: PiMonitor) -> None:
        async def ping(_params: dict[str, Any]) -> dict[str, Any]:
            return {"pong": True, "version": __version__, "uptime_sec": round(time.monotonic() - self.started_at, 3)}

        async def uplink_state(_params: dict[str, Any]) -> dict[str, Any]:
            return drainer.state()

        async def outbox_action(params: dict[str, Any], action: str) -> dict[str, Any]:
            seqs = params.get("seq")
            if not isinstance(seqs, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seqs):
                raise RpcError("VALIDATION_FAILED", "seq must be a list of outbox sequence numbers", 400)
            changed = await asyncio.get_running_loop().run_in_executor(None, _dead_letters, db, seqs, action)
            if action == "requeue":
                drainer.wake()
            log.info("outbox: %s %d dead letters", action, changed)
            return {"changed": changed}

        async def broker_stats(_params: dict[str, Any]) -> dict[str, Any]:
            return {"clients": len(bus.clients), "refused": dict(bus.refusals.counts),
                    "handler_errors": bus.dropped_handler_errors}

        async def bad_messages(params: dict[str, Any]) -> dict[str, Any] | None:
            device_id = params.get("device_id")
            if not isinstance(device_id, str):
                raise RpcError("VALIDATION_FAILED", "device_id must be a string", 400)
            return self.bad_messages.get(device_id)

        async def pi_health(_params: dict[str, Any]) -> dict[str, Any]:
            return pi.snapshot()

        async def metrics_scrape(_params: dict[str, Any]) -> dict[str, Any]:
            from gateway.core.metrics import exposition

            return {"text": exposition(self.parts)}

        rpc.register("ping", ping)
        rpc.register("health.pi", pi_health)
        rpc.register("metrics.scrape", metrics_scrape)
        rpc.register("broker.stats", broker_stats)
        rpc.register("devices.bad_messages", bad_messages)
        if os.environ.get(TEST_HOOKS_ENV) == "1":
            async def block(params: dict[str, Any]) -> dict[str, Any]:
                # Test hook only (never set by the units): freeze the event loop as a hung handler
                # would, so a test can see the watchdog pings stop.
                time.sleep(min(float(params.get("seconds", 1.0)), 30.0))
                return {"blocked": True}

            log.warning("test hooks enabled (%s=1): the debug.block RPC exists", TEST_HOOKS_ENV)
            rpc.register("debug.block", block)
        rpc.register("uplink.state", uplink_state)
        rpc.register("uplink.requeue", lambda p: outbox_action(p, "requeue"))
        rpc.register("uplink.discard", lambda p: outbox_action(p, "discard"))

    async def _publish_retained(self, bus: LocalBus, health: HealthReporter) -> None:
        """amqtt keeps retained messages in memory only: the core re-creates them at each start."""
        status = {"online": True, "version": __version__, "since": iso_z(), "site_id": self.config.site.id}
        await bus.publish(STATUS, json.dumps(status).encode(), retain=True)
        await health.publish()

    async def _reload_mqtt_accounts(self, parts: CoreParts) -> None:
        """Follow `mqtt_account` (written by the web and the `mqtt-user` CLI, which cannot reach
        the broker's memory): a read of a few rows a second, on the loop (a WAL read never waits
        for a writer)."""
        while True:
            await asyncio.sleep(MQTT_ACCOUNTS_RELOAD_SEC)
            await parts.bus.reload_accounts(mqtt_accounts.load(parts.db))

    async def _uplink_health(self, parts: CoreParts) -> None:
        """Health follows the drainer: reachable cloud, degraded, and the backlog rounded so that a
        busy outbox does not republish health on every event."""
        while True:
            st = parts.drainer.state()
            backlog = st["backlog"]
            failing = bool(st["enabled"]) and st["consecutive_failures"] > 0
            summary = {"degraded": st["degraded"], "reasons": st["degraded_reasons"], "dead": st["dead_total"],
                       "failing": failing, "backlog": backlog if backlog < 100 else round(backlog, -2),
                       "bridge": None if parts.bridge is None else parts.bridge.connected}
            cloud = bool(st["enabled"]) and not failing
            if summary != self.health.uplink or cloud != self.health.cloud:
                self.health.uplink, self.health.cloud = summary, cloud
                await parts.health.publish()
            await asyncio.sleep(UPLINK_HEALTH_SEC)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval or 1.0
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)


def make_bridge(config: Config, secrets: Secrets, bus: LocalBus, wash: WashService, commands: CommandService,
                payments: PaymentFollower) -> CloudBridge:
    """The live MQTT bridge: bay status and device presence out; wash commands, device commands
    and payment pushes in, through the same decision paths as local ones."""

    async def on_wash_cmd(bay_id: str, payload: bytes) -> None:
        await wash.command_from(bay_id, payload, "cloud-bridge")

    async def on_device_command(device_id: str, payload: bytes) -> None:
        try:
            msg = json.loads(payload)
            if not isinstance(msg, dict):
                raise ValueError("not a JSON object")
            _answer, start = await commands.submit({"command": msg.get("command"), "payload": msg.get("payload"),
                                                    "device_ids": [device_id], "bulk": False, "source": "cloud"})
        except (ValueError, RpcError) as exc:
            log.warning("cloud command for %s refused: %s", device_id, exc)
            return
        start()

    async def on_payment_status(charge_id: str, payload: bytes) -> None:
        try:
            status = json.loads(payload).get("status")
            if not isinstance(status, str):
                raise ValueError("status must be a string")
            await payments.apply(charge_id, status)
        except (ValueError, AttributeError, RpcError) as exc:
            log.warning("cloud payment status for %s ignored: %s", charge_id, exc)

    bridge = CloudBridge(BridgeSettings.from_config(config, password=secrets.cloud_bridge_password),
                         on_wash_cmd=on_wash_cmd, on_device_command=on_device_command,
                         on_payment_status=on_payment_status)

    def forward(topic: str, payload: bytes) -> None:
        if payload and is_forwarded(topic):
            bridge.forward(topic, payload)

    bus.on_publish(forward)
    return bridge
