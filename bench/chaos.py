"""Chaos: a whole site under load while its processes are SIGKILLed and its links cut, then a
check of every acknowledged fact against what the clients recorded (the hardening issue).

The site runs on 127.0.0.1: the real core and web (gunicorn) processes; in this process the cloud
simulator (`sim.cloud.CloudSim`), the washbay-v1 PLC simulators (four bays over Modbus RTU
on a socat pty pair, two on Modbus TCP; `sim.plc`), the device fleet (`sim.fleet`, one
MQTT session per device, reconnecting here) and the load generators:
- event-log uploads (signed HTTP, new items each time; a failed upload is retried with the same
  items until it gets its 201, as firmware keeps its buffer);
- washes started on every idle bay (`POST /api/wash/start`, a retry after no answer keeps the
  `requestId`), a few stopped;
- bulk commands by the technician (`apply-config` / `bulk-restart` to every device; the fleet
  answers success, failure, late or never; `devices.command_timeout_sec` is short);
- QR payments (signed `POST /api/v1/payment-gateway/payments`; the simulator settles them).

Faults, drawn with a seeded RNG (`CHAOS_SEED`, default `SEED`) from a shuffled deck so every kind
occurs: SIGKILL of the core, SIGKILL of the web (master and worker), a cloud outage (`go_away` or
a stall after recording, so the gateway never learns the answer), the RS485 bus cut (socat
killed) and the TCP PLC muted. Killed processes are restarted at once and waited for on their
NOTIFY_SOCKET (READY=1; the web also until it joined the broker); outages last a few seconds.

Then everything is restored, the load stops (uploads still unacknowledged keep retrying) and the
site settles: waits on conditions, each with a timeout. The verification compares the ground
truth of the clients (only what the gateway acknowledged) with the SQLite database and with what
the cloud simulator recorded:
- each event-log item answered 201: once in `event_log_item`, once in the cloud's
  `device.event_logs` events (matched by content: device, timestamp, type, status, amounts);
- each wash answered 200: one session with its `requestId`, finished; every finished session
  once at the cloud (`wash.session`, same final state);
- each command answered INITIATED: a final result (SUCCESS/FAILED/TIMEOUT/ERROR) for every device,
  and no command anywhere still pending; every final result once at the cloud (`command.result`);
- each payment answered 200: its charge stored, its PENDING and final `payment.updated` once at
  the cloud, the stored final status equal to the simulator's;
- each bay: the gateway's state (REST and the `bay` row) equal to its PLC simulator's.
"Duplicated" is the same fact under two different event ids (re-sent ids are the simulator's
`duplicates` counter: expected after a kill, and harmless). Every figure is measured in the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import psutil

from bench.common import WEB_CONNECTED, Result, log, tail, temp_dir
from gateway.access.signing import http_signature
from plc.profile import builtin_profiles
from sim.cloud import CloudSim
from sim.demo import (
    DEMO_CLOUD_KEY,
    DEMO_USER,
    demo_plc_toml,
    ensure_demo_user,
    free_port,
    spec_test_key,
    write_demo_site,
)
from sim.fleet import CAR_WASH_CONFIGS, Fleet, FleetThread, SimDevice
from sim.plc import PlcSimulator, SimBay
from sim.procs import NotifySocket, child_env, gateway_command
from sim.pty import SocatPair

NAME = "chaos"
SEED = 7
SITE_ID = "demo-site"  # write_demo_site's
RTU_BAYS = ("bay1", "bay2", "bay3", "bay4")  # demo_plc_toml: units 1-4 on the RS485 bus
TCP_BAYS = (("bay5", 1, 0), ("bay6", 1, 18))  # one TCP PLC, two base addresses
COURSES = sorted(builtin_profiles()["washbay-v1"].courses.values())
FINAL_RESULTS = ("SUCCESS", "FAILED", "TIMEOUT", "ERROR", "SENT")
FINAL_PAYMENTS = ("SUCCEEDED", "FAILED", "CANCELLED")
# Event types that carry facts (never coalesced or dropped, uplink.md); the others are latest-state.
FACT_TYPES = ("device.event_logs", "wash.session", "command.result", "payment.updated")
START_TIMEOUT = 30.0  # a process must say READY=1 within this
WASH_RETRY_WINDOW = 4.0  # a START without an answer is retried (same requestId) this long: < wash time
UPLOAD_DRAIN_SEC = 30.0  # after the load stops, unacknowledged uploads keep retrying this long


@dataclass(frozen=True)
class Plan:
    """The size of a run."""

    duration: float  # seconds of chaos under load
    devices: int
    uploaders: int  # upload threads
    upload_pause: float  # between uploads of one thread
    payment_pause: float
    command_pause: float
    fault_gap: float  # mean seconds between faults (exponential)
    outage: tuple[float, float]  # uniform range of an outage's length, seconds
    wash_time: float  # simulated wash length; longer than WASH_RETRY_WINDOW
    command_timeout: float


QUICK = Plan(duration=75.0, devices=20, uploaders=3, upload_pause=0.15, payment_pause=0.6, command_pause=3.0,
             fault_gap=5.0, outage=(3.0, 8.0), wash_time=8.0, command_timeout=3.0)
FULL = Plan(duration=300.0, devices=40, uploaders=4, upload_pause=0.1, payment_pause=0.4, command_pause=3.0,
            fault_gap=7.0, outage=(3.0, 12.0), wash_time=8.0, command_timeout=3.0)
FAULT_DECK = ("core", "web", "cloud", "rtu", "tcp", "core", "web", "cloud")


# --- HTTP clients ------------------------------------------------------------------------------


def _http(base: str, method: str, path: str, body: Any = None, *, key: str | None = None,
          headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int | None, Any]:
    """(status, JSON body) of one request; (None, None) when there was no answer (refused, reset,
    timeout): the caller cannot know whether it was carried out. `key` signs the raw body."""
    raw = None if body is None else json.dumps(body, separators=(",", ":")).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if key is not None and raw is not None:
        hdrs["x-signature"] = http_signature(raw, key)
    req = urllib.request.Request(base + path, data=raw, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except (OSError, ValueError):
            return e.code, None
    except (OSError, ValueError):  # URLError, reset, timeout, a body cut short
        return None, None


# --- ground truth ------------------------------------------------------------------------------

ItemKey = tuple[str, int, str, str, int, tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]


def item_key(device: str, item: dict[str, Any]) -> ItemKey:
    """Content identity of an event-log item: device, timestamp, type, status, amounts (zero
    counts dropped: the gateway may store `{"20": 0}` as nothing)."""
    def counts(v: Any) -> tuple[tuple[str, int], ...]:
        while isinstance(v, str):  # a JSON column may hold the document as text
            v = json.loads(v)
        return tuple(sorted((str(k), int(n)) for k, n in (v or {}).items() if n))

    return (device, int(item["timestamp"]), str(item["type"]), str(item["status"]), int(item["total_amount"]),
            counts(item.get("bank")), counts(item.get("coin")))


@dataclass
class Truth:
    """What the clients were told; every method is thread-safe."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    items: set[ItemKey] = field(default_factory=set)  # answered 201
    counts: Counter[str] = field(default_factory=Counter)
    washes: dict[str, str] = field(default_factory=dict)  # requestId -> bay, answered 200
    commands: dict[str, list[str]] = field(default_factory=dict)  # command_id -> devices, INITIATED
    payments: dict[str, tuple[str, int]] = field(default_factory=dict)  # chargeId -> (device, satang)
    refused: Counter[str] = field(default_factory=Counter)  # "what: errorCode" of definite refusals

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def refuse(self, what: str, doc: Any) -> None:
        code = doc.get("errorCode") if isinstance(doc, dict) else None
        with self.lock:
            self.refused[f"{what}: {code or 'no envelope'}"] += 1


