"""The upload storm after a bulk restart (issue #20).

Devices upload their buffered event logs after a reset (device-api.md): after a bulk restart of a
whole site every device uploads at once. A real core and gunicorn; a fleet of simulated devices
(`sim/fleet.py`, one MQTT session each, `reboots`) in this process, each holding ITEMS buffered
payments. `POST /api/v1/devices/bulk-restart` (delay 0) to every device; each device ACKs, sends
its startup document and uploads its buffer (one 1,000-item request), as firmware does.

Reported: the time from the restart request to the last 201, the items per second over it, the
CPU time of the gunicorn worker (and of the core) per item, and the ceiling: the same rows inserted
by a bare script (sqlite3, no Python beyond `executemany`) into a migrated database on the same
disk, one synchronous=FULL transaction per device's upload. Every item is checked in the
database afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from bench.common import Result, http_json, start_site
from gateway.devices.validate import log_upload
from gateway.store import migrate, open_database
from sim.fleet import Fleet, FleetThread, SimDevice

NAME = "restart_storm"
ITEMS = 1000  # buffered items per device: one upload of the API's largest size
CLIENTS = 50  # concurrent HTTP requests of the fleet (its devices take turns on them)


class StormFleet(Fleet):
    """The simulated fleet, recording when each device's reboot (startup document, then its
    upload) ended, and how: `done` holds (monotonic time, items acknowledged, error or None)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._http = ThreadPoolExecutor(max_workers=CLIENTS, thread_name_prefix="storm-http")
        self.done: list[tuple[float, int, str | None]] = []
        self._lock = threading.Lock()

    async def _reboot(self, d: SimDevice, delay: float) -> None:
        error: str | None = None
        sent = 0
        try:
            await self._startup(d)
            sent = await self.upload_buffered(d)
        except (OSError, ValueError) as exc:
            error = f"{d.device_id}: {exc}"
        with self._lock:
            self.done.append((time.monotonic(), sent, error))


def _items(n: int, base_ms: int) -> list[dict[str, Any]]:
    """A device's buffer: payments a second apart, notes and coins adding up to the total."""
    out = []
    for k in range(n):
        notes = {"20": k % 3, "50": k % 2, "100": 0, "500": 0, "1000": 0}
        coins = {"1": 0, "2": 0, "5": k % 2, "10": k % 4}
        if not any(notes.values()) and not any(coins.values()):
            coins["10"] = 2
        total = sum(int(v) * c for v, c in notes.items()) + sum(int(v) * c for v, c in coins.items())
        out.append({"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": base_ms + k * 1000, "total_amount": total,
                    "bank": notes, "coin": coins, "qr": {"chargeId": None, "net_amount": 0}})
    return out


