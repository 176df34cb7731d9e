"""Device-protocol figures.

1. Signed 10-item event-log uploads through the real gunicorn (one gthread worker) at 50
   concurrent keep-alive clients: requests/s and latency; beside a bare Flask endpoint served by
   the same gunicorn settings in the same run (the ratio is what counts). Every upload carries new
   items, so each request commits one IMMEDIATE transaction (synchronous=FULL) with 10 rows.
2. A fleet of simulated devices (one MQTT session each) streaming every 60 s (full mode; 10 s in
   quick mode): core CPU % and RSS once all are connected.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import Result, start_notified
from gateway.access.signing import http_signature
from sim.demo import free_port, write_demo_site
from sim.fleet import Fleet
from sim.procs import gateway_command, stop_process

NAME = "devices"
CLIENTS = 50
ROOT = Path(__file__).resolve().parent.parent


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _worker(pid: int, timeout: float = 10.0) -> psutil.Process:
    """The gunicorn worker under arbiter `pid` (it may be forking still)."""
    deadline = time.monotonic() + timeout
    while not (children := psutil.Process(pid).children()):
        if time.monotonic() > deadline:
            raise TimeoutError("no gunicorn worker")
        time.sleep(0.05)
    return children[0]


def _load(port: int, path: str, bodies, seconds: float) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    """CLIENTS threads, each with one keep-alive connection, for `seconds`; latencies in ms."""
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    start = threading.Barrier(CLIENTS)

    def client(n: int) -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad = [], 0
        start.wait()
        i = 0
        while time.monotonic() < deadline:
            body, headers = bodies(n, i)
            i += 1
            t0 = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            mine.append((time.perf_counter() - t0) * 1000)
            bad += r.status >= 300
        conn.close()
        with lock:
            lat.extend(mine)
            errors += bad

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors


def _uploads(tmp: Path, quick: bool) -> list[Result]:
    web_port, mqtt_port = free_port(), free_port()
    cfg = write_demo_site(tmp / "site", web_port=web_port, mqtt_port=mqtt_port)
    key = (json.loads((ROOT / "gateway" / "data" / "spec-vectors.json").read_text()))["secret_key"]
    core, cn = start_notified(gateway_command("core", "--config", str(cfg)), tmp, "core")
    web, wn = start_notified(gateway_command("web", "--config", str(cfg)), tmp, "web", wait_connected=True)
    seconds = 5.0 if quick else 20.0
    results = []
    try:
        devices = []
        for n in range(CLIENTS):
            raw = json.dumps({"chip_id": f"{0xB0000000 + n:08X}", "mac_address": "24:6F:28:00:00:00",
                              "firmware_version": "car_wash_v1.00"}).encode()
            c = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
            c.request("POST", "/api/v1/devices/need-register", body=raw,
                      headers={"Content-Type": "application/json", "x-signature": http_signature(raw, key)})
            devices.append(json.loads(c.getresponse().read())["data"]["device_id"])
            c.close()
        t0 = int(time.time() * 1000)

        def body(n: int, i: int) -> tuple[bytes, dict[str, str]]:
            items = [{"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": t0 + i * 10 + k, "total_amount": 20,
                      "bank": {"20": 1}, "coin": {}} for k in range(10)]
            raw = json.dumps({"device_id": devices[n], "items": items}).encode()
            return raw, {"Content-Type": "application/json", "x-signature": http_signature(raw, key)}

        worker = _worker(web.pid)  # `carwash-gateway web` execs gunicorn
        cpu0 = _cpu(worker)
        lat, errors = _load(web_port, "/api/v1/device-event-logs/uploads", body, seconds)
        cpu_upload = (_cpu(worker) - cpu0) / max(1, len(lat)) * 1e6
        rate = len(lat) / seconds
        results.append(Result(NAME, "signed 10-item log upload, 50 clients", "ms", lat,
                              notes=f"{rate:,.0f} req/s over {seconds:.0f} s, {errors} errors; goal (#20): >= 0.5 x "
                                    "the bare endpoint's req/s and p99 <= 2 x its p99, same run (rows below)",
                              extra={"requests_per_s": rate}))
        results.append(Result(NAME, "log uploads per second", "req/s", [rate]))
        results.append(Result(NAME, "web worker CPU per 10-item upload", "us", [cpu_upload],
                              notes=f"{cpu_upload / 10:.0f} us per item; the bare endpoint's below"))
    finally:
        stop_process(web)  # type: ignore[arg-type]
        stop_process(core)  # type: ignore[arg-type]
        wn.close()
        cn.close()
    # The bare endpoint, same gunicorn settings (web/gunicorn_conf.py), same config.
    env = {"CARWASH_GATEWAY_CONFIG": str(cfg)}
    bare, bn = start_notified([sys.executable, "-m", "gunicorn", "--config",
                       str(ROOT / "web" / "gunicorn_conf.py"), "bench.bare_app:app"], tmp, "bare", env_extra=env)
    try:
        raw = b'{"device_id":"x","items":[]}'
        bworker = _worker(bare.pid)
        bcpu0 = _cpu(bworker)
        blat, berr = _load(web_port, "/bare", lambda n, i: (raw, {"Content-Type": "application/json"}), seconds)
        cpu_bare = (_cpu(bworker) - bcpu0) / max(1, len(blat)) * 1e6
    finally:
        stop_process(bare)  # type: ignore[arg-type]
        bn.close()
    brate = len(blat) / seconds
    results.append(Result(NAME, "bare Flask endpoint, 50 clients", "ms", blat,
                          notes=f"{brate:,.0f} req/s, {berr} errors; same gunicorn config"))
    results.append(Result(NAME, "web worker CPU per bare request", "us", [cpu_bare],
                          notes=f"uploads cost {cpu_upload - cpu_bare:,.0f} us more"))
    p99_ratio = Result(NAME, "", "ms", lat).p99 / Result(NAME, "", "ms", blat).p99  # type: ignore[operator]
    results.append(Result(NAME, "upload/bare throughput", "ratio", [rate / brate] if brate else [],
                          median=rate / brate, notes=f"goal >= 0.5; p99 upload/bare {p99_ratio:.2f} (goal <= 2)"))
    return results


def _fleet(tmp: Path, quick: bool) -> list[Result]:
    count, interval, window = (300, 10.0, 20.0) if quick else (1000, 60.0, 60.0)
    web_port, mqtt_port = free_port(), free_port()
    cfg = write_demo_site(tmp / "fleet", web_port=web_port, mqtt_port=mqtt_port,
                          extra_toml=f"[devices]\nstreaming_interval_sec = {interval}\n")
    key = (json.loads((ROOT / "gateway" / "data" / "spec-vectors.json").read_text()))["secret_key"]
    core, cn = start_notified(gateway_command("core", "--config", str(cfg)), tmp, "fcore")
    web, wn = start_notified(gateway_command("web", "--config", str(cfg)), tmp, "fweb", wait_connected=True)

    async def run() -> tuple[float, float]:
        stop = asyncio.Event()
        fleet = Fleet(base_url=f"http://127.0.0.1:{web_port}", mqtt_host="127.0.0.1", mqtt_port=mqtt_port, key=key,
                      count=count, interval=interval)
        task = asyncio.create_task(fleet.run(stop))
        try:
            await asyncio.wait_for(fleet.ready.wait(), 600)
            await asyncio.sleep(min(interval, 5.0))  # every device has started streaming
            core.cpu_percent(None)
            await asyncio.sleep(window)
            return core.cpu_percent(None), core.memory_info().rss / 1e6
        finally:
            stop.set()
            await asyncio.wait_for(task, 120)

    try:
        cpu, rss = asyncio.run(run())
    finally:
        stop_process(web)  # type: ignore[arg-type]
        stop_process(core)  # type: ignore[arg-type]
        wn.close()
        cn.close()
    note = f"{count} devices, streaming every {interval:.0f} s, over {window:.0f} s"
    return [Result(NAME, "core CPU with a device fleet", "%", [cpu], notes=note),
            Result(NAME, "core RSS with a device fleet", "MB", [rss], notes=note)]


def run(quick: bool) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="bench-devices-") as d:
        return _uploads(Path(d), quick) + _fleet(Path(d), quick)


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
