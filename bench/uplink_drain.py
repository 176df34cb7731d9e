"""Uplink figures: the outbox drainer against the cloud simulator, and payment creation.

1. `drain rate`: a backlog of 100,000 pending outbox events (quick: 20,000), written straight
   into a fresh, migrated SQLite file (WAL, synchronous=FULL, as the gateway opens it) in the
   stored form `gateway.store.outbox.add_event` produces (~330 bytes each, 200 devices, mixed types),
   is drained by `python -m gateway.uplink.drainer` (a separate process, the default batch limits
   of 500 events / 256 KiB) to `sim.cloud.CloudSim` running in this process. Rate =
   events / (first batch recorded by the simulator → last event recorded); the notes also give
   the rate from process start. After each run: lost = events in the database the simulator never
   received, duplicates = copies the simulator deduplicated, order = partitions whose first
   arrivals differ from their `seq` order, and every row must be `sent`. 3 runs (quick: 1).
2. `kill + resume`: the same backlog; the draining process is killed with SIGKILL once the
   simulator has half of it, then a new drainer process resumes. Lost and duplicate events as
   counted by the simulator, and the restart → first new event delivered time.
3. `payment create latency`: signed `POST /api/v1/payment-gateway/payments` to the simulator
   alone over one keep-alive connection, sequentially (1,000; quick: 200); the gateway's share of
   the path is measured once the payment proxy exists.
"""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Result, log, tail, temp_dir
from gateway.access.signing import http_signature
from gateway.payments.promptpay import check_emv
from gateway.store import migrate, open_database, write_tx
from gateway.store.outbox import add_events
from gateway.uplink.drainer import KEY_ENV
from sim.cloud import CloudSim
from sim.procs import child_env, stop_process

NAME = "uplink_drain"
KEY = "bench-site-key"
SITE = "bench-site"
DEVICES = 200
TYPES = (("device.event_logs", 70), ("wash.session", 10), ("device.status", 10), ("command.result", 10))
DRAIN_TIMEOUT = 600.0


def build_backlog(path: Path, n: int, seed: int = 1) -> None:
    """n pending events in seq order, stored by add_events (not timed)."""
    rng = random.Random(seed)
    kinds = [t for t, w in TYPES for _ in range(w)]
    db = open_database(path)
    migrate(db)
    events = []
    for i in range(n):
        device = f"device-{rng.randrange(DEVICES):04d}"
        payload = {"device_id": device, "items": [{"type": "PAYMENT", "status": "SUCCEEDED",
                                                   "timestamp": 1758358335794 + i, "total_amount": 40,
                                                   "bank": {"20": 2}, "coin": {}}]}
        events.append((kinds[i % len(kinds)], payload, device))
    with write_tx(db):  # one IMMEDIATE transaction on this thread's connection
        add_events(db, events, site_id=SITE)
    db.close()