def _ceiling(tmp: Path, buffers: dict[str, list[dict[str, Any]]]) -> tuple[float, float]:
    """The same rows into a fresh migrated database on the same disk, by a bare script: one
    IMMEDIATE synchronous=FULL transaction per device (its upload), one `executemany` each.
    Returns (seconds, CPU seconds of this process). The rows are built before the clock starts."""
    path = tmp / "ceiling.db"
    db = open_database(path, bind_models=False)
    migrate(db)
    db.close()
    rows = []
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    for dev, items in buffers.items():
        _, parsed = log_upload({"device_id": dev, "items": items})
        rows.append([(dev, it.dedup_key(dev), it.type, it.status, it.timestamp_ms, it.total_amount, it.qr_charge_id,
                      it.qr_net_amount, json.dumps(it.bank), json.dumps(it.coin), it.mismatch, now) for it in parsed])
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in ("journal_mode=wal", "synchronous=2", "wal_autocheckpoint=4096", "foreign_keys=1"):
            conn.execute(f"PRAGMA {pragma}")
        conn.executemany("INSERT INTO device (device_id, chip_id, mac_address, device_type, firmware_version, "
                         "registered_at, claimed, rejected, online) VALUES (?, ?, '00:00:00:00:00:00', 'CAR_WASH', "
                         "'car_wash_v1.00', ?, 0, 0, 0)", [(d, d, now) for d in buffers])
        sql = ('INSERT INTO event_log_item (device_id, dedup_key, type, status, timestamp_ms, total_amount, '
               'qr_charge_id, qr_net_amount, bank, coin, amount_mismatch, received_at) '
               'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)')
        cpu0, t0 = time.process_time(), time.perf_counter()
        for batch in rows:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(sql, batch)
            conn.execute("COMMIT")
        return time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        conn.close()


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def run(quick: bool) -> list[Result]:
    count = 50 if quick else 200
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as d:
        tmp = Path(d)
        site = start_site(tmp, extra_toml="[devices]\ncommand_timeout_sec = 60\nstreaming_interval_sec = 600\n")
        core, web, base, auth = site.core, site.web, site.base, site.auth
        fleet = StormFleet(base_url=base, mqtt_host="127.0.0.1", mqtt_port=site.mqtt_port, key=site.key, count=count,
                           interval=600.0, helmet_share=0.0, reboots=True)
        ft = FleetThread(fleet)
        try:
            ft.start(timeout=600)
            base_ms = int(time.time() * 1000) - ITEMS * 1000
            buffers = {dev.device_id: _items(ITEMS, base_ms) for dev in fleet.devices}
            for dev in fleet.devices:
                dev.buffer = list(buffers[dev.device_id])
            worker = psutil.Process(web.pid).children()[0]  # `carwash-gateway web` execs gunicorn: its worker
            core_ps = psutil.Process(core.pid)
            w0, c0 = _cpu(worker), _cpu(core_ps)
            t0 = time.monotonic()
            answer = http_json(base + "/api/v1/devices/bulk-restart",
                           {"device_ids": [dev.device_id for dev in fleet.devices], "delay_seconds": 0}, auth)
            if answer["data"]["status"] != "INITIATED":
                raise RuntimeError(f"bulk restart refused: {answer}")
            deadline = time.monotonic() + 600
            while len(fleet.done) < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(fleet.done)} of {count} devices rebooted within 600 s")
                time.sleep(0.05)
            w_cpu, c_cpu = _cpu(worker) - w0, _cpu(core_ps) - c0
            failed = [e for _, _, e in fleet.done if e is not None]
            if failed or any(n != ITEMS for _, n, _ in fleet.done):
                raise RuntimeError(f"{len(failed)} devices failed (first: {failed[:1]}); "
                                   f"{sum(n for _, n, _ in fleet.done)} of {count * ITEMS} items acknowledged")
            last = max(t for t, _, _ in fleet.done)
        finally:
            ft.stop()
            site.stop()
        db = sqlite3.connect(tmp / "site" / "gateway.db")
        try:
            stored = db.execute("SELECT COUNT(*) FROM event_log_item").fetchone()[0]
        finally:
            db.close()
        total = count * ITEMS
        if stored != total:
            raise RuntimeError(f"{stored} items stored, {total} acknowledged")
        ceil_s, ceil_cpu = _ceiling(tmp, buffers)
    storm_s = last - t0
    rate, ceil_rate = total / storm_s, total / ceil_s
    n = f"{count} devices x {ITEMS} items after one bulk RESTART, {CLIENTS} concurrent requests"
    return [
        Result(NAME, "restart to last 201", "s", [storm_s], notes=f"{n}; every item counted in the database"),
        Result(NAME, "items per second through the gateway", "items/s", [rate], notes="goal >= 20,000"),
        Result(NAME, "ceiling: bare sqlite3 inserts, same rows", "items/s", [ceil_rate],
               notes=f"one FULL commit per {ITEMS} rows, same disk; {ceil_cpu / total * 1e6:.1f} us CPU/item"),
        Result(NAME, "gateway / ceiling", "ratio", [rate / ceil_rate], notes="goal >= 0.3"),
        Result(NAME, "web worker CPU per item", "us", [w_cpu / total * 1e6],
               notes=f"{w_cpu:.2f} s over the storm; core {c_cpu / total * 1e6:.1f} us/item ({c_cpu:.2f} s)"),
    ]


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
