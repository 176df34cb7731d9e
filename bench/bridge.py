"""The cloud bridge (gateway.uplink.bridge.CloudBridge) through Debian's mosquitto as the cloud.

1. Local -> cloud throughput, QoS 1: the bridge (in this process, default settings: plain TCP,
   at most 20 unacknowledged messages) forwards N wash statuses of 200 bytes (an 8-digit sequence
   number, then padding) spread over 16 bays, published as fast as the core would call
   `publish_wash_status` (yielding to the event loop every 100 calls). Two rates per repetition:
   - acknowledged: N / (last PUBACK handled by the bridge - first call), from the bridge's
     `forwarded` counter;
   - at the cloud subscriber: a separate process (bench/mqtt_client.py sub, paho, QoS 1) on
     `sites/{site}/wash/+/status`: (received - 1) / (last arrival - first arrival); it also counts
     lost sequence numbers and duplicates.
   Each repetition uses a new site id, so no retained message of an earlier one is replayed.
2. Cloud command -> local callback latency: a paho client in this process (its own network
   thread) publishes `sites/{site}/wash/bay1/cmd` at QoS 1, one at a time; the sample is the time
   from just before `publish()` to the start of the bridge's `on_wash_cmd` callback on the event
   loop (mosquitto, the bridge's paho thread, the hand-over with call_soon_threadsafe and the
   dispatcher). The next command is sent once the previous one arrived. 20 warm-up commands are
   not counted.
All clocks are time.monotonic() (CLOCK_MONOTONIC, comparable between processes on one host).
mosquitto runs with the benchmark's minimal config (bench/broker_throughput.run_mosquitto).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.broker_throughput import run_mosquitto
from bench.common import Result, log, readline, tail, temp_dir
from gateway.uplink.bridge import BridgeSettings, CloudBridge

NAME = "bridge"
CLIENT = Path(__file__).resolve().parent / "mqtt_client.py"
SIZE = 200
BAYS = 16
YIELD_EVERY = 100
WARMUP = 20
TIMEOUT = 60.0


async def _nothing(_ident: str, _payload: bytes) -> None:
    return None


@contextlib.asynccontextmanager
async def _running(bridge: CloudBridge) -> AsyncIterator[None]:
    task = asyncio.create_task(bridge.run(), name="bench-bridge")
    try:
        waiter = asyncio.create_task(bridge.wait_state(lambda s: s["connected"] and s["subscribed"], TIMEOUT))
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            raise RuntimeError(f"bridge stopped: {task!r}")
        waiter.result()  # TimeoutError: not connected
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _bridge(port: int, site: str, on_wash_cmd: Any = _nothing) -> CloudBridge:
    settings = BridgeSettings(site_id=site, host="127.0.0.1", port=port, tls=False)
    return CloudBridge(settings, on_wash_cmd=on_wash_cmd, on_device_command=_nothing, on_payment_status=_nothing)


# --- 1. throughput -----------------------------------------------------------------------------------


async def _forward_all(port: int, site: str, count: int) -> tuple[float, float]:
    """Forward `count` statuses; returns (time of the first call, time all were acknowledged)."""
    bridge = _bridge(port, site)
    pad = b"x" * (SIZE - 8)
    async with _running(bridge):
        t0 = time.monotonic()
        for i in range(count):
            if not bridge.publish_wash_status(f"bay{i % BAYS + 1}", b"%08d" % i + pad):
                raise RuntimeError(f"status {i} refused: {bridge.state()}")
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)
        await bridge.wait_state(lambda s: s["forwarded"] >= count, TIMEOUT)
        t_acked = time.monotonic()
        st = bridge.state()
        if st["dropped"] or st["reconnects"]:
            raise RuntimeError(f"bridge dropped or reconnected during the run: {st}")
    return t0, t_acked


def _throughput_run(port: int, site: str, count: int, d: Path) -> dict[str, Any]:
    errlog = d / "subscriber.log"
    argv = [sys.executable, str(CLIENT), "sub", "--port", str(port), "--topic", f"sites/{site}/wash/+/status",
            "--qos", "1", "--count", str(count), "--client-id", f"bench-cloud-{site}", "--timeout", str(TIMEOUT)]
    with errlog.open("a") as err:
        sub = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0)
    try:
        if readline(sub, 15.0).strip() != "READY":
            raise RuntimeError(f"subscriber did not start (exit {sub.poll()})\n{tail(errlog)}")
        t0, t_acked = asyncio.run(_forward_all(port, site, count))
        assert sub.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it already had every message and exited
            sub.stdin.write(b"DONE\n")
            sub.stdin.close()
        out = readline(sub, TIMEOUT + 15)
        if sub.wait(15) != 0 or not out:
            raise RuntimeError(f"subscriber failed ({sub.returncode})\n{tail(errlog)}")
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
        for f in (sub.stdin, sub.stdout):
            if f is not None and not f.closed:
                f.close()
    s: dict[str, Any] = json.loads(out)
    if not s["rate"]:
        raise RuntimeError(f"subscriber received {s['received']} messages: no rate\n{tail(errlog)}")
    s["acked_rate"] = count / (t_acked - t0)
    return s


# --- 2. latency ---------------------------------------------------------------------------------------


async def _latencies(port: int, site: str, n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    async def on_wash_cmd(_bay: str, payload: bytes) -> None:
        arrived.put_nowait((payload, time.monotonic()))

    bridge = _bridge(port, site, on_wash_cmd)
    cloud = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-cloud-cmd-{site}")
    connected = threading.Event()
    cloud.on_connect = lambda c, u, f, rc, p: connected.set()
    samples: list[float] = []
    async with _running(bridge):
        cloud.connect("127.0.0.1", port, keepalive=60)
        cloud.loop_start()
        try:
            if not await loop.run_in_executor(None, connected.wait, 10.0):
                raise RuntimeError("cloud client: no CONNACK")
            topic = f"sites/{site}/wash/bay1/cmd"
            for i in range(WARMUP + n):
                body = json.dumps({"action": "START", "n": i}).encode()
                t0 = time.monotonic()
                info = cloud.publish(topic, body, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    raise RuntimeError(f"publish {i}: {mqtt.error_string(info.rc)}")
                payload, t1 = await asyncio.wait_for(arrived.get(), 10.0)
                if payload != body:
                    raise RuntimeError(f"command {i}: got {payload!r}")
                if i >= WARMUP:
                    samples.append((t1 - t0) * 1000.0)
        finally:
            cloud.disconnect()
            cloud.loop_stop()
    return samples


# --- entry point ----------------------------------------------------------------------------------------


def run(quick: bool) -> list[Result]:
    reps = 3 if quick else 5
    count = 5_000 if quick else 20_000
    n_latency = 300 if quick else 1_000
    runs: list[dict[str, Any]] = []
    with temp_dir() as d:
        mosq_dir = d / "mosquitto"
        mosq_dir.mkdir()
        with run_mosquitto(mosq_dir) as port:
            for rep in range(reps):
                r = _throughput_run(port, f"bench-{rep}", count, d)
                runs.append(r)
                log(f"{NAME}: rep {rep + 1}/{reps}: acknowledged {r['acked_rate']:,.0f} msg/s, "
                    f"at subscriber {r['rate']:,.0f} msg/s, lost {r['lost']}/{count}, dup {r['duplicates']}")
            latencies = asyncio.run(_latencies(port, "bench-latency", n_latency))
            log(f"{NAME}: {len(latencies)} commands, median {sorted(latencies)[len(latencies) // 2]:.2f} ms")

    load = f"{reps} x {count:,} statuses of {SIZE} B over {BAYS} bays, QoS 1, retained, plain TCP, inflight 20"
    lost = int(sum(r["lost"] for r in runs))
    dup = int(sum(r["duplicates"] for r in runs))
    return [
        Result(NAME, "local→cloud QoS1, acknowledged", "msgs/s", [r["acked_rate"] for r in runs],
               f"{load}; N / (last PUBACK handled - first publish call)", extra={"runs": runs, "count": count}),
        Result(NAME, "local→cloud QoS1, at cloud subscriber", "msgs/s", [r["rate"] for r in runs],
               f"{load}; separate paho subscriber process; lost {lost}/{reps * count}"
               + (f", dup {dup}" if dup else "")),
        Result(NAME, "cloud cmd → local callback", "ms", latencies,
               f"{len(latencies)} commands one at a time, QoS 1, paho publisher in the bench process"),
    ]
