"""Late replies on the fieldbus (#16): 16 bays polled at 5 Hz while the PLC answers late.

1. Polls: the bus scheduler against a scripted PLC (tests/scripted_plc.py) on a socat pty pair,
   16 bays behind 4 unit ids at bases 0/100/200/300 (so replies of different bays look alike).
   Every Nth request is answered late, during the next transaction. Counted: polls credited to
   the wrong bay (each reply names its base), timeouts, stale replies dropped, fences; and the
   poll rate against the same run with no late replies (what the guard time and fences cost).
2. Sessions: the real core and the project's PLC simulator in its own process, 16 bays at 5 Hz;
   washes on 8 bays while the PLC process is paused (SIGSTOP/SIGCONT) for longer than the
   timeout every 2 s. Counted: sessions per wash (split), sessions no wash started (ghost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Result
from plc.bus import BayAddress, BusScheduler, BusSettings, PollResult
from plc.profile import builtin_profiles
from sim.demo import free_port, write_demo_site
from sim.procs import NotifySocket, child_env, gateway_command, stop_process
from sim.pty import SocatPair
from tests.scripted_plc import ScriptedRtuPlc, ScriptedTcpPlc

NAME = "late_replies"
P = builtin_profiles()["washbay-v1"]
UNITS = 4
BASES = (0, 100, 200, 300)
PERIOD = 0.2


def _addrs() -> list[BayAddress]:
    return [BayAddress(f"u{u}b{b}", u, b, P, PERIOD) for u in range(1, UNITS + 1) for b in BASES]


async def _polls(tmp: Path, every: int, seconds: float) -> dict[str, float]:
    pair = SocatPair(tmp / f"pty-{every}")
    await asyncio.to_thread(pair.start)
    plc = ScriptedRtuPlc(pair.plc_path, late=(lambda n: n % every == every // 2) if every else (lambda n: False))
    await plc.start()
    ok = wrong = failed = 0

    def on_poll(r: PollResult) -> None:
        nonlocal ok, wrong, failed
        if r.status is None:
            failed += 1
            return
        ok += 1
        base = int(r.bay_id.split("b")[-1])
        wrong += r.status.ack_seq != base

    bus = BusScheduler(BusSettings(name="rs485", type="rtu", device=pair.gateway_path, baudrate=115200), _addrs(),
                       on_poll)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    task = asyncio.create_task(bus.run())
    try:
        await asyncio.sleep(seconds)  # the measured window itself, not a synchronisation
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await plc.stop()
        await asyncio.to_thread(pair.stop)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    line = bus.line_stats()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {"ok": ok, "wrong": wrong, "failed": failed, "rate": ok / seconds, "late": plc.late_sent,
            "cpu_us_per_tx": cpu / max(1, line["transactions"]) * 1e6, **line}


async def _tcp_reboot(rounds: int) -> list[float]:
    """A TCP PLC goes away for 2 to 5 s (at random, so its return falls anywhere in the reconnect
    backoff) and comes back on the same port: seconds from it listening again to the first good
    poll of its bays."""
    plc = ScriptedTcpPlc()
    await plc.start()
    port = plc.port
    got = asyncio.Event()
    bus = BusScheduler(BusSettings(name="lan", type="tcp", host="127.0.0.1", port=port),
                       [BayAddress(f"b{b}", 1, b, P, PERIOD) for b in BASES],
                       lambda r: got.set() if r.status is not None else None, backoff_max=5.0)
    task = asyncio.create_task(bus.run())
    out = []
    try:
        for _ in range(rounds):
            await asyncio.wait_for(got.wait(), 30)
            await plc.stop()
            await asyncio.sleep(random.uniform(2.0, 5.0))  # the reboot: the fault's length, not a synchronisation
            got.clear()
            plc = ScriptedTcpPlc(port=port)
            await plc.start()
            t0 = time.monotonic()
            await asyncio.wait_for(got.wait(), 30)
            out.append(time.monotonic() - t0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await plc.stop()
    return out


def _session_rows(db: Path) -> list[tuple[str, str | None, str]]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute('SELECT "bay_id", "request_id", "state" FROM "wash_session"').fetchall()


def _sessions(tmp: Path, quick: bool) -> dict[str, float]:
    pair = SocatPair(tmp / "pty-core")
    pair.start()
    bays = [(f"u{u}b{b}", u, b) for u in range(1, UNITS + 1) for b in BASES]
    sim = subprocess.Popen(gateway_command("simulate-plc", "--rtu", pair.plc_path, "--wash-time", "8",
                                           *[a for bid, u, b in bays for a in ("--bay", f"{bid}:{u}:{b}")]),
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert sim.stdout is not None
    assert sim.stdout.readline().startswith("plc simulator:")
    extra = ("[wash]\nstart_timeout_sec = 5.0\npoll_period_ms = 200\noffline_backoff_max_sec = 1.0\n"
             f'[[buses]]\nname = "rs485"\ntype = "rtu"\ndevice = "{pair.gateway_path}"\nbaudrate = 115200\n'
             + "".join(f'[[bays]]\nid = "{bid}"\nbus = "rs485"\nunit = {u}\nbase = {b}\n' for bid, u, b in bays))
    cfg_path = write_demo_site(tmp / "site", web_port=free_port(), mqtt_port=free_port(), extra_toml=extra)
    from gateway.config import load_config, load_secrets
    from tests.mqtt_probe import Probe

    cfg = load_config(cfg_path)
    sec = load_secrets(cfg)
    notify = NotifySocket(tmp / "core.notify")
    with (tmp / "core.log").open("wb") as log:
        core = subprocess.Popen(gateway_command("core", "--config", str(cfg_path)), env=child_env(notify),
                                stdout=log, stderr=log)
    rounds = 2 if quick else 5
    started: list[tuple[str, str]] = []
    pauses = 0
    try:
        notify.wait_for("READY=1", 30)
        with Probe(cfg.mqtt.port, username=cfg.mqtt.internal_username, password=sec.mqtt_internal_password) as p:
            p.connect()
            p.subscribe("wash/+/cmd/result")
            p.subscribe("wash/+/status")
            state: dict[str, str] = {}

            def settle(pred, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
                deadline = time.monotonic() + timeout
                while not pred():
                    m = p.expect(None, max(0.01, deadline - time.monotonic()))
                    if m.topic.endswith("/status"):
                        state[m.topic.split("/")[1]] = json.loads(m.payload)["state"]

            settle(lambda: len(state) == len(bays) and set(state.values()) == {"IDLE"})
            for r in range(rounds):
                washed = [bid for i, (bid, _u, _b) in enumerate(bays) if i % 2 == r % 2]
                for bid in washed:
                    rid = f"bench-{r}-{bid}"
                    p.publish(f"wash/{bid}/cmd", json.dumps({"bayId": bid, "action": "START", "course": "BASIC",
                                                             "requestId": rid}))
                    res = json.loads(p.expect(f"wash/{bid}/cmd/result", 10).payload)
                    if res["accepted"]:
                        started.append((bid, rid))
                # 8 s washes + 2 s DONE hold: pause every 2 s meanwhile, for longer than the timeout.
                end = time.monotonic() + 12
                while time.monotonic() < end:
                    sim.send_signal(signal.SIGSTOP)
                    threading.Event().wait(0.35)
                    sim.send_signal(signal.SIGCONT)
                    pauses += 1
                    threading.Event().wait(1.65)
                settle(lambda: set(state.values()) == {"IDLE"})  # every bay back to IDLE before the next round
    finally:
        stop_process(core)  # type: ignore[arg-type]
        notify.close()
        sim.send_signal(signal.SIGCONT)
        sim.terminate()
        sim.wait(10)
        sim.stdout.close()
        pair.stop()
    rows = _session_rows(tmp / "site" / "gateway.db")
    wanted = {rid for _bid, rid in started}
    per_wash = {rid: sum(1 for _b, r, _s in rows if r == rid) for rid in wanted}
    return {"washes": len(started), "sessions": len(rows), "pauses": pauses,
            "split": sum(n - 1 for n in per_wash.values() if n > 1),
            "missing": sum(1 for n in per_wash.values() if n == 0),
            "ghost": sum(1 for _b, r, _s in rows if r not in wanted),
            "not_done": sum(1 for _b, r, s in rows if r in wanted and s != "DONE")}


def run(quick: bool) -> list[Result]:
    seconds = 15.0 if quick else 60.0
    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-late-") as d:
        tmp = Path(d)
        base = asyncio.run(_polls(tmp, 0, seconds))
        for every in (50, 10):
            s = asyncio.run(_polls(tmp, every, seconds))
            lost = 1 - s["rate"] / base["rate"] if base["rate"] else 0.0
            note = (f"{s['ok']} polls, {s['late']} late replies, {s['timeouts']} timeouts, "
                    f"{s['stale_dropped']} stale dropped, {s['fences']} fences, guard {s['guard_seconds']:.2f} s")
            out.append(Result(NAME, f"misattributed polls, late reply every {every} requests", "polls",
                              [float(s["wrong"])], notes=note + "; goal 0", extra=s))
            out.append(Result(NAME, f"poll rate lost, late reply every {every} requests", "%",
                              [lost * 100], notes=f"{s['rate']:.1f} vs {base['rate']:.1f} polls/s with no late reply"))
        back = asyncio.run(_tcp_reboot(3 if quick else 10))
        out.append(Result(NAME, "TCP PLC back after a 2-5 s reboot -> first good poll", "s", back,
                          notes="reconnect backoff <= 1.5 s, bays polled at once on reconnect; goal < 2 s"))
        out.append(Result(NAME, "gateway CPU per Modbus transaction (scheduler + transactor)", "us",
                          [base["cpu_us_per_tx"]], extra=base,
                          notes="bench process: scheduler, transactor and the scripted PLC answering in it; "
                                "pty, no late replies"))
        s = _sessions(tmp, quick)
        out.append(Result(NAME, "split or ghost sessions, PLC paused 0.35 s every 2 s", "sessions",
                          [float(s["split"] + s["ghost"])],
                          notes=f"{s['washes']} washes, {s['sessions']} sessions, {s['pauses']} pauses, "
                                f"{s['missing']} missing, {s['not_done']} not DONE; goal 0", extra=s))
    return out


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
