"""Fakes at the seams the core already has, for in-process tests of its services.

- `FakeClock` replaces the `time` module *of one product module* (`monkeypatch.setattr(mod, "time",
  clock)`): that module's `time.time()` / `time.monotonic()` stand still until the test calls
  `advance()`. Decisions the service takes on time (timeouts, offline) become exact; the service's
  own loops still sleep in real time, so an advanced clock is noticed at the next tick.
- `Rig` is the part of `CoreApp.run` a service needs: the store migrated in a temporary directory,
  the real embedded broker (`LocalBus`) on 127.0.0.1 at a free port with its dispatcher, and the
  `RpcServer`. Services are constructed as `gateway/core/app.py` constructs them and started with
  `rig.run(service, ...)`: their `services()` run as tasks until the rig closes, then `stop()`.
- `FakeFieldbus` stands in for one bus's `BusScheduler` inside `WashService.schedulers`: it records
  the writes the service makes and hands it the poll results the test composes, through the
  scheduler's `on_poll` callback (the seam the real scheduler reports through).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask
from peewee import SqliteDatabase

from gateway.config import Config, Secrets
from gateway.core.app import broker_settings
from gateway.mqtt.broker import LocalBus
from gateway.mqtt.rpc import RpcServer
from gateway.store import migrate, open_database
from plc.bus import BusScheduler, PlcError, PollResult
from plc.profile import builtin_profiles, decode_status
from tests.conftest import Site
from tests.mqtt_probe import Msg, Probe
from web.app import create_app
from web.context import ctx

# 2026-01-14T08:00:00Z, the seeds' timestamp (15:00 in the demo site's Asia/Bangkok).
SEED_EPOCH = 1768377600.0
# Waits for something the test caused: generous, as the machine is shared; they end early on success.
WAIT = 10.0


class FakeClock:
    """A module's `time`, frozen until `advance()`; anything else falls through to the real module."""

    def __init__(self, wall: float = SEED_EPOCH) -> None:
        self.wall = wall
        self.mono = 10_000.0

    def time(self) -> float:
        return self.wall

    def time_ns(self) -> int:
        return int(self.wall * 1e9)

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@dataclass
class Rig:
    config: Config
    secrets: Secrets
    db: SqliteDatabase
    bus: LocalBus
    rpc: RpcServer
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _stops: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.config.mqtt.port

    def probe(self, *, internal: bool = True, client_id: str | None = None) -> Probe:
        """A paho client on the rig's broker: the internal user (every topic) or an anonymous device."""
        if internal:
            return Probe(self.port, username=self.config.mqtt.internal_username,
                         password=self.secrets.mqtt_internal_password, client_id=client_id)
        return Probe(self.port, client_id=client_id)

    def run(self, parts: list[tuple[str, Callable[[], Any]]], stop: Callable[[], Awaitable[None]]) -> None:
        """Run a service's `services()` as tasks (as the supervisor would) and `stop` it at close."""
        for name, fn in parts:
            self._tasks.append(asyncio.create_task(fn(), name=name))
        self._stops.append(stop)

    async def close(self) -> None:
        """Cancel the services' tasks, then stop the services (latest first). Idempotent: a test
        may close early to look at what the services stored on the way out."""
        tasks, self._tasks = self._tasks, []
        stops, self._stops = self._stops, []
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for stop in reversed(stops):
            await stop()
        # A service task that died of an error (not cancelled) is a failure the test must see.
        errors = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
        assert not errors, f"service tasks failed: {errors!r}"


@contextlib.asynccontextmanager
async def rig(site: Site) -> AsyncIterator[Rig]:
    """Store, broker, dispatcher and RPC as `CoreApp.run` sets them up, torn down in its order."""
    cfg, secrets = site.config, site.secrets
    db = open_database(cfg.paths.database)
    migrate(db)
    bus = LocalBus(broker_settings(cfg.mqtt, secrets.mqtt_internal_password))
    await bus.start()
    dispatcher = asyncio.create_task(bus.dispatch_forever(), name="bus-dispatch")
    r = Rig(cfg, secrets, db, bus, RpcServer(bus))
    try:
        yield r
    finally:
        try:
            await r.close()
        finally:
            try:
                # The test's clients are closed by now; the broker must have finished with their
                # connections before it shuts down, or it leaves their transports open (a
                # ResourceWarning at some later garbage collection, in whichever test runs then).
                await bus.wait_clients(lambda clients: not clients, WAIT)
            finally:
                dispatcher.cancel()
                await asyncio.gather(dispatcher, return_exceptions=True)
                await bus.stop()
                db.close()
                # Whatever the broker left open is reported now, against this test, not at some
                # later collection in another one.
                gc.collect()


