"""MQTT abuse (the hardening issue): is the gateway still responsive while LAN clients misbehave?

A real core and gunicorn (demo site config, `mqtt.max_connections = 1000`). Phases of equal
length; in each one an attacker process (this module's `attack` command, so its CPU work is not
in the measuring process) does one thing to the embedded broker while this process measures,
back to back on one keep-alive connection, `GET /api/health` on the web and the RPC `ping` round
trip web-side client → core (the core's event loop is where the broker runs):

- `baseline`: nothing.
- `flood`: 50 anonymous clients publish `server/{id}/streaming` as fast as their sockets take it,
  and reconnect at once when cut off (the per-client rate limit drops the excess; a client a burst
  past it is disconnected and its address cools down).
- `storm`: 1,500 connections held open (a third never send CONNECT, the rest connect and idle),
  reopened when the broker closes them: past `max_connections` they are closed at once, silent
  ones after `connect_timeout_sec`.
- `oversize`: 50 clients announce a 1 MiB PUBLISH, are closed, and start again.

Reported per phase: health p50/p99, RPC ping p50/p99, and (once per phase, from the core's
`broker.stats`) what the broker refused, plus the core's RSS at the end of the phase.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Result, log, start_notified, temp_dir
from sim.demo import free_port, write_demo_site
from sim.procs import gateway_command, stop_process
from tests import mqtt_raw

NAME = "mqtt_abuse"
PHASES = ("baseline", "flood", "storm", "oversize")


# --- the attacker (a process of its own) -------------------------------------------------------


# Each phase attacks from an address of its own (any 127.x is this machine; the gateway exempts only
# its own 127.0.0.1 from cool-downs), so one phase's cool-down does not blunt the next.
SOURCES = {"flood": "127.0.0.2", "storm": "127.0.0.3", "oversize": "127.0.0.4"}
SOURCE = "127.0.0.2"


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(SOURCE, 0))


async def _session(port: int, client_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _open(port)
    writer.write(mqtt_raw.connect(client_id, keepalive=60))
    await reader.readexactly(4)  # CONNACK
    return reader, writer


async def _flooder(port: int, i: int, stop: float) -> int:
    sent = 0
    packet = mqtt_raw.publish(f"server/flood-{i}/streaming", b'{"rssi":-60,"status":"NORMAL","uptime":1}' + b" " * 150)
    while time.monotonic() < stop:
        try:
            _, writer = await _session(port, f"flood-{i}")
            while time.monotonic() < stop:
                writer.write(packet * 20)
                await writer.drain()
                sent += 20
            writer.close()
        except (OSError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.1)  # refused or cut: an attacker comes back
    return sent


async def _holder(port: int, i: int, stop: float, silent: bool) -> int:
    opened = 0
    while time.monotonic() < stop:
        try:
            if silent:
                reader, writer = await _open(port)
            else:
                reader, writer = await _session(port, f"storm-{i}")
            opened += 1
            try:
                await asyncio.wait_for(reader.read(1), max(0.1, stop - time.monotonic()))
            except TimeoutError:
                pass
            writer.close()
        except (OSError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.2 + random.random() * 0.3)
    return opened


async def _oversizer(port: int, i: int, stop: float) -> int:
    tries = 0
    header = mqtt_raw.publish("server/x/streaming", b"x" * (1024 * 1024))[:4096]
    while time.monotonic() < stop:
        try:
            reader, writer = await _session(port, f"big-{i}")
            writer.write(header)
            tries += 1
            await asyncio.wait_for(reader.read(), 5)
            writer.close()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            await asyncio.sleep(0.1)
    return tries


async def _attack(mode: str, port: int, seconds: float) -> int:
    global SOURCE
    SOURCE = SOURCES[mode]
    stop = time.monotonic() + seconds
    if mode == "flood":
        jobs = [_flooder(port, i, stop) for i in range(50)]
    elif mode == "storm":
        jobs = [_holder(port, i, stop, silent=i % 3 == 0) for i in range(1500)]
    elif mode == "oversize":
        jobs = [_oversizer(port, i, stop) for i in range(50)]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return sum(await asyncio.gather(*jobs))


# --- the measurement ---------------------------------------------------------------------------


def _measure(web_port: int, client: Any, seconds: float) -> tuple[list[float], list[float]]:
    health: list[float] = []
    ping: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
    stop = time.monotonic() + seconds
    try:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            conn.request("GET", "/api/health")
            r = conn.getresponse()
            r.read()
            health.append((time.perf_counter() - t0) * 1000)
            if r.status != 200:
                raise RuntimeError(f"/api/health answered {r.status}")
            t0 = time.perf_counter()
            client.call("ping", {}, timeout=30)
            ping.append((time.perf_counter() - t0) * 1000)
    finally:
        conn.close()
    return health, ping


def run(quick: bool) -> list[Result]:
    import psutil

    from gateway.config import load_config, load_secrets
    from gateway.mqtt.client import BusClient

    seconds = 8.0 if quick else 30.0
    out: list[Result] = []
    with temp_dir("bench-mqtt-abuse-") as tmp:
        web_port, mqtt_port = free_port(), free_port()
        cfg_path = write_demo_site(tmp / "site", web_port=web_port, mqtt_port=mqtt_port,
                                   extra_toml="max_connections = 1000\nconnect_timeout_sec = 5.0\n")  # lands in [mqtt]
        cfg = load_config(cfg_path)
        core, cn = start_notified(gateway_command("core", "--config", str(cfg_path)), tmp, "core")
        web, wn = start_notified(gateway_command("web", "--config", str(cfg_path)), tmp, "web", wait_connected=True)
        client = BusClient("127.0.0.1", mqtt_port, cfg.mqtt.internal_username,
                           load_secrets(cfg).mqtt_internal_password, name="bench")
        client.start()
        try:
            if not client.wait_connected(10):
                raise RuntimeError("bench client could not join the broker")
            refused_before: dict[str, int] = {}
            for phase in PHASES:
                attacker = None
                if phase != "baseline":
                    attacker = subprocess.Popen(
                        [sys.executable, "-m", "bench.mqtt_abuse", "attack", phase, str(mqtt_port), str(seconds + 2)],
                        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
                    time.sleep(2.0)  # load generation ramps up before measuring (not a synchronisation)
                try:
                    health, ping = _measure(web_port, client, seconds)
                finally:
                    attacks = 0
                    if attacker is not None:
                        stdout, _ = attacker.communicate(timeout=seconds + 60)
                        attacks = int(stdout.strip() or 0)
                stats = client.call("broker.stats", {}, timeout=30)
                refused = {k: v - refused_before.get(k, 0) for k, v in stats["refused"].items()
                           if v - refused_before.get(k, 0)}
                refused_before = dict(stats["refused"])
                rss = psutil.Process(core.pid).memory_info().rss / 2**20
                what = ", ".join(f"{n} {k}" for k, n in sorted(refused.items())) or "nothing refused"
                kind = "messages" if phase == "flood" else "connections"
                notes = f"{len(health)} requests; attacker: {attacks:,} {kind}" \
                        f"; broker refused {what}; core RSS {rss:.1f} MB" if attacker else f"{len(health)} requests"
                out.append(Result(NAME, f"{phase}: GET /api/health", "ms", health, notes=notes))
                out.append(Result(NAME, f"{phase}: RPC ping web client → core", "ms", ping))
                log(f"{NAME}: {phase} done ({notes})")
        finally:
            client.stop()
            for p in (web, core):
                stop_process(p, 15)
            cn.close()
            wn.close()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attack")
    a.add_argument("mode", choices=PHASES[1:])
    a.add_argument("port", type=int)
    a.add_argument("seconds", type=float)
    sub.add_parser("run")
    args = ap.parse_args()
    if args.cmd == "attack":
        print(asyncio.run(_attack(args.mode, args.port, args.seconds)))
    else:
        from bench.common import table

        print(table(run(quick=True)))
