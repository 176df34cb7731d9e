"""Device-command figures (the commands issue).

A real core and gunicorn, and a fleet of simulated devices (one MQTT session each) in this
process. One bulk APPLY_CONFIG to every device, read through the bulk SSE stream:
1. time to publish all: from the HTTP request to the moment the last device received its command
   (goal <= 1 s for 1,000 devices);
2. time from the last ACK a device sent to `complete` on SSE (goal <= 1 s);
3. the same with 10 % of the devices silent: when `complete` arrives, relative to the command
   timeout counted from the last publish (goal: timeout ± 0.5 s);
4. the core's peak RSS during the operations.
"""

from __future__ import annotations

import re
import sqlite3
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from bench.common import Result, http_json, median, start_site
from sim.fleet import CAR_WASH_CONFIGS, Fleet, FleetThread

NAME = "commands"


class PeakRss:
    """Samples a process's RSS every 50 ms on a thread; `peak` in MB."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc, self.peak = proc, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 1e6)
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _sse_until_results(url: str, headers: dict[str, str]) -> dict[str, float]:
    """Read a stream to its end; the monotonic arrival time of each event name (last one wins)."""
    seen: dict[str, float] = {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("event:"):
                seen[line[6:].strip()] = time.monotonic()
    return seen


def _operation(base: str, auth: dict[str, str], fleet: Fleet) -> dict[str, float]:
    ids = [d.device_id for d in fleet.devices]
    t0 = time.monotonic()
    answer = http_json(base + "/api/v1/devices/apply-config", {"device_ids": ids, "configs": CAR_WASH_CONFIGS}, auth)
    t_reply = time.monotonic()
    data = answer["data"]
    seen = _sse_until_results(base + f"/api/v1/devices/bulk-events/{data['setup_id']}", auth)
    cid = data["command_id"]
    received = [d.received_at[cid] for d in fleet.devices if cid in d.received_at]
    acked = [d.acked_at[cid] for d in fleet.devices if cid in d.acked_at]
    if not received:
        raise RuntimeError(f"no device received {cid}")
    # Counted, not raised: amqtt drops a QoS 1 delivery that is not acknowledged within 5 s (no
    # redelivery), which a fleet of a thousand sessions in one loaded process can miss.
    return {"lost": len(ids) - len(received),
            "t0": t0, "reply": t_reply - t0, "last_received": max(received), "last_ack": max(acked) if acked else 0.0,
            "complete": seen["complete"], "acks": len(acked)}


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _wait_online(db_path: Path, count: int, timeout: float) -> float:
    """Until the core has stored every device's first streaming message (its `online` transition,
    one fsynced commit each, handled in arrival order on the bus dispatcher that RPCs wait behind);
    returns how long that took. A bulk command sent meanwhile measures that backlog, not itself."""
    t0 = time.monotonic()
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        sql = "SELECT COUNT(DISTINCT device_id) FROM device_lifecycle_event WHERE kind = 'online'"
        while db.execute(sql).fetchone()[0] < count:
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"devices not all online within {timeout:g} s")
            time.sleep(0.1)
    finally:
        db.close()
    return time.monotonic() - t0


def run(quick: bool) -> list[Result]:
    count, timeout, rounds = (300, 3.0, 2) if quick else (1000, 10.0, 3)
    with tempfile.TemporaryDirectory(prefix="bench-commands-") as d:
        tmp = Path(d)
        site = start_site(tmp, extra_toml=f"[devices]\ncommand_timeout_sec = {timeout}\nstreaming_interval_sec = 600\n")
        core, web, base, auth = site.core, site.web, site.base, site.auth
        fleet = Fleet(base_url=base, mqtt_host="127.0.0.1", mqtt_port=site.mqtt_port, key=site.key, count=count,
                      interval=600.0, helmet_share=0.0)
        ft = FleetThread(fleet)
        publish, to_complete, replies, offsets, from_request = [], [], [], [], []
        lost = 0
        try:
            ft.start(timeout=600)
            online_wait = _wait_online(tmp / "site" / "gateway.db", count, 600)
            me, core_ps = psutil.Process(), psutil.Process(core.pid)
            worker = psutil.Process(web.pid).children()[0]  # `carwash-gateway web` execs gunicorn: its worker
            with PeakRss(core_ps) as rss:
                me.cpu_percent(None)
                core_ps.cpu_percent(None)
                cpu0 = {"core": _cpu(core_ps), "web": _cpu(worker), "fleet": _cpu(me)}
                for _ in range(rounds):
                    r = _operation(base, auth, fleet)
                    lost += r["lost"]
                    publish.append((r["last_received"] - r["t0"]) * 1000)
                    to_complete.append((r["complete"] - r["last_ack"]) * 1000)
                    replies.append(r["reply"] * 1000)
                cpu_fleet, cpu_core = me.cpu_percent(None), core_ps.cpu_percent(None)
                per_device = {k: (c() - cpu0[k]) / (rounds * count) * 1e6
                              for k, c in (("core", lambda: _cpu(core_ps)), ("web", lambda: _cpu(worker)),
                                           ("fleet", lambda: _cpu(me)))}
                for dev in fleet.devices[::10]:
                    dev.behaviour = "silent"
                silent = sum(1 for dev in fleet.devices if dev.behaviour == "silent")
                for _ in range(rounds):
                    r = _operation(base, auth, fleet)
                    offsets.append((r["complete"] - (r["last_received"] + timeout)) * 1000)
                    from_request.append((r["complete"] - (r["t0"] + timeout)) * 1000)
                    lost += r["lost"]
                    if r["acks"] + r["lost"] < count - silent:
                        raise RuntimeError(f"{r['acks']} ACKs, expected {count - silent}")
            rss_before_stop = psutil.Process(core.pid).memory_info().rss / 1e6
            core_log = (tmp / "core.log").read_text().splitlines()
            core_publish = [float(line.rsplit(" in ", 1)[1].split()[0]) for line in
                            core_log if "devices in" in line and "published" in line]
            parts = [re.search(r"checked in (\d+) ms, stored in (\d+) ms, answered after (\d+) ms", line)
                     for line in core_log if "answered after" in line]
            checked = [float(m.group(1)) for m in parts if m]
            stored = [float(m.group(2)) for m in parts if m]
            answered = [float(m.group(3)) for m in parts if m]
        finally:
            ft.stop()
            site.stop()
    n = f"{count} devices, {rounds} rounds"
    online = (f"; measured once the core had stored every device's first streaming message "
              f"({online_wait:.1f} s after the fleet connected: RPCs wait behind that backlog)")
    return [
        Result(NAME, "bulk APPLY_CONFIG: request to last device received", "ms", publish,
               notes=f"{n}; goal <= 1000{online}; {lost} deliveries lost over all rounds"),
        Result(NAME, "bulk APPLY_CONFIG: HTTP reply (INITIATED)", "ms", replies, notes=n),
        Result(NAME, "bulk APPLY_CONFIG: core, RPC in to answer", "ms", answered,
               notes=f"{n}; of it: checks (devices, schema) median {median(checked):.0f} ms, "
                     f"storing the command and {count} PENDING rows (one FULL commit) {median(stored):.0f} ms"
               if answered else "not in this core's log"),
        Result(NAME, "bulk APPLY_CONFIG: the core's publish loop", "ms", core_publish,
               notes=f"{n}; handing every command to the broker, before delivery"),
        Result(NAME, "bulk APPLY_CONFIG: last ACK to SSE complete", "ms", to_complete, notes=f"{n}; goal <= 1000"),
        Result(NAME, "10% silent: SSE complete minus (request + timeout)", "ms", from_request,
               notes=f"{n}, {silent} silent, timeout {timeout:g} s; goal within ±500"),
        Result(NAME, "10% silent: SSE complete minus (last delivery + timeout)", "ms", offsets,
               notes="negative: the timer starts when the core hands the command to the broker"),
        Result(NAME, "CPU during all-answering rounds: core", "%", [cpu_core],
               notes=f"{n}; the simulated fleet (this process) used {cpu_fleet:.0f} % (100 % = one core)"),
        Result(NAME, "CPU per device commanded: core", "us", [per_device["core"]],
               notes=f"{n}, all answering: store, publish, {count} ACKs, results, SSE events; web worker "
                     f"{per_device['web']:.0f} us, the fleet {per_device['fleet']:.0f} us"),
        Result(NAME, "core peak RSS during bulk operations", "MB", [rss.peak],
               notes=f"{n}; {rss_before_stop:.1f} MB after them"),
    ]


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
