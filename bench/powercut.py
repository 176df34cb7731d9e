"""Power cuts: the whole site under load on a data directory that loses its unsynced writes, cut
at random moments, then a check of every acknowledged fact (issue #18).

SIGKILL (bench/chaos.py) keeps the page cache: whatever a process wrote reaches the disk. A power
cut does not. Here the site's data directory (config, secrets, `gateway.db` and its `-wal`/`-shm`)
is served by `bench.powerfs`, a FUSE filesystem that holds every write until it is fsynced (file
data and size at the file's fsync, names at the directory's) and drops the rest on a cut; every
other cut is "torn": the last unsynced write reaches the medium as a random sector prefix. Half
the cuts fall at a random moment, half inside a random write (mid-commit, mid-checkpoint).

The site is bench/chaos.py's, reused as is: the real core and web (gunicorn) processes, in this
process the cloud simulator, the washbay-v1 PLC simulators (RTU over a socat pty pair, TCP), the
device fleet (reconnecting) and the load (signed event-log uploads retried until their 201, washes
with `requestId` retries, bulk commands, QR payments), recording only what was acknowledged.

A cut, at exponential gaps (seeded; `POWERCUT_SEED`): the filesystem is cut at that moment or
armed to cut inside one of the next few hundred writes (nothing reaches the medium afterwards),
both processes are SIGKILLed, the filesystem is unmounted and mounted again from the medium (its
memory, the "page cache", is gone), the core and the web are started again (READY=1), and a reader
beside them runs `PRAGMA integrity_check`. After the last
cut the load stops and the site settles; chaos's `verify` then compares the clients' record with
the database and the cloud simulator (each acknowledged upload item, wash, command result and
payment present once, each delivered to the cloud once), and a last integrity check runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import chaos
from bench.common import Result, log, temp_dir
from bench.powerfs import PowerFs
from sim.cloud import CloudSim
from sim.demo import DEMO_CLOUD_KEY, ensure_demo_user, free_port, spec_test_key, write_demo_site
from sim.fleet import FleetThread

NAME = "powercut"
SEED = 18
# In turn: a cut at a random moment (mostly between commits: each commit is fsynced), and a cut
# inside a random write of the next ARMED_WRITES (mid-commit or mid-checkpoint); each torn or not.
CUT_KINDS = (("moment", False), ("write", True), ("moment", True), ("write", False))
ARMED_WRITES = 300
ARMED_WAIT_SEC = 20.0  # an armed cut that found no write by then happens at that moment


@dataclass(frozen=True)
class CutPlan:
    """The size of a run: `cuts` power cuts at exponential gaps (mean `gap` s) under `load`."""

    cuts: int
    gap: float
    load: chaos.Plan


QUICK = CutPlan(cuts=8, gap=6.0, load=chaos.Plan(
    duration=0.0, devices=10, uploaders=2, upload_pause=0.2, payment_pause=0.8, command_pause=3.0,
    fault_gap=0.0, outage=(0.0, 0.0), wash_time=8.0, command_timeout=3.0))
FULL = CutPlan(cuts=40, gap=7.0, load=chaos.Plan(
    duration=0.0, devices=20, uploaders=3, upload_pause=0.15, payment_pause=0.6, command_pause=3.0,
    fault_gap=0.0, outage=(0.0, 0.0), wash_time=8.0, command_timeout=3.0))
# The suite's run: a few cuts, small load (tests/test_powercut.py).
TEST = CutPlan(cuts=3, gap=3.0, load=chaos.Plan(
    duration=0.0, devices=5, uploaders=2, upload_pause=0.2, payment_pause=0.8, command_pause=2.0,
    fault_gap=0.0, outage=(0.0, 0.0), wash_time=6.0, command_timeout=2.0))


@dataclass
class Outcome:
    """What a run measured; `lost`, `duplicated` and `integrity_failures` should be 0."""

    cuts: int = 0
    torn_cuts: int = 0
    acknowledged: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    integrity_failures: int = 0
    integrity_checks: int = 0
    check: dict[str, Any] = field(default_factory=dict)
    per_cut: list[dict[str, Any]] = field(default_factory=list)  # the filesystem's account of each cut
    restart_ms: list[float] = field(default_factory=list)  # cut -> core READY=1 and web joined the broker
    waited: dict[str, float] = field(default_factory=dict)
    cloud: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def acknowledged_total(self) -> int:
        return sum(self.acknowledged.values())


def integrity(db: Path) -> str:
    """`PRAGMA integrity_check` by a reader beside the running processes (a WAL snapshot)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        conn.execute("PRAGMA query_only = ON")
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()
    return "; ".join(str(r[0]) for r in rows)


