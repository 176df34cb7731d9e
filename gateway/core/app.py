"""The core process: store, embedded broker, RPC, health, systemd notifications.

`CoreApp(config, secrets)` does no I/O. `await app.run(stop)` opens and migrates the store,
starts the broker, tells systemd READY=1, runs every long-lived service under the supervisor
until `stop` is set, then shuts down (STOPPING=1) within `SHUTDOWN_BUDGET` seconds.
Later components (bays, devices, commands, uplink) are added as services and RPC methods here.
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


def _dead_letters(db: SqliteDatabase | None, seqs: list[int], action: str) -> int:
    """Requeue (pending again, attempts reset) or discard dead outbox events; others are untouched."""
    from gateway.store import write_tx
    from gateway.store.models import OutboxEvent
    from gateway.store.outbox import state_is

    assert db is not None
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


class CoreApp:
    def __init__(self, config: Config, secrets: Secrets, notifier: Notifier | None = None) -> None:
        self.config = config
        self.secrets = secrets
        self.notifier = notifier or Notifier()
        self.health = Health(cloud_configured=bool(config.cloud.url))
        self.started_at = time.monotonic()
        self.db: SqliteDatabase | None = None
        self.bus: LocalBus | None = None
        self.rpc: RpcServer | None = None
        self.ready = asyncio.Event()
        self.wash: WashService | None = None
        self.presence: PresenceService | None = None
        self.pairing: PairingWindow | None = None
        self.commands: CommandService | None = None
        self.drainer: OutboxDrainer | None = None
        self.payments: PaymentFollower | None = None
        self.bridge: CloudBridge | None = None
        self.gpio: GpioService | None = None
        self.pi: PiMonitor | None = None  # the Pi's own health (gateway/core/health.py)
        self._orderly_stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        self.bad_messages = BadMessages()  # malformed ACK/streaming per device (RPC devices.bad_messages)

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        t0 = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self.notifier.status("opening the database")
        self.db = open_database(cfg.paths.database)
        applied = migrate(self.db)
        if applied:
            log.info("applied schema migrations %s", applied)
        self.pi = PiMonitor(Path(cfg.health.sys_root), Path(cfg.paths.database).parent,
                            check_sec=cfg.health.check_sec, disk_warn_percent=cfg.health.disk_warn_percent,
                            temperature_warn_c=cfg.health.temperature_warn_c, on_change=self._on_pi_health)
        self.pi.marker.start()
        await asyncio.to_thread(self.pi.read)
        self.health.pi = self.pi.summary()
        self.notifier.status("starting the MQTT broker")
        ensure_fd_limit(cfg.mqtt.max_connections + FD_RESERVE)
        self.bus = LocalBus(broker_settings(cfg.mqtt, self.secrets.mqtt_internal_password))
        await self.bus.reload_accounts(mqtt_accounts.load(self.db))
        try:
            await self.bus.start()
            self.rpc = RpcServer(self.bus)
            self._register_rpc(self.rpc)
            await self._publish_retained()
            self.wash = WashService(cfg, self.db, self.bus, self._on_plc_health)
            await self.wash.start(self.rpc)
            self.presence = PresenceService(cfg, self.secrets, self.db, self.bus, self.bad_messages)
            await self.presence.start()
            self.pairing = PairingWindow(self.bus, cfg.devices.pairing_window_sec)
            await self.pairing.start(self.rpc)
            self.commands = CommandService(cfg, self.secrets, self.db, self.bus, self.bad_messages)
            await self.commands.start(self.rpc)
            self.drainer = OutboxDrainer(cfg, self.secrets.cloud_key, self.db)
            self.payments = PaymentFollower(cfg, self.secrets, self.db, self.bus)
            await self.payments.start(self.rpc)
            recovery = RecoveryCodes(self.db)
            recovery.register(self.rpc)
            pairing = self.pairing

            async def short_press() -> None:
                await pairing.open(PAIRING_SEC, by="service button")

            async def long_press() -> None:
                recovery.issue()

            self.gpio = GpioService(cfg.gpio, self.health.snapshot, short_press, long_press)
            self.gpio.start()
            services = [Service("bus-dispatch", self.bus.dispatch_forever),
                        Service("mqtt-accounts", self._reload_mqtt_accounts)]
            parts = (self.wash.services() + self.presence.services() + self.pairing.services()
                     + self.commands.services() + self.payments.services() + self.gpio.services())
            services += [Service(name, run) for name, run in parts]
            services += [Service("uplink-drainer", self.drainer.run), Service("uplink-health", self._uplink_health)]
            services.append(Service("pi-health", self.pi.run))
            if cfg.cloud.bridge.enabled:
                self.bridge = self._make_bridge()
                services.append(Service("cloud-bridge", self.bridge.run))
            if self.notifier.watchdog_interval:
                services.append(Service("watchdog", self._watchdog, backoff_min=0.1))
            supervisor = Supervisor(services)
            task = asyncio.create_task(supervisor.run(), name="supervisor")
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
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        if self.gpio is not None:
            self.gpio.stop()
        if self.presence is not None:
            await self.presence.stop()
        if self.commands is not None:
            await self.commands.stop()
        if self.payments is not None:
            await self.payments.stop()
        if self.wash is not None:
            try:
                await asyncio.wait_for(self.wash.stop(), SHUTDOWN_BUDGET / 2)
            except TimeoutError:
                _log_stuck("the wash service did not stop")
        if self.bus is not None and self.bus.started:
            offline = {"online": False, "version": __version__, "since": iso_z(), "site_id": self.config.site.id}
            await self.bus.publish(STATUS, json.dumps(offline).encode(), retain=True)
        await asyncio.gather(*self._health_tasks, return_exceptions=True)
        if self.bus is not None:
            try:
                await asyncio.wait_for(self.bus.stop(), SHUTDOWN_BUDGET)
            except TimeoutError:
                log.warning("broker shutdown took longer than %.0f s; leaving it", SHUTDOWN_BUDGET)
        if self.db is not None:
            self.db.close()
        if self.pi is not None and self._orderly_stop:
            self.pi.marker.stop()
        log.info("core stopped")

    def _make_bridge(self) -> CloudBridge:
        """The live MQTT bridge: bay status and device presence out; wash commands, device commands
        and payment pushes in, through the same decision paths as local ones."""
        assert self.bus is not None and self.wash is not None and self.commands is not None
        wash, commands, payments = self.wash, self.commands, self.payments
        assert payments is not None

        async def on_wash_cmd(bay_id: str, payload: bytes) -> None:
            await wash.command_from(bay_id, payload, "cloud-bridge")

        async def on_device_command(device_id: str, payload: bytes) -> None:
            try:
                msg = json.loads(payload)
                if not isinstance(msg, dict):
                    raise ValueError("not a JSON object")
                _answer, start = await commands.submit({"command": msg.get("command"), "payload": msg.get("payload"),
                                                        "device_ids": [device_id], "bulk": False,
                                                        "source": "cloud"})
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

        bridge = CloudBridge(BridgeSettings.from_config(self.config, password=self.secrets.cloud_bridge_password),
                             on_wash_cmd=on_wash_cmd, on_device_command=on_device_command,
                             on_payment_status=on_payment_status)

        def forward(topic: str, payload: bytes) -> None:
            if payload and is_forwarded(topic):
                bridge.forward(topic, payload)

        self.bus.on_publish(forward)
        return bridge

    def _register_rpc(self, rpc: RpcServer) -> None:
        async def ping(_params: dict[str, Any]) -> dict[str, Any]:
            return {"pong": True, "version": __version__, "uptime_sec": round(time.monotonic() - self.started_at, 3)}

        async def uplink_state(_params: dict[str, Any]) -> dict[str, Any]:
            return self.drainer.state() if self.drainer is not None else {"enabled": False}

        async def outbox_action(params: dict[str, Any], action: str) -> dict[str, Any]:
            seqs = params.get("seq")
            if not isinstance(seqs, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seqs):
                raise RpcError("VALIDATION_FAILED", "seq must be a list of outbox sequence numbers", 400)
            assert self.drainer is not None
            changed = await asyncio.get_running_loop().run_in_executor(None, _dead_letters, self.db, seqs, action)
            if action == "requeue":
                self.drainer.wake()
            log.info("outbox: %s %d dead letters", action, changed)
            return {"changed": changed}

        async def broker_stats(_params: dict[str, Any]) -> dict[str, Any]:
            assert self.bus is not None
            return {"clients": len(self.bus.clients), "refused": dict(self.bus.refusals.counts),
                    "handler_errors": self.bus.dropped_handler_errors}

        async def bad_messages(params: dict[str, Any]) -> dict[str, Any] | None:
            device_id = params.get("device_id")
            if not isinstance(device_id, str):
                raise RpcError("VALIDATION_FAILED", "device_id must be a string", 400)
            return self.bad_messages.get(device_id)

        async def pi_health(_params: dict[str, Any]) -> dict[str, Any]:
            return self.pi.snapshot() if self.pi is not None else {}

        async def metrics_scrape(_params: dict[str, Any]) -> dict[str, Any]:
            from gateway.core.metrics import exposition

            return {"text": exposition(self)}

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

    async def _publish_retained(self) -> None:
        """amqtt keeps retained messages in memory only: the core re-creates them at each start."""
        assert self.bus is not None
        status = {"online": True, "version": __version__, "since": iso_z(), "site_id": self.config.site.id}
        await self.bus.publish(STATUS, json.dumps(status).encode(), retain=True)
        await self.publish_health()

    def _on_plc_health(self, plc: dict[str, bool]) -> None:
        if plc == self.health.plc:
            return
        self.health.plc = dict(plc)
        if self.bus is not None:
            # Health changes are rare (a bay going offline or back): one small task each.
            task = asyncio.get_running_loop().create_task(self.publish_health())
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    def _on_pi_health(self) -> None:
        """PiMonitor's warnings changed (called from its thread): republish health on the loop."""
        assert self.pi is not None
        summary = self.pi.summary()
        loop = self._loop

        def apply() -> None:
            if summary != self.health.pi:
                self.health.pi = summary
                if self.bus is not None and self.bus.started:
                    task = asyncio.get_running_loop().create_task(self.publish_health())
                    self._health_tasks.add(task)
                    task.add_done_callback(self._health_tasks.discard)

        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the reading ran
                loop.call_soon_threadsafe(apply)

    async def publish_health(self) -> None:
        assert self.bus is not None
        await self.bus.publish(HEALTH, json.dumps(self.health.snapshot()).encode(), retain=True)

    async def _reload_mqtt_accounts(self) -> None:
        """Follow `mqtt_account` (written by the web and the `mqtt-user` CLI, which cannot reach
        the broker's memory): a read of a few rows a second, on the loop (a WAL read never waits
        for a writer)."""
        assert self.bus is not None and self.db is not None
        while True:
            await asyncio.sleep(MQTT_ACCOUNTS_RELOAD_SEC)
            await self.bus.reload_accounts(mqtt_accounts.load(self.db))

    async def _uplink_health(self) -> None:
        """Health follows the drainer: reachable cloud, degraded, and the backlog rounded so that a
        busy outbox does not republish health on every event."""
        while True:
            assert self.drainer is not None
            st = self.drainer.state()
            backlog = st["backlog"]
            failing = bool(st["enabled"]) and st["consecutive_failures"] > 0
            summary = {"degraded": st["degraded"], "reasons": st["degraded_reasons"], "dead": st["dead_total"],
                       "failing": failing, "backlog": backlog if backlog < 100 else round(backlog, -2),
                       "bridge": None if self.bridge is None else self.bridge.connected}
            cloud = bool(st["enabled"]) and not failing
            if summary != self.health.uplink or cloud != self.health.cloud:
                self.health.uplink, self.health.cloud = summary, cloud
                await self.publish_health()
            await asyncio.sleep(UPLINK_HEALTH_SEC)

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval or 1.0
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)