def _drainer(db_path: Path, url: str, logfile: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "gateway.uplink.drainer", "--database", str(db_path), "--url", url,
           "--site-id", SITE, "--backoff-min", "0.2", "--backoff-max", "2"]
    env = child_env()
    env[KEY_ENV] = KEY  # the key travels in the environment, never on the command line
    with logfile.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _wait_until(sim: CloudSim, proc: subprocess.Popen[bytes], logfile: Path,
                predicate: Callable[[CloudSim], bool]) -> float:
    """Until `predicate(sim)`; fails if the drainer process dies. Returns time.monotonic() then."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        try:
            sim.wait_for(predicate, min(1.0, max(0.01, deadline - time.monotonic())))
            return time.monotonic()
        except TimeoutError:
            if proc.poll() is not None:
                raise RuntimeError(f"drainer exited with {proc.returncode}\n{tail(logfile)}") from None
            if time.monotonic() > deadline:
                raise


def _wait(sim: CloudSim, proc: subprocess.Popen[bytes], logfile: Path, target: int) -> float:
    return _wait_until(sim, proc, logfile, lambda s: s.unique >= target)


def _verify(db_path: Path, sim: CloudSim) -> dict[str, int]:
    """lost, duplicates, partitions out of order, rows not sent; compared with the database."""
    db = open_database(db_path, bind_models=False)
    try:
        rows = db.execute_sql('SELECT "event_id", "partition", "state" FROM "outbox_event" ORDER BY "seq"').fetchall()
    finally:
        db.close()
    got = set(sim.event_ids())
    lost = sum(1 for eid, _, _ in rows if eid not in got)
    expected: dict[str | None, list[str]] = {}
    for eid, part, _ in rows:
        expected.setdefault(part, []).append(eid)
    arrived = sim.partitions()
    disordered = sum(1 for part, ids in expected.items() if arrived.get(part) != ids)
    return {"lost": lost, "duplicates": sim.duplicates, "disordered_partitions": disordered,
            "not_sent": sum(1 for _, _, state in rows if state != "sent"),
            "unknown": len(got - {eid for eid, _, _ in rows})}


def _wait_all_sent(db_path: Path, n: int, timeout: float = 30.0) -> None:
    """The drainer marks the last batch just after the simulator recorded it."""
    db = open_database(db_path, bind_models=False)
    try:
        deadline = time.monotonic() + timeout
        while db.execute_sql('SELECT COUNT(*) FROM "outbox_event" WHERE "state" = \'sent\'').fetchone()[0] < n:
            if time.monotonic() > deadline:
                raise RuntimeError("drainer did not mark every event sent")
            time.sleep(0.02)
    finally:
        db.close()


def _drain_run(tmp: Path, n: int, i: int) -> tuple[float, float, dict[str, int]]:
    db_path = tmp / f"drain{i}.db"
    build_backlog(db_path, n, seed=i)
    logfile = tmp / f"drain{i}.log"
    with CloudSim(KEY, site_id=SITE, record_events=False) as sim:
        t0 = time.monotonic()
        proc = _drainer(db_path, sim.url, logfile)
        try:
            t_first = _wait(sim, proc, logfile, 1)
            first_batch = sim.unique
            t_done = _wait(sim, proc, logfile, n)
            _wait_all_sent(db_path, n)
        finally:
            code = stop_process(proc)
        if code != 0:
            raise RuntimeError(f"drainer exited with {code} on SIGTERM\n{tail(logfile)}")
        check = _verify(db_path, sim)
    steady = (n - first_batch) / (t_done - t_first) if t_done > t_first else float("nan")
    return steady, n / (t_done - t0), check


def _kill_resume(tmp: Path, n: int) -> dict[str, float]:
    db_path = tmp / "kill.db"
    build_backlog(db_path, n, seed=99)
    with CloudSim(KEY, site_id=SITE, record_events=False) as sim:
        first = _drainer(db_path, sim.url, tmp / "kill1.log")
        try:
            _wait(sim, first, tmp / "kill1.log", n // 2)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            stop_process(first)
        at_kill = sim.unique
        requests_before = sim.stats()["requests"]
        t0 = time.monotonic()
        second = _drainer(db_path, sim.url, tmp / "kill2.log")
        try:
            t_first = _wait_until(sim, second, tmp / "kill2.log",
                                  lambda s: s.stats()["requests"] > requests_before)
            _wait(sim, second, tmp / "kill2.log", n)
            _wait_all_sent(db_path, n)
        finally:
            code = stop_process(second)
        if code != 0:
            raise RuntimeError(f"resumed drainer exited with {code}\n{tail(tmp / 'kill2.log')}")
        check = _verify(db_path, sim)
    return {**check, "killed_at": at_kill, "resume_ms": (t_first - t0) * 1000}


def _payments(count: int) -> list[float]:
    lat: list[float] = []
    with CloudSim(KEY) as sim:
        conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i in range(count):
                raw = json.dumps({"device_id": "device-0004", "amount": 100 + i, "payment_method": "QR_PROMPT_PAY",
                                  "description": "Car wash payment"}).encode()
                headers = {"Content-Type": "application/json", "x-signature": http_signature(raw, KEY)}
                t0 = time.perf_counter()
                conn.request("POST", "/api/v1/payment-gateway/payments", body=raw, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                lat.append((time.perf_counter() - t0) * 1000)
                if resp.status != 200:
                    raise RuntimeError(f"payment create answered {resp.status}: {body[:200]!r}")
                check_emv(json.loads(body)["data"]["payment_results"]["encodedImage"]["rawData"])
        finally:
            conn.close()
    return lat


def run(quick: bool) -> list[Result]:
    n = 20_000 if quick else 100_000
    runs = 1 if quick else 3
    results: list[Result] = []
    with temp_dir("bench-uplink-") as tmp:
        rates, cold, checks = [], [], []
        for i in range(runs):
            steady, from_start, check = _drain_run(tmp, n, i)
            log(f"{NAME}: run {i + 1}: {steady:,.0f} events/s steady, {from_start:,.0f} from process start, {check}")
            rates.append(steady)
            cold.append(from_start)
            checks.append(check)
        total = {k: sum(c[k] for c in checks) for k in checks[0]}
        results.append(Result(
            NAME, f"drain {n:,}-event backlog to the simulator", "events/s", rates,
            notes=f"goal >= 5,000; from process start {min(cold):,.0f}-{max(cold):,.0f}/s; lost {total['lost']}, "
                  f"duplicates {total['duplicates']}, partitions out of order {total['disordered_partitions']}, "
                  f"not marked sent {total['not_sent']}",
            extra={"events": n, "runs": checks, "from_process_start": cold}))
        results.append(Result(NAME, "drain: events lost", "events", [float(c["lost"]) for c in checks]))
        results.append(Result(NAME, "drain: duplicates at the cloud", "events",
                              [float(c["duplicates"]) for c in checks]))
        k = _kill_resume(tmp, n)
        log(f"{NAME}: kill + resume: {k}")
        results.append(Result(NAME, "SIGKILL mid-drain + resume: lost", "events", [float(k["lost"])],
                              notes=f"killed at {int(k['killed_at']):,} of {n:,}; out-of-order partitions "
                                    f"{int(k['disordered_partitions'])}; not sent {int(k['not_sent'])}",
                              extra=k))
        results.append(Result(NAME, "SIGKILL mid-drain + resume: duplicates", "events", [float(k["duplicates"])],
                              notes="at most one batch (500) re-sent, deduplicated by the simulator"))
        results.append(Result(NAME, "resume: restart -> first delivery", "ms", [k["resume_ms"]],
                              notes="new drainer process: interpreter start, imports, first batch"))
    lat = _payments(200 if quick else 1000)
    results.append(Result(NAME, "payment create latency (simulator alone)", "ms", lat,
                          notes=f"{len(lat)} sequential signed requests, one keep-alive connection; "
                                "through the gateway: the payments benchmark"))
    return results


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick="--quick" in sys.argv)))