async def expect(probe: Probe, topic: str, timeout: float = WAIT) -> Msg:
    """The next message on `topic` (others are skipped), without blocking the loop the broker runs on."""
    return await asyncio.to_thread(probe.expect, topic, timeout)


async def publish(probe: Probe, topic: str, payload: bytes) -> None:
    """Publish QoS 1 and wait for the PUBACK, off the loop the broker runs on."""
    await asyncio.to_thread(probe.publish, topic, payload, 1, False, WAIT)


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait for state that the service's loop changes; polls the loop, not the wall clock."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@dataclass
class Reading:
    """One poll block as a washbay-v1 PLC reports it (names where the registers hold codes)."""

    state: str = "IDLE"
    progress: int = 0
    ack_seq: int = 0
    error_code: int = 0
    course: str | None = None
    session_counter: int = 0


class FakeFieldbus:
    """One bus of `WashService.schedulers`: writes are recorded (and can be made to fail), polls come
    from the test. `heartbeat` moves on every poll, as a live PLC's does."""

    def __init__(self, real: BusScheduler) -> None:
        self.settings = real.settings
        self.profile = builtin_profiles()["washbay-v1"]  # the site's bays use the shipped profile
        self.on_poll = real.on_poll
        self.timeout = real.timeout
        self.connected = True
        self.writes: asyncio.Queue[tuple[str, int, list[int]]] = asyncio.Queue()
        self.fail_writes: str | None = None
        self._heartbeat = 0

    @classmethod
    def install(cls, service: Any) -> dict[str, FakeFieldbus]:
        """Replace every scheduler of a started (not yet running) WashService."""
        fakes = {name: cls(s) for name, s in service.schedulers.items()}
        service.schedulers.update(fakes)
        return fakes

    async def run(self) -> None:
        await asyncio.Event().wait()

    async def write(self, bay_id: str, offset: int, values: list[int]) -> None:
        self.writes.put_nowait((bay_id, offset, list(values)))
        if self.fail_writes:
            raise PlcError(self.fail_writes)

    async def next_write(self, timeout: float = WAIT) -> tuple[str, int, list[int]]:
        async with asyncio.timeout(timeout):
            return await self.writes.get()

    def poll(self, bay_id: str, r: Reading, at: float = 0.0) -> None:
        """Report one poll of `bay_id`: the reading is rendered into the profile's registers and
        decoded by the real codec, as the scheduler does with a PLC's reply."""
        self._heartbeat += 1
        p = self.profile
        regs = [0] * p.poll_count

        def put(name: str, value: int) -> None:
            regs[p.registers[name] - p.poll_offset] = value

        states = {name: code for code, name in p.states.items()}
        put("state", states[r.state])
        put("progress", r.progress)
        put("ack_seq", r.ack_seq)
        put("error_code", r.error_code)
        put("course", p.course_code(r.course) or 0 if r.course else 0)
        put("heartbeat", self._heartbeat)
        put("session_counter", r.session_counter >> 16)
        regs[p.registers["session_counter"] - p.poll_offset + 1] = r.session_counter & 0xFFFF
        self.on_poll(PollResult(bay_id, decode_status(p, regs), None, 0.001, at))

    def poll_failed(self, bay_id: str, error: str = "timeout", at: float = 0.0) -> None:
        self.on_poll(PollResult(bay_id, None, error, 0.0, at))

    def stats(self) -> dict[str, dict[str, Any]]:
        return {}

    def line_stats(self) -> dict[str, float]:
        return {}


@contextlib.contextmanager
def web_app(site: Site, probe: Blueprint, *, migrated: bool = False) -> Iterator[Flask]:
    """The web app of `site` with a test blueprint, started without the bus (and its database
    migrated when asked), stopped afterwards."""
    a = create_app(site.config, site.secrets)
    a.register_blueprint(probe)
    ctx(a).start(connect_bus=False)
    try:
        if migrated:
            migrate(ctx(a).db)
        yield a
    finally:
        ctx(a).stop()