class PowerCuts:
    """Cuts the power of the site: filesystem cut, both processes SIGKILLed, remount, restart."""

    def __init__(self, fs: PowerFs, gw: chaos.Gateway, db: Path, plan: CutPlan, seed: int, out: Outcome) -> None:
        self.fs, self.gw, self.db, self.plan, self.out = fs, gw, db, plan, out
        self.rng = random.Random(seed)
        self.t0 = time.monotonic()

    def cut(self) -> None:
        kind, torn = CUT_KINDS[self.out.cuts % len(CUT_KINDS)]
        seed = self.rng.randrange(1 << 30)
        if kind == "write":
            self.fs.arm(self.rng.randint(1, ARMED_WRITES), torn=torn, seed=seed)
        t0 = time.monotonic()
        info = self.fs.wait_cut(ARMED_WAIT_SEC) if kind == "write" else None
        if info is None:
            kind = "moment" if kind == "moment" else "moment (no write came)"
            info = self.fs.cut(torn=torn, seed=seed)
        info["kind"] = kind
        for name in ("web", "core"):
            self.gw.kill(name)
        self.fs.unmount()
        self.fs.mount()
        self.gw.start("core")
        self.gw.start("web")
        self.out.restart_ms.append((time.monotonic() - t0) * 1000)
        self.out.cuts += 1
        self.out.torn_cuts += torn
        result = integrity(self.db)
        self.out.integrity_checks += 1
        if result != "ok":
            self.out.integrity_failures += 1
            log(f"{NAME}: integrity_check after cut {self.out.cuts}: {result[:500]}")
        info.update(torn=torn, at_s=round(t0 - self.t0, 1), integrity=result[:200])
        self.out.per_cut.append(info)
        log(f"{NAME}: t={t0 - self.t0:5.1f} s cut {self.out.cuts} ({kind}{', torn' if torn else ''}): dropped "
            f"{info['dropped_writes']} unsynced writes ({info['dropped_bytes']} B), torn {info['torn_bytes']} B; "
            f"back in {self.out.restart_ms[-1]:.0f} ms; integrity {result[:60]}")

    def run(self, stop: threading.Event) -> None:
        while self.out.cuts < self.plan.cuts and not stop.is_set():
            stop.wait(self.rng.expovariate(1 / self.plan.gap))  # the schedule's own clock: a random moment
            if not stop.is_set():
                self.cut()


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A temporary directory; kept (medium, logs of every process) with POWERCUT_KEEP=1."""
    if os.environ.get("POWERCUT_KEEP"):
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="bench-powercut-"))
        log(f"{NAME}: keeping {d}")
        yield d
        return
    with temp_dir("bench-powercut-") as d:
        yield d


def power_cuts(plan: CutPlan, seed: int, workdir: Path | None = None) -> Outcome:
    """Run the site on a PowerFs, cut the power `plan.cuts` times under load, settle, verify.
    Everything started is stopped and unmounted on the way out, also on failure."""
    with contextlib.ExitStack() as stack:
        tmp = workdir if workdir is not None else stack.enter_context(_workdir())
        return _run(tmp, plan, seed)


def _run(tmp: Path, plan: CutPlan, seed: int) -> Outcome:
    out = Outcome()
    t_run = time.monotonic()
    truth = chaos.Truth()
    stop = threading.Event()
    key = spec_test_key()
    cloud = CloudSim(DEMO_CLOUD_KEY, site_id=chaos.SITE_ID, payment_auto_delay_sec=2.0)
    plc = chaos.PlcHost(tmp, plan.load.wash_time)
    fs = PowerFs(tmp / "medium", tmp / "site", tmp / "powerfs.sock", tmp / "powerfs.log")
    gw: chaos.Gateway | None = None
    ft: FleetThread | None = None
    load: chaos.Load | None = None
    try:
        cloud.start()
        plc.start()
        web_port, mqtt_port = free_port(), free_port()
        # The site is written on the medium before the first mount: it is durable, as after setup.
        write_demo_site(tmp / "medium", web_port=web_port, mqtt_port=mqtt_port,
                        extra_toml=chaos._site_toml(plc, cloud, plan.load))
        ensure_demo_user(tmp / "medium" / "gateway.toml")
        fs.mount()
        db, base = tmp / "site" / "gateway.db", f"http://127.0.0.1:{web_port}"
        gw = chaos.Gateway(tmp, tmp / "site" / "gateway.toml")
        gw.start("core")
        gw.start("web")
        fleet = chaos.ChaosFleet(base_url=base, mqtt_host="127.0.0.1", mqtt_port=mqtt_port, key=key,
                                 count=plan.load.devices, interval=30.0, helmet_share=0.0, seed=seed,
                                 slow_sec=plan.load.command_timeout / 2,
                                 behaviours=("success", "success", "failure", "silent", "slow"))
        ft = FleetThread(fleet)
        ft.start(timeout=120)
        load = chaos.Load(base, key, [d.device_id for d in fleet.devices], plan.load, truth, seed)
        cuts = PowerCuts(fs, gw, db, plan, seed, out)
        load.start()
        log(f"{NAME}: {plan.load.devices} devices, 6 bays, seed {seed}: {plan.cuts} power cuts, "
            f"mean gap {plan.gap:g} s")
        cuts.run(stop)
        out.waited = chaos._settle(truth, load, gw, plc, cloud, db, base, plan.load)
        out.check = chaos.verify(truth, db, cloud, plc, base)
        result = integrity(db)
        out.integrity_checks += 1
        if result != "ok":
            out.integrity_failures += 1
            log(f"{NAME}: final integrity_check: {result[:500]}")
    finally:
        stop.set()
        if load is not None:
            load.stop.set()
            load.give_up_at = 0.0
            load.join(15)
        if ft is not None:
            ft.stop()
        if gw is not None:
            gw.stop()
        fs.unmount()
        plc.stop()
        cloud.stop()
    out.lost = sum(int(out.check[k]) for k in chaos.LOST_KEYS)
    out.duplicated = sum(int(out.check[k]) for k in chaos.DUP_KEYS)
    out.acknowledged = {"event-log items (201)": len(truth.items), "washes (200)": len(truth.washes),
                        "command device results (INITIATED)": sum(len(d) for d in truth.commands.values()),
                        "payments (200)": len(truth.payments)}
    out.cloud = cloud.stats()
    out.counts, out.refused = dict(truth.counts), dict(truth.refused)
    out.seconds = time.monotonic() - t_run
    return out


def summary(out: Outcome) -> str:
    """The issue's table: cuts, acknowledged facts, lost, duplicated, integrity failures."""
    head = ("cuts", "torn", "acknowledged facts", "lost", "duplicated", "integrity failures")
    row = (out.cuts, out.torn_cuts, out.acknowledged_total, out.lost, out.duplicated,
           f"{out.integrity_failures} of {out.integrity_checks}")
    widths = [max(len(h), len(str(v))) for h, v in zip(head, row, strict=True)]
    return "\n".join(" | ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in (head, row))


def run(quick: bool) -> list[Result]:
    plan = QUICK if quick else FULL
    seed = int(os.environ.get("POWERCUT_SEED", SEED))
    out = power_cuts(plan, seed)
    print(summary(out), file=sys.stderr)
    c = out.check
    detail = lambda keys: ", ".join(f"{k} {c[k]}" for k in keys if c[k]) or "none"  # noqa: E731
    dropped = [float(p["dropped_writes"]) for p in out.per_cut]
    torn = [float(p["torn_bytes"]) for p in out.per_cut if p["torn"]]
    plc_bad = (c["sessions without a PLC wash"] + c["sessions whose outcome differs from the PLC"]
               + c["PLC washes never recorded"])
    mode = f"seed {seed}, {out.seconds:.0f} s"
    median_dropped_bytes = (sorted(p["dropped_bytes"] for p in out.per_cut)[len(out.per_cut) // 2]
                            if out.per_cut else 0)
    r = [
        Result(NAME, "power cuts (SIGKILL both, remount, restart)", "cuts", [float(out.cuts)],
               notes=f"{out.torn_cuts} torn; {dict(Counter(p['kind'] for p in out.per_cut))}; {mode}"),
        Result(NAME, "acknowledged facts", "facts", [float(out.acknowledged_total)],
               notes=", ".join(f"{k} {v}" for k, v in out.acknowledged.items())),
        Result(NAME, "lost (acknowledged facts missing)", "facts", [float(out.lost)],
               notes=f"goal 0; {detail(chaos.LOST_KEYS)}"),
        Result(NAME, "duplicated (same fact twice)", "facts", [float(out.duplicated)],
               notes=f"goal 0; {detail(chaos.DUP_KEYS)}"),
        Result(NAME, "integrity failures (PRAGMA integrity_check)", "checks", [float(out.integrity_failures)],
               notes=f"goal 0; {out.integrity_checks} checks: after every restart and at the end"),
        Result(NAME, "unsynced writes dropped per cut", "writes", dropped or [0.0],
               notes=f"bytes: median {median_dropped_bytes}"),
        Result(NAME, "torn write kept per torn cut", "B", torn or [0.0],
               notes="sector prefix of the last unsynced write"),
        Result(NAME, "cut -> core READY=1 and web joined", "ms", out.restart_ms or [0.0],
               notes="SIGKILL, unmount, mount, both started"),
        Result(NAME, "sessions disagreeing with the PLCs' washes", "sessions", [float(plc_bad)],
               notes=f"ERROR/PLC_OFFLINE although the PLC finished {c['ERROR/PLC_OFFLINE sessions the PLC finished']} "
                     f"(unknowable after a cut)"),
        Result(NAME, "cloud: re-sent event ids (deduplicated, harmless)", "events", [float(out.cloud["duplicates"])],
               notes=f"{out.cloud['unique']} unique events; outbox {c['outbox']}"),
    ]
    r[0].extra = {"check": {k: v for k, v in c.items() if k != "bays inconsistent"},
                  "bays_inconsistent": {b: list(v) for b, v in c["bays inconsistent"].items()},
                  "per_cut": out.per_cut, "counts": out.counts, "refused": out.refused, "cloud": out.cloud,
                  "settle_waits_s": out.waited, "acknowledged": out.acknowledged}
    log(f"{NAME}: check {json.dumps(r[0].extra['check'], default=str)}")
    return r


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick="--quick" in sys.argv)))