# --- the PLC side ------------------------------------------------------------------------------


@dataclass
class PlcWash:
    """One wash the simulated PLC ran (wall-clock times, for matching with stored sessions)."""

    bay: str
    started: float
    ended: float | None = None
    outcome: str | None = None  # DONE | CANCELED


class RecordingPlc(PlcSimulator):
    """The washbay-v1 simulator, also recording every wash it runs: the PLC's own truth."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.washes: list[PlcWash] = []
        self._open: dict[str, PlcWash] = {}
        self._wlock = threading.Lock()

    def _begin(self, b: SimBay, course: int, now: float) -> None:
        super()._begin(b, course, now)
        w = PlcWash(b.bay_id, time.time())
        with self._wlock:
            self.washes.append(w)
            self._open[b.bay_id] = w

    def _ended(self, b: SimBay, before: str) -> None:
        if before != b.state and b.state in ("DONE", "CANCELED"):
            with self._wlock:
                w = self._open.pop(b.bay_id, None)
                if w is not None:
                    w.ended, w.outcome = time.time(), b.state

    def _advance(self, b: SimBay, now: float) -> None:
        before = b.state
        super()._advance(b, now)
        self._ended(b, before)

    def _command(self, b: SimBay, cmd: int, course: int, seq: int, now: float) -> None:
        before = b.state
        super()._command(b, cmd, course, seq, now)
        self._ended(b, before)

    def shown(self, bay: str) -> str:
        """The state the gateway must show for this bay (an error code means ERROR)."""
        b = self.bays[bay]
        return "ERROR" if b.error_code else b.state


class PlcHost:
    """Both PLC simulators and the socat pair, on an event loop in a thread of this process."""

    def __init__(self, tmp: Path, wash_time: float) -> None:
        self.pair = SocatPair(tmp / "pty")
        self.tcp_port = free_port()
        self.wash_time = wash_time
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chaos-plc", daemon=True)
        self.rtu: RecordingPlc | None = None
        self.tcp: RecordingPlc | None = None

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.pair.start()
        self.rtu = RecordingPlc([(b, i + 1, 0) for i, b in enumerate(RTU_BAYS)], rtu_path=self.pair.plc_path,
                                wash_time=self.wash_time)
        self.tcp = RecordingPlc(list(TCP_BAYS), tcp=("127.0.0.1", self.tcp_port), wash_time=self.wash_time)
        self.call(self.rtu.start())
        self.call(self.tcp.start())

    def stop(self) -> None:
        if self.thread.is_alive():
            for sim in (self.rtu, self.tcp):
                if sim is not None:
                    with contextlib.suppress(Exception):
                        self.call(sim.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.pair.stop()
        if not self.thread.is_alive():
            self.loop.close()

    def cut_rtu(self) -> None:
        """The USB-RS485 adapter vanishes: socat SIGKILLed, both pty ends gone."""
        self.pair.kill()

    def restore_rtu(self) -> None:
        self.pair.start()
        assert self.rtu is not None
        self.call(self.rtu.reopen())

    def mute_tcp(self, on: bool) -> None:
        assert self.tcp is not None
        sim = self.tcp
        self.loop.call_soon_threadsafe(sim.mute, None, on)

    def sims(self) -> list[RecordingPlc]:
        return [s for s in (self.rtu, self.tcp) if s is not None]

    def states(self) -> dict[str, str]:
        async def read() -> dict[str, str]:
            return {bay: sim.shown(bay) for sim in self.sims() for bay in sim.bays}

        return self.call(read())  # type: ignore[no-any-return]

    def washes(self) -> list[PlcWash]:
        out: list[PlcWash] = []
        for sim in self.sims():
            with sim._wlock:
                out += [PlcWash(w.bay, w.started, w.ended, w.outcome) for w in sim.washes]
        return out


# --- devices -----------------------------------------------------------------------------------


# paho logs every connection the killed core reset ("failed to receive on socket"): expected here.
_QUIET_MQTT = logging.getLogger("bench.chaos.mqtt")
_QUIET_MQTT.setLevel(logging.CRITICAL)


class ChaosFleet(Fleet):
    """The simulated fleet, with what firmware does when the broker goes away: reconnect."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.reconnects = 0  # MQTT sessions lost and opened again, over the fleet

    async def _live(self, d: SimDevice, stop: asyncio.Event) -> None:
        counted = False
        while not stop.is_set():
            try:
                async with aiomqtt.Client(self.mqtt_host, self.mqtt_port, identifier=d.device_id,
                                          keepalive=15, logger=_QUIET_MQTT) as client:
                    await client.subscribe(f"device/{d.device_id}/command", qos=1)
                    if not counted:
                        counted = True
                        self.connected += 1
                        if self.connected == len(self.devices):
                            self.ready.set()
                    stopper = asyncio.create_task(stop.wait())
                    tasks = [asyncio.create_task(self._stream(d, client, stop)),
                             asyncio.create_task(self._commands(d, client))]
                    try:
                        await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for t in (stopper, *tasks):
                            t.cancel()
                        await asyncio.gather(stopper, *tasks, return_exceptions=True)
            except aiomqtt.MqttError:
                pass  # the broker went away (core killed): reconnect below
            if not stop.is_set():
                self.reconnects += 1
                with contextlib.suppress(TimeoutError):  # a device's reconnect back-off
                    await asyncio.wait_for(stop.wait(), random.uniform(0.3, 1.0))

    async def _answer(self, d: SimDevice, client: aiomqtt.Client, cmd: dict[str, Any]) -> None:
        with contextlib.suppress(aiomqtt.MqttError):  # the session died under a pending answer
            await super()._answer(d, client, cmd)


