"""A fleet of simulated ESP32 devices (car-wash boxes and helmet dryers) for tests, the demo and
benchmarks; never used by the production services.

Each device is what firmware does: pairs over HTTP (`need-register`, signed), sends its startup
document, keeps its own MQTT session (client id = device id) streaming signed state every
`interval` seconds, and answers `device/{id}/command` with a configurable behaviour (success,
failure, silence, slow, firmware progress). Event logs, two ways:
- as firmware does (device-api.md: "uploads event logs over HTTP after a reset when it has logs"):
  customers pay about every `payment_every` seconds at each device, the items wait in the device's
  buffer, and with `reboots` a device that is told to reset (RESTART, RESET_CONFIG, a flash with
  `reboot_after`) starts up again after `delay_seconds` and uploads them;
- as a load (`log_every`): 10 fresh items about every `log_every` seconds, whatever the resets.
Everything runs on one asyncio loop (aiomqtt); HTTP calls go through a small thread pool.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import paho.mqtt.client as paho_mqtt

from gateway.access.signing import SignatureError, http_signature, parse_signed_mqtt, sign_mqtt
from gateway.devices.validate import MAX_ITEMS as UPLOAD_MAX_ITEMS  # device-api.md: 1-1000 items per upload

log = logging.getLogger(__name__)

BEHAVIOURS = ("success", "failure", "silent", "slow", "progress")
MAX_REBOOT_DELAY = 300.0  # a simulator need not honour a longer delay_seconds

CAR_WASH_CONFIGS: dict[str, dict[str, Any]] = {
    "machine": {"ACTIVE": True, "BANKNOTE": True, "COIN": True, "QR": True, "ON_TIME": "8:00", "OFF_TIME": "16:00",
                "SAVE_STATE": True},
    "function": {"sec_per_baht": {"HP_WATER": 10, "FOAM": 10, "AIR": 10, "WATER": 10, "VACUUM": 10,
                                  "BLACK_TIRE": 10, "WAX": 10, "AIR_FRESHENER": 0, "PARKING_FEE": 600}},
}
HELMET_CONFIGS = {
    "machine": dict(CAR_WASH_CONFIGS["machine"]),
    "pricing": {"BASE_FEE": 30, "PROMOTION": 0, "WORK_PERIOD": 600},
    "function_start": {"DUST_BLOW": 0, "SANITIZE": 50, "UV": 100, "OZONE": 200, "DRY_BLOW": 300, "PERFUME": 400},
    "function_end": {"DUST_BLOW": 50, "SANITIZE": 100, "UV": 200, "OZONE": 300, "DRY_BLOW": 400, "PERFUME": 600},
}


class _DeviceClient(aiomqtt.Client):
    """aiomqtt's client, one per device; only the wait for an ACK's PUBACK differs (below). Its
    socket writer is registered as aiomqtt does (through `call_soon_threadsafe`): adding it at once
    saved the fleet a tenth of its CPU but raised the core's per device and delayed the last
    receipt (bench/README.md, commands; likely a device's PUBACK and ACK written apart, not together)."""

    async def publish_acked(self, topic: str, payload: bytes) -> None:
        """`publish(topic, payload, qos=1)`, returning once the broker's PUBACK came, as aiomqtt's
        does, but waiting under `asyncio.timeout` instead of `asyncio.wait_for` (a task and a timer
        handle of their own for every ACK a device sends)."""
        info = self._client.publish(topic, payload, 1)
        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if info.is_published():
            return
        confirmation = asyncio.Event()  # set by aiomqtt's on_publish, as for its own publish()
        self._pending_publishes[info.mid] = confirmation
        try:
            async with asyncio.timeout(None if self.timeout == math.inf else self.timeout):
                await confirmation.wait()
        finally:
            self._pending_publishes.pop(info.mid, None)


@dataclass
class SimDevice:
    chip_id: str
    kind: str  # car_wash | helmet_dryer
    behaviour: str = "success"
    device_id: str = ""
    pin: str = ""
    streams: int = 0
    acks: int = 0
    commands: list[dict[str, Any]] = field(default_factory=list)
    configs: dict[str, Any] | None = None
    firmware_version: str = ""
    received_at: dict[str, float] = field(default_factory=dict)  # command_id -> time.monotonic()
    acked_at: dict[str, float] = field(default_factory=dict)  # command_id -> last ACK sent
    booted_at: float = field(default_factory=time.monotonic)  # streaming's uptime counts from here
    boots: int = 1
    buffer: list[dict[str, Any]] = field(default_factory=list)  # event-log items not yet uploaded
    paid_until_ms: int = field(default_factory=lambda: int(time.time() * 1000))  # payments accrued up to
    uploaded: int = 0  # items the gateway acknowledged (201)
    rebooted: asyncio.Event = field(default_factory=asyncio.Event)  # set when a reset's startup and upload are done

    @property
    def firmware(self) -> str:
        return self.firmware_version or f"{self.kind}_v1.00"

    @property
    def mac(self) -> str:
        h = self.chip_id[-12:].rjust(12, "0")
        return ":".join(h[i:i + 2] for i in range(0, 12, 2)).upper()


class Fleet:
    """`Fleet(...).run(stop)`: pair, start up and live until `stop` is set. No I/O in __init__."""

    def __init__(self, *, base_url: str, mqtt_host: str, mqtt_port: int, key: str, count: int,
                 interval: float = 60.0, helmet_share: float = 0.3, behaviours: Sequence[str] = ("success",),
                 log_every: float = 0.0, payment_every: float = 0.0, reboots: bool = False, seed: int = 1,
                 slow_sec: float = 5.0) -> None:
        rnd = random.Random(seed)
        self._rng = random.Random(seed + 1)
        self.base_url = base_url.rstrip("/")
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port
        self.key = key
        self.interval = interval
        self.log_every = log_every
        self.payment_every = payment_every
        self.reboots = reboots
        self.slow_sec = slow_sec
        self.devices = [
            SimDevice(chip_id=f"{0xE5000000 + seed * 100_000 + i:08X}",
                      kind="helmet_dryer" if rnd.random() < helmet_share else "car_wash",
                      behaviour=behaviours[i % len(behaviours)])
            for i in range(count)
        ]
        self.ready = asyncio.Event()
        self.connected = 0
        self._answers: set[asyncio.Task[None]] = set()
        self._http = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fleet-http")

    # --- HTTP ---------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = json.dumps(body, separators=(",", ":")).encode()
        req = urllib.request.Request(self.base_url + path, data=raw, method="POST", headers={
            "Content-Type": "application/json", "x-signature": http_signature(raw, self.key)})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                reply: dict[str, Any] = json.loads(r.read())
                return reply
        except urllib.error.HTTPError as e:
            refusal: dict[str, Any] = json.loads(e.read())
            return refusal

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(self._http, self._post, path, body)

    # --- one device ---------------------------------------------------------------------------

    async def _pair(self, d: SimDevice) -> None:
        r = await self._call("/api/v1/devices/need-register",
                             {"chip_id": d.chip_id, "mac_address": d.mac, "firmware_version": d.firmware})
        if not r.get("success"):
            raise RuntimeError(f"pairing of {d.chip_id} refused: {r}")
        d.device_id, d.pin = r["data"]["device_id"], r["data"]["pin"]
        await self._startup(d)

    async def _startup(self, d: SimDevice) -> None:
        configs = d.configs or (CAR_WASH_CONFIGS if d.kind == "car_wash" else HELMET_CONFIGS)
        await self._call("/api/v1/devices/sync", {"topic_request": "startup", "device_id": d.device_id,
                                                  "device_status": "NORMAL", "payload": {"configs": configs},
                                                  "timestamp": int(time.time() * 1000)})

    def _accrue(self, d: SimDevice) -> None:
        """The payments customers made at `d` since the last call join its buffer (a Poisson
        process of mean interval `payment_every`: notes and coins adding up to the total)."""
        now_ms = int(time.time() * 1000)
        if self.payment_every <= 0:
            d.paid_until_ms = now_ms
            return
        t = d.paid_until_ms
        while True:
            t += max(1, int(self._rng.expovariate(1.0 / self.payment_every) * 1000))
            if t > now_ms:
                break
            notes = {"20": self._rng.choice((0, 0, 1, 2)), "50": self._rng.choice((0, 0, 1)),
                     "100": self._rng.choice((0, 0, 0, 1)), "500": 0, "1000": 0}
            coins = {"1": 0, "2": 0, "5": self._rng.choice((0, 1)), "10": self._rng.choice((0, 1, 2, 3))}
            total = sum(int(k) * v for k, v in notes.items()) + sum(int(k) * v for k, v in coins.items())
            if total == 0:
                coins["10"] = 2
                total = 20
            d.buffer.append({"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": t, "total_amount": total,
                             "bank": notes, "coin": coins, "qr": {"chargeId": None, "net_amount": 0}})
        d.paid_until_ms = now_ms

    async def upload_buffered(self, d: SimDevice) -> int:
        """What firmware does after a reset when it has logs: upload the buffer (at most 1000 items
        per request, the API's limit) and forget each part the gateway acknowledged. Returns the
        items acknowledged; a refused part stays buffered for the next reset."""
        self._accrue(d)
        sent = 0
        while d.buffer:
            part = d.buffer[:UPLOAD_MAX_ITEMS]
            r = await self._call("/api/v1/device-event-logs/uploads", {"device_id": d.device_id, "items": part})
            if not r.get("success"):
                log.warning("%s: event-log upload refused: %s", d.device_id, r)
                break
            del d.buffer[:len(part)]
            d.uploaded += len(part)
            sent += len(part)
        return sent

    async def _reboot(self, d: SimDevice, delay: float) -> None:
        """A reset the device was told to do: after the delay it boots, sends its startup document
        and uploads its buffered logs. (The MQTT session is kept: the gateway sees a short reboot
        as a new startup, not as an outage, as it would under 3 missed streaming intervals.)"""
        await asyncio.sleep(max(0.0, min(delay, MAX_REBOOT_DELAY)))
        d.boots += 1
        d.booted_at = time.monotonic()
        try:
            await self._startup(d)
            await self.upload_buffered(d)
        except (OSError, ValueError) as exc:  # the gateway away: the buffer waits for the next reset
            log.warning("%s: start-up after a reset failed: %s", d.device_id, exc)
        d.rebooted.set()

    async def upload_logs(self, d: SimDevice, n: int = 10) -> dict[str, Any]:
        now = int(time.time() * 1000)
        items = [{"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": now + i, "total_amount": 20,
                  "bank": {"20": 1, "50": 0, "100": 0, "500": 0, "1000": 0},
                  "coin": {"1": 0, "2": 0, "5": 0, "10": 0}, "qr": {"chargeId": None, "net_amount": 0}}
                 for i in range(n)]
        return await self._call("/api/v1/device-event-logs/uploads", {"device_id": d.device_id, "items": items})

    async def _live(self, d: SimDevice, stop: asyncio.Event) -> None:
        async with _DeviceClient(self.mqtt_host, self.mqtt_port, identifier=d.device_id, keepalive=60) as client:
            await client.subscribe(f"device/{d.device_id}/command", qos=1)
            self.connected += 1
            if self.connected == len(self.devices):
                self.ready.set()
            tasks = [asyncio.create_task(self._stream(d, client, stop)),
                     asyncio.create_task(self._commands(d, client))]
            if self.log_every > 0:
                tasks.append(asyncio.create_task(self._logs(d, stop)))
            try:
                await stop.wait()
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, d: SimDevice, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        # Spread the fleet over the interval, as devices that booted at different times would.
        await asyncio.sleep(random.uniform(0, min(self.interval, 5.0)))
        while not stop.is_set():
            msg = {"rssi": random.randint(-90, -50), "status": "NORMAL",
                   "uptime": int((time.monotonic() - d.booted_at) // 60), "timestamp": int(time.time() * 1000)}
            await client.publish(f"server/{d.device_id}/streaming", sign_mqtt(msg, self.key), qos=0)
            d.streams += 1
            await asyncio.sleep(self.interval)

    async def _logs(self, d: SimDevice, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.log_every * random.uniform(0.5, 1.5))
            await self.upload_logs(d)

    async def _commands(self, d: SimDevice, client: _DeviceClient) -> None:
        async for message in client.messages:
            try:
                cmd = parse_signed_mqtt(bytes(message.payload), self.key)
            except SignatureError as exc:
                log.warning("%s: ignored a command: %s", d.device_id, exc)
                continue
            d.commands.append(cmd)
            d.received_at[str(cmd.get("command_id"))] = time.monotonic()
            if not cmd.get("require_ack"):
                continue
            task = asyncio.get_running_loop().create_task(self._answer(d, client, cmd))
            self._answers.add(task)
            task.add_done_callback(self._answers.discard)

    async def _answer(self, d: SimDevice, client: _DeviceClient, cmd: dict[str, Any]) -> None:
        b = d.behaviour
        if b == "silent":
            return
        if b == "slow":
            await asyncio.sleep(self.slow_sec)

        async def ack(status: str, **extra: Any) -> None:
            body = {"command_id": cmd.get("command_id"), "device_id": d.device_id, "command": cmd.get("command"),
                    "status": status, **extra, "timestamp": int(time.time() * 1000)}
            await client.publish_acked(f"server/{d.device_id}/ack", sign_mqtt(body, self.key))
            d.acks += 1
            d.acked_at[str(cmd.get("command_id"))] = time.monotonic()

        if b == "failure":
            await ack("FAILED", error="simulated failure")
        elif cmd.get("command") == "UPDATE_FIRMWARE":
            await self._flash(d, cmd.get("payload") or {}, ack, report_progress=b == "progress")
        else:
            if cmd.get("command") == "APPLY_CONFIG":
                d.configs = (cmd.get("payload") or {}).get("configs")
            elif cmd.get("command") == "RESET_CONFIG":
                d.configs = None
            await ack("SUCCESS")
            if cmd.get("command") in ("RESTART", "RESET_CONFIG"):
                self._reset_later(d, cmd.get("payload") or {})

    async def _flash(self, d: SimDevice, payload: dict[str, Any], ack: Any, *, report_progress: bool) -> None:
        """What the firmware does: download the image, check size and sha256, then report."""
        url, version = str(payload.get("url", "")), str(payload.get("version", ""))

        def download() -> bytes:
            with urllib.request.urlopen(url, timeout=30) as r:
                image: bytes = r.read()
                return image

        try:
            image = await asyncio.get_running_loop().run_in_executor(self._http, download)
        except (OSError, ValueError) as exc:
            await ack("ERROR", error=f"download failed: {exc}")
            return
        if report_progress:
            for pct in (25, 50, 75):
                await ack("PROGRESS", progress=pct, bytes=len(image) * pct // 100)
        if payload.get("size") not in (None, len(image)):
            await ack("ERROR", error=f"size {len(image)} differs from {payload.get('size')}")
        elif hashlib.sha256(image).hexdigest() != str(payload.get("sha256", "")).lower():
            await ack("ERROR", error="sha256 mismatch")
        else:
            d.firmware_version = version
            await ack("SUCCESS", new_version=version)
            if payload.get("reboot_after"):
                self._reset_later(d, {})

    def _reset_later(self, d: SimDevice, payload: dict[str, Any]) -> None:
        if not self.reboots:
            return
        try:
            delay = float(payload.get("delay_seconds") or 0)
        except (TypeError, ValueError):
            delay = 0.0
        task = asyncio.get_running_loop().create_task(self._reboot(d, delay))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    # --- the fleet ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        try:
            sem = asyncio.Semaphore(16)

            async def pair(d: SimDevice) -> None:
                async with sem:
                    await self._pair(d)

            await asyncio.gather(*(pair(d) for d in self.devices))
            async with asyncio.TaskGroup() as tg:
                for d in self.devices:
                    tg.create_task(self._live(d, stop))
        finally:
            for t in list(self._answers):
                t.cancel()
            await asyncio.gather(*self._answers, return_exceptions=True)
            self._http.shutdown(wait=True)


class FleetThread:
    """A fleet on its own event loop in a thread, for synchronous callers (tests, benchmarks).
    `start()` returns once every device is paired and connected; `stop()` joins the thread."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._stop = asyncio.Event()
            runner = asyncio.create_task(self.fleet.run(self._stop))
            ready = asyncio.create_task(self.fleet.ready.wait())
            await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
            self._ready.set()
            ready.cancel()
            await runner

        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    def start(self, timeout: float = 60) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the fleet did not connect")
        if self._error is not None:
            raise RuntimeError(f"the fleet failed: {self._error!r}")
        if not self.fleet.ready.is_set():
            raise RuntimeError("the fleet stopped before it was connected")

    def stop(self) -> None:
        if self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


def simulate_devices_main(argv: Sequence[str] | None = None) -> int:
    from gateway.config import config_path, load_config, load_secrets

    ap = argparse.ArgumentParser(prog="carwash-gateway simulate-devices", description="a fleet of simulated devices")
    ap.add_argument("--config", help="the gateway's config (for its URL, MQTT port and signing key)")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--interval", type=float, default=60.0, help="streaming interval, seconds")
    ap.add_argument("--log-every", type=float, default=0.0,
                    help="a load: each device uploads 10 fresh log items about this often (0: never)")
    ap.add_argument("--payment-every", type=float, default=0.0,
                    help="a customer pays at each device about this often, seconds (0: never); the items "
                         "are uploaded after a reset, as firmware does")
    ap.add_argument("--reboots", action="store_true",
                    help="act out RESTART, RESET_CONFIG and reboot_after: start up again and upload the buffer")
    ap.add_argument("--behaviour", action="append", choices=BEHAVIOURS,
                    help="command answers, cycled over the fleet (default: success)")
    args = ap.parse_args(argv)
    cfg = load_config(config_path(args.config))
    key = load_secrets(cfg).device_signing_key
    host = "127.0.0.1" if cfg.web.bind in ("0.0.0.0", "::") else cfg.web.bind
    mqtt_host = "127.0.0.1" if cfg.mqtt.bind in ("0.0.0.0", "::") else cfg.mqtt.bind

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        fleet = Fleet(base_url=f"http://{host}:{cfg.web.port}", mqtt_host=mqtt_host, mqtt_port=cfg.mqtt.port, key=key,
                      count=args.count, interval=args.interval, log_every=args.log_every,
                      payment_every=args.payment_every, reboots=args.reboots,
                      behaviours=args.behaviour or ("success",))
        runner = asyncio.create_task(fleet.run(stop))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({runner, asyncio.create_task(fleet.ready.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
        if fleet.ready.is_set():
            print(f"device fleet: {args.count} devices paired and connected", flush=True)
        await runner

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
    return 0