# --- the gateway's processes -------------------------------------------------------------------


class Gateway:
    """The core and web processes of the site: start (wait for READY=1), SIGKILL, stop."""

    def __init__(self, tmp: Path, config: Path) -> None:
        self.tmp, self.config = tmp, config
        self.procs: dict[str, psutil.Popen] = {}
        self.notifies: list[NotifySocket] = []
        self.starts: Counter[str] = Counter()
        self.ready_ms: dict[str, list[float]] = {"core": [], "web": []}

    def log_path(self, name: str) -> Path:
        return self.tmp / f"{name}-{self.starts[name]}.log"

    def start(self, name: str) -> None:
        """Start `core` or `web` and return once it said READY=1 (the web: and joined the broker).
        The process is registered before the wait, so a failed start is still stopped."""
        self.starts[name] += 1
        notify = NotifySocket(self.tmp / f"{name}-{self.starts[name]}.notify")
        self.notifies.append(notify)
        t0 = time.monotonic()
        with self.log_path(name).open("wb") as out:
            self.procs[name] = psutil.Popen(gateway_command(name, "--config", str(self.config)),
                                            env=child_env(notify), stdout=out, stderr=out)
        try:
            at = notify.wait_for("READY=1", START_TIMEOUT)
            if name == "web":
                at = notify.wait_for(WEB_CONNECTED, START_TIMEOUT)
        except TimeoutError as exc:
            raise RuntimeError(f"{name} did not become ready: {exc}\n{tail(self.log_path(name))}") from None
        self.ready_ms[name].append((at - t0) * 1000)

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children (gunicorn's worker first: no orphan finishes a request)."""
        proc = self.procs.pop(name)
        victims = [*_children(proc), proc]
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=10)

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def stop(self) -> None:
        """SIGTERM web then core, SIGKILL what is left after 10 s; close every notify socket."""
        for name in ("web", "core"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            victims = [*_children(proc), proc]
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
            _gone, alive = psutil.wait_procs(victims, timeout=10)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(alive, timeout=5)
        for n in self.notifies:
            n.close()
        self.notifies.clear()


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)  # type: ignore[no-any-return]
    except psutil.NoSuchProcess:
        return []


# --- load --------------------------------------------------------------------------------------


class Load:
    """The site's clients, each a thread, recording into `Truth` only what was acknowledged."""

    def __init__(self, base: str, key: str, devices: list[str], plan: Plan, truth: Truth, seed: int) -> None:
        self.base, self.key, self.devices, self.plan, self.truth = base, key, devices, plan, truth
        self.seed = seed
        self.stop = threading.Event()  # no new operations
        self.give_up_at = float("inf")  # monotonic: unacknowledged uploads stop retrying
        self.threads: list[threading.Thread] = []
        self._ts = itertools.count(int(time.time() * 1000))  # unique item timestamps
        self._ts_lock = threading.Lock()
        self._rid = itertools.count(1)
        self.token: str | None = None

    def start(self) -> None:
        workers: list[tuple[str, Callable[[random.Random], None]]] = [
            *((f"chaos-upload-{i}", self._uploader) for i in range(self.plan.uploaders)),
            ("chaos-wash", self._washer), ("chaos-commands", self._commander), ("chaos-pay", self._payer)]
        for i, (name, fn) in enumerate(workers):
            rng = random.Random(self.seed * 1000 + i)
            t = threading.Thread(target=self._guard, args=(fn, rng), name=name, daemon=True)
            self.threads.append(t)
            t.start()

    def _guard(self, fn: Callable[[random.Random], None], rng: random.Random) -> None:
        try:
            fn(rng)
        except Exception as exc:  # a load thread's bug must show in the figures, not vanish
            log(f"{NAME}: {threading.current_thread().name} crashed: {exc!r}")
            self.truth.count("load thread crashed")

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _pause(self, seconds: float) -> None:
        self.stop.wait(seconds)  # pacing of the load, not synchronisation

    # event logs

    def _items(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            with self._ts_lock:
                ts = next(self._ts)
            notes, coins = rng.randint(0, 3), rng.randint(0, 4)
            status = rng.choice(("SUCCEEDED", "SUCCEEDED", "SUCCEEDED", "FAILED"))
            out.append({"type": "PAYMENT", "status": status, "timestamp": ts, "total_amount": 20 * notes + 10 * coins,
                        "bank": {"20": notes, "50": 0, "100": 0, "500": 0, "1000": 0},
                        "coin": {"1": 0, "2": 0, "5": 0, "10": coins}, "qr": {"chargeId": None, "net_amount": 0}})
        return out

    def _uploader(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            device = rng.choice(self.devices)
            items = self._items(rng, rng.randint(1, 10))
            body = {"device_id": device, "items": items}
            first = True
            while True:  # the device keeps its buffer until the gateway took it
                status, doc = _http(self.base, "POST", "/api/v1/device-event-logs/uploads", body, key=self.key)
                self.truth.count("upload requests")
                if status == 201:
                    with self.truth.lock:
                        self.truth.items.update(item_key(device, it) for it in items)
                        self.truth.counts["uploads acked"] += 1
                        self.truth.counts["upload retries acked"] += not first
                    break
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    self.truth.refuse("upload", doc)
                    break
                first = False
                if time.monotonic() > self.give_up_at:
                    self.truth.count("uploads never acked")
                    self.truth.count("items never acked", len(items))
                    break
                time.sleep(0.25)  # the device's retry back-off (also while the load is stopping)
            self._pause(self.plan.upload_pause)

    # washes

    def _washer(self, rng: random.Random) -> None:
        unknown: dict[str, tuple[str, str, float]] = {}  # bay -> (requestId, course, first try)
        while not self.stop.is_set():
            status, bays = _http(self.base, "GET", "/api/bays")
            if status != 200 or not isinstance(bays, list):
                self._pause(0.3)
                continue
            for b in bays:
                bay, state = b["bayId"], b["state"]
                if bay in unknown:
                    rid, course, first = unknown.pop(bay)
                    if time.monotonic() - first <= WASH_RETRY_WINDOW:
                        self._start(bay, rid, course, first, unknown)
                    else:
                        self.truth.count("wash starts never answered")
                elif state in ("IDLE", "DONE", "CANCELED") and rng.random() < 0.8:
                    self._start(bay, f"chaos-{self.seed}-{next(self._rid)}", rng.choice(COURSES), time.monotonic(),
                                unknown)
                elif state == "WASHING" and rng.random() < 0.03:
                    st, doc = _http(self.base, "POST", "/api/wash/stop", {"bayId": bay})
                    self.truth.count("wash stops accepted" if st == 200 else "wash stops refused or lost")
            self._pause(0.4)
        self.truth.count("wash starts never answered", len(unknown))

    def _start(self, bay: str, rid: str, course: str, first: float,
               unknown: dict[str, tuple[str, str, float]]) -> None:
        status, doc = _http(self.base, "POST", "/api/wash/start", {"bayId": bay, "course": course, "requestId": rid})
        self.truth.count("wash start requests")
        code = doc.get("errorCode") if isinstance(doc, dict) else None
        if status == 200:
            with self.truth.lock:
                self.truth.washes[rid] = bay
                self.truth.counts["washes accepted (idempotent retry)" if doc.get("idempotent")
                                  else "washes accepted"] += 1
        elif status is None or (status == 503 and code == "SERVICE_UNAVAILABLE") or (status >= 500 and code is None):
            unknown[bay] = (rid, course, first)  # the core may have taken it: ask again, same requestId
        else:
            self.truth.refuse("wash start", doc)

    # commands

    def _login(self) -> bool:
        status, doc = _http(self.base, "POST", "/api/v1/auth/login",
                            {"username": DEMO_USER[0], "password": DEMO_USER[1]})
        if status == 200 and isinstance(doc, dict):
            self.token = doc["data"]["token"]
            return True
        return False

    def _commander(self, rng: random.Random) -> None:
        n = 0
        while not self.stop.is_set():
            if self.token is None and not self._login():
                self._pause(0.5)
                continue
            n += 1
            if n % 2:
                path, body = "/api/v1/devices/apply-config", {"device_ids": self.devices, "configs": CAR_WASH_CONFIGS}
            else:
                path, body = "/api/v1/devices/bulk-restart", {"device_ids": self.devices}
            status, doc = _http(self.base, "POST", path, body, headers={"Authorization": f"Bearer {self.token}"})
            self.truth.count("command requests")
            if status == 200 and isinstance(doc, dict) and doc["data"].get("status") == "INITIATED":
                with self.truth.lock:
                    self.truth.commands[doc["data"]["command_id"]] = list(doc["data"]["device_ids"])
            elif status == 401:
                self.token = None
            elif status is None or status >= 500:
                self.truth.count("commands without an answer or 5xx")
            else:
                self.truth.refuse("command", doc)
            self._pause(self.plan.command_pause * rng.uniform(0.7, 1.3))

    # payments

    def _payer(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            device, amount = rng.choice(self.devices), rng.randint(1, 500) * 100
            status, doc = _http(self.base, "POST", "/api/v1/payment-gateway/payments",
                                {"device_id": device, "amount": amount, "payment_method": "QR_PROMPT_PAY",
                                 "description": "chaos"}, key=self.key)
            self.truth.count("payment requests")
            if status == 200 and isinstance(doc, dict):
                with self.truth.lock:
                    self.truth.payments[doc["data"]["payment_results"]["chargeId"]] = (device, amount)
            elif status is None:
                self.truth.count("payments without an answer")
            else:
                self.truth.refuse("payment", doc)
            self._pause(self.plan.payment_pause * rng.uniform(0.5, 1.5))


# --- faults ------------------------------------------------------------------------------------


class Chaos:
    """Draws faults from a shuffled deck at exponential gaps; kills restart at once, outages end
    after a random length. `run()` returns when the time is up and every outage is over."""

    def __init__(self, gw: Gateway, plc: PlcHost, cloud: CloudSim, plan: Plan, seed: int) -> None:
        self.gw, self.plc, self.cloud, self.plan = gw, plc, cloud, plan
        self.rng = random.Random(seed)
        self.deck: list[str] = []
        self.kills: Counter[str] = Counter()
        self.outages: Counter[str] = Counter()
        self.outage_sec: list[float] = []
        self.active: dict[str, tuple[float, float, Callable[[], None]]] = {}  # kind -> (since, until, restore)
        self.timeline: list[tuple[float, str]] = []
        self.t0 = time.monotonic()

    def _note(self, what: str) -> None:
        self.timeline.append((time.monotonic() - self.t0, what))
        log(f"{NAME}: t={time.monotonic() - self.t0:5.1f} s {what}")

    def _draw(self) -> str:
        if not self.deck:
            self.deck = list(FAULT_DECK)
            self.rng.shuffle(self.deck)
        return self.deck.pop()

    def _fault(self, kind: str) -> None:
        if kind in ("core", "web"):
            self.gw.kill(kind)
            self.kills[kind] += 1
            self._note(f"SIGKILL {kind}")
            self.gw.start(kind)
            self._note(f"{kind} READY again after {self.gw.ready_ms[kind][-1]:.0f} ms")
            return
        if kind in self.active:
            return  # that link is down already
        length = self.rng.uniform(*self.plan.outage)
        restore: Callable[[], None]
        if kind == "cloud":
            if self.outages["cloud"] % 2 == 0:  # alternate: both ways of losing the cloud occur
                self.cloud.go_away()
                restore, what = self.cloud.come_back, "cloud gone (connections cut, port closed)"
            else:
                self.cloud.stall(None, after_processing=True)
                restore, what = self.cloud.release, "cloud stalls after recording (answers never come)"
        elif kind == "rtu":
            self.plc.cut_rtu()
            restore, what = self.plc.restore_rtu, "RS485 bus cut (socat killed)"
        else:
            self.plc.mute_tcp(True)
            restore, what = (lambda: self.plc.mute_tcp(False)), "TCP PLC muted"
        now = time.monotonic()
        self.active[kind] = (now, now + length, restore)
        self.outages["cloud" if kind == "cloud" else "plc"] += 1
        self._note(f"{what} for {length:.1f} s")

    def _restore(self, kind: str) -> None:
        since, _until, restore = self.active.pop(kind)
        restore()
        self.outage_sec.append(time.monotonic() - since)
        self._note(f"{kind} restored")

    def run(self, stop: threading.Event) -> None:
        end = self.t0 + self.plan.duration
        next_fault = self.t0 + self.rng.expovariate(1 / self.plan.fault_gap)
        while time.monotonic() < end and not stop.is_set():
            due = min([next_fault, end, *(u for _s, u, _r in self.active.values())])
            stop.wait(max(0.0, due - time.monotonic()))  # the schedule's own clock
            now = time.monotonic()
            for kind in [k for k, (_s, u, _r) in self.active.items() if u <= now]:
                self._restore(kind)
            if now >= next_fault and now < end:
                self._fault(self._draw())
                next_fault = time.monotonic() + self.rng.expovariate(1 / self.plan.fault_gap)
        self.restore_all()

    def restore_all(self) -> None:
        """End every outage; one that fails to end is logged (the settle checks will show it)."""
        for kind in list(self.active):
            try:
                self._restore(kind)
            except Exception as exc:
                log(f"{NAME}: restoring {kind} failed: {exc!r}")


# --- settling and verification -----------------------------------------------------------------


def _db(path: Path) -> sqlite3.Connection:
    """A reader beside the gateway's processes (WAL: never blocks their writes)."""
    conn = sqlite3.connect(path, timeout=10)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = _db(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait_until(what: str, predicate: Callable[[], bool], timeout: float, waited: dict[str, float]) -> bool:
    """Until `predicate()`, checked every 0.2 s; False after `timeout` (logged, the check reports it)."""
    t0 = time.monotonic()
    while True:
        if predicate():
            waited[what] = time.monotonic() - t0
            return True
        if time.monotonic() - t0 > timeout:
            waited[what] = float("nan")
            log(f"{NAME}: settle: {what} not reached within {timeout:g} s")
            return False
        time.sleep(0.2)


def _bay_states(base: str) -> dict[str, str] | None:
    status, bays = _http(base, "GET", "/api/bays")
    if status != 200 or not isinstance(bays, list):
        return None
    return {b["bayId"]: b["state"] for b in bays}


def bays_agree(base: str, plc: PlcHost, db: Path) -> dict[str, tuple[str, str | None, str | None]]:
    """Bays whose PLC state differs from the gateway's (REST) or the stored row: {bay: (plc, rest, row)}."""
    shown = _bay_states(base) or {}
    rows = dict(_query(db, 'SELECT "bay_id", "state" FROM "bay"'))
    return {bay: (st, shown.get(bay), rows.get(bay)) for bay, st in plc.states().items()
            if shown.get(bay) != st or rows.get(bay) != st}


def cloud_facts(cloud: CloudSim) -> dict[str, Counter[Any]]:
    """Per fact, how many distinct cloud events carry it (the simulator already merged re-sent ids)."""
    facts: dict[str, Counter[Any]] = {"items": Counter(), "sessions": Counter(), "results": Counter(),
                                      "payments": Counter()}
    for ev in cloud.events():
        p, typ = ev.get("payload") or {}, ev.get("type")
        if typ == "device.event_logs":
            for it in p.get("items", []):
                facts["items"][item_key(p["device_id"], it)] += 1
        elif typ == "wash.session":
            facts["sessions"][(p["sessionId"], p["state"])] += 1
        elif typ == "command.result":
            facts["results"][(p["command_id"], p["device_id"], p["status"])] += 1
        elif typ == "payment.updated":
            facts["payments"][(p["charge_id"], p["status"])] += 1
    return facts


def _keys_once(counter: Counter[Any], keys: Any) -> tuple[int, int]:
    """(missing, more than once) of `keys` in `counter`."""
    missing = dupes = 0
    for k in keys:
        n = counter.get(k, 0)
        missing += n == 0
        dupes += n > 1
    return missing, dupes


def verify(truth: Truth, db: Path, cloud: CloudSim, plc: PlcHost, base: str) -> dict[str, Any]:
    """Compare the ground truth, the database and the cloud; the counts of every check."""
    at_cloud = cloud_facts(cloud)
    out: dict[str, Any] = {}
    # event logs
    db_items: Counter[ItemKey] = Counter()
    for dev, ts, typ, st, total, bank, coin in _query(
            db, 'SELECT "device_id", "timestamp_ms", "type", "status", "total_amount", "bank", "coin" '
                'FROM "event_log_item"'):
        db_items[item_key(dev, {"timestamp": ts, "type": typ, "status": st, "total_amount": total,
                                "bank": bank, "coin": coin})] += 1
    out["items lost (db)"], out["items twice (db)"] = _keys_once(db_items, truth.items)
    out["items lost (cloud)"], _ = _keys_once(at_cloud["items"], truth.items)
    out["items duplicated (cloud)"] = sum(1 for n in at_cloud["items"].values() if n > 1)
    out["items stored without a 201"] = sum(1 for k in db_items if k not in truth.items)
    out["items at the cloud not in the db"] = sum(1 for k in at_cloud["items"] if k not in db_items)
    # wash sessions
    sessions = _query(db, 'SELECT "session_id", "bay_id", "request_id", "state", "end_time", "start_time", '
                          '"error_code" FROM "wash_session"')
    by_rid = Counter(rid for _s, _b, rid, *_x in sessions if rid is not None)
    out["washes lost (db)"], out["washes twice (db)"] = _keys_once(by_rid, truth.washes)
    acked = set(truth.washes)
    out["acked washes unfinished (db)"] = sum(1 for _s, _b, rid, _st, end, *_x in sessions
                                              if rid in acked and end is None)
    finished = [(sid, st) for sid, _b, _r, st, end, *_x in sessions if end is not None]
    out["sessions finished (db)"] = len(finished)
    out["sessions lost (cloud)"], _ = _keys_once(at_cloud["sessions"], finished)
    cloud_sids = Counter(sid for sid, _st in at_cloud["sessions"].elements())
    out["sessions duplicated (cloud)"] = sum(1 for n in cloud_sids.values() if n > 1)
    finished_set = set(finished)
    out["sessions at the cloud not in the db"] = sum(1 for k in at_cloud["sessions"] if k not in finished_set)
    out["sessions still open (db)"] = sum(1 for _s, _b, _r, _st, end, *_x in sessions if end is None)
    out["sessions by outcome"] = dict(Counter(f"{st}/{err}" if err else st for st, err in _query(
        db, 'SELECT "state", "error_code" FROM "wash_session" WHERE "end_time" IS NOT NULL')))
    out.update(_plc_sessions(plc.washes(), sessions))
    # commands
    results = _query(db, 'SELECT "command_id", "device_id", "status" FROM "command_result"')
    by_cmd: dict[str, dict[str, str]] = {}
    for cid, dev, st in results:
        by_cmd.setdefault(cid, {})[dev] = st
    missing = unfinished = 0
    for cid, devices in truth.commands.items():
        got = by_cmd.get(cid, {})
        missing += sum(1 for d in devices if d not in got)
        unfinished += sum(1 for d in devices if d in got and got[d] not in FINAL_RESULTS)
    out["command results lost (db)"] = missing
    out["acked command results not final"] = unfinished
    out["command results not final (any command)"] = sum(1 for _c, _d, st in results if st not in FINAL_RESULTS)
    out["commands not completed (db)"] = _query(db, 'SELECT COUNT(*) FROM "command" WHERE "completed_at" IS NULL')[0][0]
    final = [(c, d, st) for c, d, st in results if st in FINAL_RESULTS and st != "SENT"]
    out["command results"] = len(results)
    out["results lost (cloud)"], _ = _keys_once(at_cloud["results"], final)
    per_pair = Counter((c, d) for c, d, _st in at_cloud["results"].elements())
    out["results duplicated (cloud)"] = sum(1 for n in per_pair.values() if n > 1)
    out["results by status"] = dict(Counter(st for _c, _d, st in results))
    # payments
    pays = dict(_query(db, 'SELECT "charge_id", "status" FROM "payment"'))
    out["payments lost (db)"] = sum(1 for ch in truth.payments if ch not in pays)
    expected = [(ch, "PENDING") for ch in pays] + [(ch, st) for ch, st in pays.items() if st in FINAL_PAYMENTS]
    out["payment events lost (cloud)"], _ = _keys_once(at_cloud["payments"], expected)
    out["payment events duplicated (cloud)"] = sum(1 for n in at_cloud["payments"].values() if n > 1)
    sim_status = {c.charge_id: c.status for c in cloud.charges()}
    out["payments differing from the cloud"] = sum(1 for ch, st in pays.items() if sim_status.get(ch) != st)
    out["charges created at the cloud, unknown to the gateway"] = sum(1 for ch in sim_status if ch not in pays)
    # bays
    out["bays inconsistent"] = bays_agree(base, plc, db)
    # outbox against the cloud: an id the cloud has that the outbox never held (or no longer
    # holds) is a fact the cloud learnt outside the outbox's accounting
    stored = dict(_query(db, 'SELECT "event_id", "state" FROM "outbox_event"'))
    out["outbox"] = dict(Counter(stored.values()))
    extra = Counter(ev.get("type") for ev in cloud.events() if ev["id"] not in stored)
    out["cloud events not in the outbox, by type"] = dict(extra)
    out["fact events at the cloud not in the outbox"] = sum(n for t, n in extra.items() if t in FACT_TYPES)
    at = set(cloud.event_ids())
    out["outbox events sent but not at the cloud"] = sum(1 for eid, st in stored.items()
                                                          if st == "sent" and eid not in at)
    return out


def _plc_sessions(washes: list[PlcWash], sessions: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Stored sessions against the washes the PLCs really ran. Per bay, each session is matched
    with the nearest unmatched PLC wash whose start lies in [session start - 15 s, + 3 s] (a
    command's wash starts just after its session opened; a session found by recovery opens after
    its wash started, at most an outage later). Counted as wrong: a DONE or CANCELED session
    without a wash, a session whose final state differs from its wash's outcome (ERROR/PLC_OFFLINE
    excepted: the contract's "outcome cannot be known" after an outage), a wash never recorded.
    An accepted START the PLC never took (the bus went down first) ends in ERROR: not wrong."""
    import datetime as dt

    def wall(v: str) -> float:
        return dt.datetime.fromisoformat(v).replace(tzinfo=dt.UTC).timestamp()

    free: dict[str, list[PlcWash]] = {}
    for w in washes:
        free.setdefault(w.bay, []).append(w)
    phantom: list[str] = []
    never_ran: list[str] = []
    wrong: list[str] = []
    unknowable_known = 0
    for sid, bay, _rid, st, end, start, err in sorted(sessions, key=lambda s: s[5]):
        t = wall(start)
        cands = [w for w in free.get(bay, []) if t - 15.0 <= w.started <= t + 3.0]
        if not cands:
            (never_ran if st == "ERROR" else phantom).append(f"{sid} {st}/{err}")
            continue
        w = min(cands, key=lambda w: abs(w.started - t))
        free[bay].remove(w)
        if end is None:
            continue
        if st == "ERROR" and err == "PLC_OFFLINE":
            unknowable_known += w.outcome is not None
        elif st != w.outcome:
            wrong.append(f"{sid} {st}/{err}, PLC {w.outcome}")
    unrecorded = [f"{w.bay} at {w.started:.1f} {w.outcome}" for ws in free.values() for w in ws]
    return {"PLC washes": len(washes), "sessions without a PLC wash": len(phantom),
            "sessions whose outcome differs from the PLC": len(wrong),
            "PLC washes never recorded": len(unrecorded),
            "ERROR/PLC_OFFLINE sessions the PLC finished": unknowable_known,
            "accepted sessions the PLC never ran (ERROR)": len(never_ran),
            "session mismatches": {"without a wash": phantom, "other outcome": wrong, "never recorded": unrecorded,
                                   "never ran": never_ran}}


# --- the run -----------------------------------------------------------------------------------


def _site_toml(plc: PlcHost, cloud: CloudSim, plan: Plan) -> str:
    return (f"rpc_timeout_sec = 3.0\n"  # still inside [mqtt] of write_demo_site
            f"[devices]\ncommand_timeout_sec = {plan.command_timeout}\nstreaming_interval_sec = 30\n"
            "[wash]\nstart_timeout_sec = 4.0\noffline_after = 3\npoll_period_ms = 200\noffline_backoff_max_sec = 1.0\n"
            f'[cloud]\nurl = "{cloud.url}"\ntimeout_sec = 3.0\n'
            "[outbox]\nbackoff_min_sec = 0.2\nbackoff_max_sec = 2.0\n"
            + demo_plc_toml(plc.pair.gateway_path, plc.tcp_port))


@dataclass
class Site:
    """What `_site` started, and where to reach it."""

    gw: Gateway
    plc: PlcHost
    cloud: CloudSim
    db: Path
    base: str
    mqtt_port: int


@contextlib.contextmanager
def _site(tmp: Path, plan: Plan) -> Iterator[Site]:
    """Cloud, PLCs, config, core and web; everything started is stopped on the way out."""
    cloud = CloudSim(DEMO_CLOUD_KEY, site_id=SITE_ID, payment_auto_delay_sec=2.0)
    plc = PlcHost(tmp, plan.wash_time)
    gw: Gateway | None = None
    try:
        cloud.start()
        plc.start()
        web_port, mqtt_port = free_port(), free_port()
        cfg = write_demo_site(tmp / "site", web_port=web_port, mqtt_port=mqtt_port,
                              extra_toml=_site_toml(plc, cloud, plan))
        ensure_demo_user(cfg)
        gw = Gateway(tmp, cfg)
        gw.start("core")
        gw.start("web")
        yield Site(gw, plc, cloud, tmp / "site" / "gateway.db", f"http://127.0.0.1:{web_port}", mqtt_port)
    finally:
        if gw is not None:
            gw.stop()
        plc.stop()
        cloud.stop()


def _settle(truth: Truth, load: Load, gw: Gateway, plc: PlcHost, cloud: CloudSim, db: Path, base: str,
            plan: Plan) -> dict[str, float]:
    """Load stopped, links up: wait (with timeouts) until bays, commands, payments and the outbox
    are quiet; the seconds each took."""
    waited: dict[str, float] = {}
    load.stop.set()
    load.give_up_at = time.monotonic() + UPLOAD_DRAIN_SEC
    load.join(UPLOAD_DRAIN_SEC + 15)
    for name in ("core", "web"):
        if not gw.alive(name):  # a crash of its own: that is a finding, and the check needs it up
            truth.count(f"{name} exited by itself")
            log(f"{NAME}: {name} exited by itself:\n{tail(gw.log_path(name))}")
            gw.start(name)
    wait_until("bays idle and agreeing with their PLCs",
               lambda: all(s == "IDLE" for s in plc.states().values()) and not bays_agree(base, plc, db),
               plan.wash_time + 40, waited)

    def commands_done() -> bool:
        open_ = _query(db, 'SELECT COUNT(*) FROM "command" WHERE "completed_at" IS NULL')[0][0]
        return open_ == 0

    wait_until("every command completed", commands_done, plan.command_timeout + 30, waited)

    def payments_final() -> bool:
        pays = _query(db, 'SELECT "charge_id", "status" FROM "payment"')
        sim = {c.charge_id: c.status for c in cloud.charges()}
        return all(st in FINAL_PAYMENTS and sim.get(ch) == st for ch, st in pays)

    wait_until("payments final and equal to the cloud's", payments_final, 45, waited)

    def drained() -> bool:
        # Delivered, not marked: the drainer writes its sent marks up to mark_sent_delay_sec later.
        at = set(cloud.event_ids())
        return all(eid in at
                   for (eid,) in _query(db, 'SELECT "event_id" FROM "outbox_event" WHERE "state" != \'dead\''))

    wait_until("outbox delivered", drained, 60, waited)
    return waited


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A temporary directory; kept (database, logs of every process) with CHAOS_KEEP=1."""
    if os.environ.get("CHAOS_KEEP"):
        d = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
        log(f"{NAME}: keeping {d}")
        yield d
        return
    with temp_dir("bench-chaos-") as d:
        yield d


def run(quick: bool) -> list[Result]:
    plan = QUICK if quick else FULL
    seed = int(os.environ.get("CHAOS_SEED", SEED))
    truth = Truth()
    stop = threading.Event()
    key = spec_test_key()
    with _workdir() as tmp, _site(tmp, plan) as site:
        gw, plc, cloud, db, base = site.gw, site.plc, site.cloud, site.db, site.base
        fleet = ChaosFleet(base_url=base, mqtt_host="127.0.0.1", mqtt_port=site.mqtt_port, key=key, count=plan.devices,
                           interval=30.0, helmet_share=0.0, seed=seed, slow_sec=plan.command_timeout / 2,
                           behaviours=("success", "success", "failure", "silent", "slow"))
        ft = FleetThread(fleet)
        load: Load | None = None
        try:
            ft.start(timeout=120)
            load = Load(base, key, [d.device_id for d in fleet.devices], plan, truth, seed)
            chaos = Chaos(gw, plc, cloud, plan, seed)
            t_load = time.monotonic()
            load.start()
            log(f"{NAME}: {plan.devices} devices, 6 bays, seed {seed}: {plan.duration:g} s of chaos under load")
            chaos.run(stop)
            loaded = time.monotonic() - t_load
            t_settle = time.monotonic()
            waited = _settle(truth, load, gw, plc, cloud, db, base, plan)
            settle = time.monotonic() - t_settle
            check = verify(truth, db, cloud, plc, base)
        finally:
            stop.set()
            if load is not None:
                load.stop.set()
                load.give_up_at = 0.0
                load.join(15)
            ft.stop()
        stats = cloud.stats()
    return _results(plan, seed, truth, chaos, gw, check, stats, waited, loaded, settle, fleet.reconnects)


# --- figures -----------------------------------------------------------------------------------

LOST_KEYS = ("items lost (db)", "items lost (cloud)", "washes lost (db)", "acked washes unfinished (db)",
             "sessions lost (cloud)", "command results lost (db)", "acked command results not final",
             "command results not final (any command)", "results lost (cloud)", "payments lost (db)",
             "payment events lost (cloud)", "outbox events sent but not at the cloud")
DUP_KEYS = ("items twice (db)", "items duplicated (cloud)", "washes twice (db)", "sessions duplicated (cloud)",
            "results duplicated (cloud)", "payment events duplicated (cloud)", "items at the cloud not in the db",
            "sessions at the cloud not in the db", "fact events at the cloud not in the outbox")


def _results(plan: Plan, seed: int, truth: Truth, chaos: Chaos, gw: Gateway, check: dict[str, Any],
             stats: dict[str, int], waited: dict[str, float], loaded: float, settle: float,
             reconnects: int) -> list[Result]:
    c = truth.counts
    lost = sum(int(check[k]) for k in LOST_KEYS)
    dup = sum(int(check[k]) for k in DUP_KEYS)
    lost_detail = ", ".join(f"{k} {check[k]}" for k in LOST_KEYS if check[k]) or "none"
    dup_detail = ", ".join(f"{k} {check[k]}" for k in DUP_KEYS if check[k]) or "none"
    inconsistent = check["bays inconsistent"]
    plc_bad = (check["sessions without a PLC wash"] + check["sessions whose outcome differs from the PLC"]
               + check["PLC washes never recorded"])
    washes = len(truth.washes)
    mode = f"{plan.duration:g} s, seed {seed}"
    extra = {"check": {k: v for k, v in check.items() if k != "bays inconsistent"},
             "bays_inconsistent": {b: list(v) for b, v in inconsistent.items()}, "counts": dict(c),
             "refused": dict(truth.refused), "cloud": stats, "settle_waits_s": waited,
             "timeline": chaos.timeline, "fleet_reconnects": reconnects}
    log(f"{NAME}: check {json.dumps(extra['check'], default=str)}")
    log(f"{NAME}: refused {dict(truth.refused)}; counts {dict(c)}")
    r = [
        Result(NAME, "kills: core (SIGKILL + restart)", "kills", [float(chaos.kills["core"])], notes=mode),
        Result(NAME, "kills: web (SIGKILL + restart)", "kills", [float(chaos.kills["web"])],
               notes="gunicorn master and worker"),
        Result(NAME, "outages: cloud", "outages", [float(chaos.outages["cloud"])],
               notes="go_away or stall-after-recording"),
        Result(NAME, "outages: PLC bus", "outages", [float(chaos.outages["plc"])],
               notes="socat killed (RTU) or TCP PLC muted"),
        Result(NAME, "outage length", "s", chaos.outage_sec or [0.0]),
        Result(NAME, "restart -> READY=1: core", "ms", gw.ready_ms["core"][1:] or gw.ready_ms["core"],
               notes=f"{len(gw.ready_ms['core']) - 1} restarts"),
        Result(NAME, "restart -> READY=1 + broker: web", "ms", gw.ready_ms["web"][1:] or gw.ready_ms["web"],
               notes=f"{len(gw.ready_ms['web']) - 1} restarts"),
        Result(NAME, "operations: uploads acked (201)", "uploads", [float(c["uploads acked"])],
               notes=f"{c['upload requests']} requests, {c['upload retries acked']} acked on a retry, "
                     f"{c['uploads never acked']} never acked ({c['items never acked']} items)"),
        Result(NAME, "operations: event-log items acked", "items", [float(len(truth.items))],
               notes=f"over {loaded:.0f} s of load"),
        Result(NAME, "operations: washes accepted (200)", "washes", [float(washes)],
               notes=f"{c['wash start requests']} requests, {c['wash starts never answered']} never answered, "
                     f"{c['wash stops accepted']} stopped; {check['sessions finished (db)']} sessions finished "
                     f"{check['sessions by outcome']}; the PLCs ran {check['PLC washes']}"),
        Result(NAME, "operations: commands INITIATED", "commands", [float(len(truth.commands))],
               notes=f"{check['command results']} device results: {check['results by status']}"),
        Result(NAME, "operations: payments created (200)", "payments", [float(len(truth.payments))],
               notes=f"{c['payment requests']} requests; "
                     f"{check['charges created at the cloud, unknown to the gateway']} "
                     "charges the gateway never stored"),
        Result(NAME, "lost (acknowledged facts missing)", "facts", [float(lost)], notes=f"goal 0; {lost_detail}"),
        Result(NAME, "duplicated at the cloud (same fact, other event id)", "facts", [float(dup)],
               notes=f"goal 0; {dup_detail}"),
        Result(NAME, "bays inconsistent with their PLC after settling", "bays", [float(len(inconsistent))],
               notes=f"goal 0; {inconsistent or 'all equal'}"),
        Result(NAME, "sessions disagreeing with the PLCs' washes", "sessions", [float(plc_bad)],
               notes=f"goal 0; without a wash {check['sessions without a PLC wash']}, other outcome "
                     f"{check['sessions whose outcome differs from the PLC']}, washes never recorded "
                     f"{check['PLC washes never recorded']}; ERROR/PLC_OFFLINE although the PLC finished "
                     f"{check['ERROR/PLC_OFFLINE sessions the PLC finished']} (unknowable after an outage); "
                     "accepted, never "
                     f"run by the PLC (ERROR) {check['accepted sessions the PLC never ran (ERROR)']}"),
        Result(NAME, "cloud: re-sent event ids (deduplicated, harmless)", "events", [float(stats["duplicates"])],
               notes=f"{stats['unique']} unique events, {stats['requests']} requests; outbox {check['outbox']}; "
                     f"not in the outbox: {check['cloud events not in the outbox, by type'] or 'none'}"),
        Result(NAME, "settle: load stopped -> verified", "s", [settle],
               notes=", ".join(f"{k} {v:.1f}" for k, v in waited.items())),
    ]
    for res in r:
        res.extra = {}
    r[0].extra = extra
    return r


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick="--quick" in sys.argv)))
