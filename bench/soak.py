"""Soak: the whole demo site under steady site traffic for a bounded time, sampled for growth.

Runs `carwash-gateway demo --data-dir DIR` (a temporary DIR, removed afterwards) unchanged: its
core, its web (gunicorn arbiter + gthread worker), 6 simulated PLC bays (4 RTU over socat, 2 TCP),
its 20 simulated devices (streaming every 60 s, payments buffered and uploaded after a reset) and
its cloud simulator (the outbox drains to it). The core and the web are found among the demo's
children with psutil; they are the same processes a production site runs, so their figures are
their own (the simulators, the fleet and this process are measured by nobody).

Load added by this benchmark, by load (`CARWASH_SOAK_LOAD`):
- every load: at start the technician logs in and claims the 20 devices (as after installation);
  a dashboard keeps one `/api/wash/events` SSE stream open all along and polls `/api/health` +
  `/api/bays` every `PROBE_EVERY` s; during the warm-up each device uploads one extra log batch,
  so every code path has run once before the warm-up ends;
- `demo` (the default): the demo's own traffic, the yardstick of the wear goal. Its devices
  stream every 60 s and buffer their customers' payments (one per device about every 10 min); as
  firmware does, they upload them after a reset. Added: a bulk restart of every device every
  `RESTART_EVERY` s, followed on its SSE stream (a technician restarting the whole site twice an
  hour: more resets, so more uploads, than a site sees);
- `watch`: `demo --log-every 300`, the demo's default before the wear decision
  (docs/decisions.md, "Storage"): every device uploads 10 items about every 5 min (240 uploads an
  hour, 2,400 items: 20 times the demo's payments), no restarts. Per upload, bench/upload_writes.py
  takes it apart;
- `busy`: `watch` plus washes (every bay starts one every `WASH_EVERY` s, `POST /api/wash/start`,
  staggered, courses cycled; washes 2, 2 + `STOP_EVERY`, ... of a bay are stopped 10 s in:
  CANCELED; a demo wash lasts 30 s) and every `BULK_EVERY` s one bulk APPLY_CONFIG per device type
  followed on its bulk SSE stream to the end, as the technician page does.

Every `interval` s: RSS, PSS, open fds and threads of the core, the arbiter and the worker;
`/proc/<pid>/io` write_bytes (bytes sent to the block layer, i.e. disk) and wchar (every write(2),
sockets and pipes included); CPU times; sizes of the database and its WAL; and the bytes of log
output each process wrote (to a pipe here; journald in production, so not counted as disk writes).

Warm-up: the first `WARMUP_SHARE` of the run. "At the end of warm-up" is the median of the last 3
samples of the warm-up, "at the end" the median of the last 3 samples; rates are over the window
from the end of warm-up to the last sample.

Duration: 1 h, `--quick` 10 min; `CARWASH_SOAK_SECONDS` overrides both (development). The data
directory is made under $TMPDIR (it must be a disk, not tmpfs, for write_bytes to mean anything).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import signal
import sqlite3
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from bench.common import Result, log, median, temp_dir
from bench.memory import MB
from gateway.access.signing import http_signature
from sim.demo import DEMO_USER, READY_TIMEOUT, spec_test_key
from sim.fleet import CAR_WASH_CONFIGS, HELMET_CONFIGS
from sim.procs import child_env, gateway_command, stop_process

NAME = "soak"
ENV_SECONDS = "CARWASH_SOAK_SECONDS"
ENV_LOAD = "CARWASH_SOAK_LOAD"
LOADS = ("busy", "demo", "watch")
WATCH_ARGS = ("--log-every", "300")
DEMO_ARGS: dict[str, tuple[str, ...]] = {"busy": WATCH_ARGS, "demo": (), "watch": WATCH_ARGS}
FULL_SECONDS, QUICK_SECONDS = 3600.0, 600.0
WARMUP_SHARE = 0.2
WASH_EVERY = 240.0  # per bay: 6 bays -> 90 washes an hour, a busy site
STOP_EVERY = 4  # washes 2, 6, 10, ... of a bay are stopped by their customer
BULK_EVERY = 300.0
RESTART_EVERY = 1800.0  # load demo: every device restarted (and so uploading its payments)
PROBE_EVERY = 30.0
COURSES = ("BASIC", "STANDARD", "PREMIUM")
GOAL_GROWTH_PCT = 5.0
GOAL_WRITES_MB_H = 5.0
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (core|web) (\w+) ")


# --- the demo's output ------------------------------------------------------------------------


class DemoOutput:
    """Reads the demo's merged stdout/stderr (its own lines and every child's) on a thread: the
    header up to "Press Ctrl-C", the last lines, bytes per source (core, web, other) and the
    first warnings and errors of the core and the web. A pipe, not a file: log writes must not
    count as the gateway's disk writes (journald writes them in production)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.header: list[str] = []
        self.ready = threading.Event()
        self.tail: deque[str] = deque(maxlen=60)
        self.bytes: Counter[str] = Counter()
        self.levels: Counter[str] = Counter()
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="soak-demo-out", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace").rstrip("\n")
            m = LOG_LINE.match(line)
            # gunicorn's own lines ("[date] [pid] [LEVEL] ...") are the web arbiter's.
            source = m.group(1) if m else ("web" if line.startswith("[") and "] [" in line else "other")
            with self._lock:
                self.bytes[source] += len(raw)
                self.tail.append(line)
                if m:
                    self.levels[f"{source} {m.group(2)}"] += 1
                    if m.group(2) in ("WARNING", "ERROR", "CRITICAL") and len(self.problems) < 20:
                        self.problems.append(line[:300])
            if not self.ready.is_set():
                self.header.append(line)
                if line.startswith("Press Ctrl-C"):
                    self.ready.set()
        self.ready.set()  # EOF: the demo died (the caller sees that the header is incomplete)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.bytes)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# --- HTTP -------------------------------------------------------------------------------------


class Api:
    """JSON over HTTP to the demo's web, as the technician; logs in again when the token is
    refused. `call` returns (status, body) and never raises on an HTTP status."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self.token = ""

    def login(self) -> None:
        status, body = self.call("POST", "/api/v1/auth/login",
                                 {"username": DEMO_USER[0], "password": DEMO_USER[1]}, auth=False)
        if status != 200:
            raise RuntimeError(f"login refused: {status} {body}")
        self.token = body["data"]["token"]

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                headers: dict[str, str] | None = None) -> urllib.request.Request:
        # bytes go as they are (a signed body must be the bytes signed), anything else as JSON
        data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
        h = {"Content-Type": "application/json", **(headers or {})}
        if auth and self.token:
            h["Authorization"] = "Bearer " + self.token
        return urllib.request.Request(self.base + path, data=data, method=method, headers=h)

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        for attempt in (1, 2):
            req = self.request(method, path, body, auth=auth, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                raw = e.read()
                if e.code == 401 and auth and attempt == 1:
                    self.login()
                    continue
                try:
                    return e.code, json.loads(raw)
                except ValueError:
                    return e.code, raw.decode(errors="replace")
        raise AssertionError("unreachable")


def sse_events(api: Api, path: str, stop: threading.Event, on_event: Callable[[str], None]) -> None:
    """Read an SSE stream until the server closes it or `stop` is set (checked at each line: the
    server sends a keepalive every 15 s, the read timeout is longer)."""
    req = api.request("GET", path)
    with urllib.request.urlopen(req, timeout=40) as r:
        for raw in r:
            if stop.is_set():
                return
            line = raw.decode(errors="replace").strip()
            if line.startswith("event:"):
                on_event(line[6:].strip())


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Load:
    """Site traffic on a thread of its own: a time-ordered queue of actions (washes, stops, bulk
    operations, probes, log uploads) relative to `t0`; outcomes counted, never raised (a failing
    gateway shows in the counters and the samples, and the soak goes on)."""

    api: Api
    t0: float
    duration: float
    warmup: float
    key: str
    kind: str = "demo"  # LOADS
    stop: threading.Event = field(default_factory=threading.Event)
    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    bays: list[str] = field(default_factory=list)
    _queue: list[tuple[float, int, str, tuple[Any, ...]]] = field(default_factory=list)
    _seq: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] += n

    def error(self, what: str, detail: object) -> None:
        with self._lock:
            self.counts[f"{what} errors"] += 1
            if len(self.errors) < 30:
                self.errors.append(f"{time.monotonic() - self.t0:.0f}s {what}: {str(detail)[:200]}")

    def at(self, t: float, kind: str, *args: Any) -> None:
        if t < self.duration:
            self._seq += 1
            heapq.heappush(self._queue, (t, self._seq, kind, args))

    def prepare(self) -> None:
        """Log in, claim every pending device, read the bays; then schedule the first actions."""
        self.api.login()
        status, body = self.api.call("GET", "/api/v1/devices?status=pending")
        if status != 200:
            raise RuntimeError(f"device list: {status} {body}")
        for i, d in enumerate(body["data"]):
            claim: dict[str, Any] = {"name": f"soak {i + 1}"}
            if d.get("pin"):
                claim["pin"] = d["pin"]
            st, b = self.api.call("POST", f"/api/v1/devices/{d['device_id']}/claim", claim)
            if st != 200:
                raise RuntimeError(f"claim of {d['device_id']}: {st} {b}")
        self.devices = body["data"]
        status, body = self.api.call("GET", "/api/bays")
        self.bays = [b["bayId"] for b in body]
        if self.kind == "busy":
            for i, bay in enumerate(self.bays):
                self.at(5.0 + i * WASH_EVERY / len(self.bays) / 4, "wash", bay, 0)  # all bays within the warm-up
            self.at(20.0, "bulk", 0)
        if self.kind == "demo":
            self.at(self.warmup + 60.0, "restart")
        self.at(0.0, "probe")
        for i, d in enumerate(self.devices):  # spread over the first half of the warm-up
            self.at(10.0 + i * self.warmup / 2 / max(1, len(self.devices)), "upload", d["device_id"])
        self._threads.append(threading.Thread(target=self._dashboard, name="soak-dashboard", daemon=True))
        self._threads.append(threading.Thread(target=self._loop, name="soak-load", daemon=True))
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop scheduling; threads still reading a stream end when the demo closes it."""
        self.stop.set()

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)

    def _loop(self) -> None:
        while self._queue and not self.stop.is_set():
            t, _seq, kind, args = self._queue[0]
            if self.stop.wait(max(0.0, self.t0 + t - time.monotonic())):
                return
            heapq.heappop(self._queue)
            try:
                getattr(self, f"_do_{kind}")(t, *args)
            except Exception as exc:  # noqa: BLE001 - counted; the soak goes on
                self.error(kind, repr(exc))

    # Each action reschedules itself.

    def _do_wash(self, t: float, bay: str, n: int) -> None:
        course = COURSES[n % len(COURSES)]
        st, body = self.api.call("POST", "/api/wash/start",
                                 {"bayId": bay, "course": course, "requestId": f"soak-{uuid.uuid4().hex[:12]}"})
        if st == 200:
            self.count("washes started")
            if n % STOP_EVERY == 1:  # from the second wash on: the quick run sees cancellations too
                self.at(t + 10.0, "stop", bay)
        else:
            self.error("wash start", f"{bay} {st} {body}")
        self.at(t + WASH_EVERY, "wash", bay, n + 1)

    def _do_stop(self, t: float, bay: str) -> None:
        st, body = self.api.call("POST", "/api/wash/stop", {"bayId": bay})
        if st == 200:
            self.count("washes stopped")
        else:
            self.error("wash stop", f"{bay} {st} {body}")

    def _do_bulk(self, t: float, n: int) -> None:
        for kind, configs in (("CAR_WASH", CAR_WASH_CONFIGS), ("HELMET_DRYER", HELMET_CONFIGS)):
            ids = [d["device_id"] for d in self.devices if d.get("device_type") == kind]
            if not ids:
                continue
            st, body = self.api.call("POST", "/api/v1/devices/apply-config", {"device_ids": ids, "configs": configs})
            if st != 200:
                self.error("bulk", f"{kind} {st} {body}")
                continue
            self.count("bulk operations sent")
            setup = body["data"]["setup_id"]
            th = threading.Thread(target=self._follow, args=(setup,), name="soak-bulk-sse", daemon=True)
            th.start()
            th.join(120)  # the page follows each operation; one at a time keeps the load steady
        self.at(t + BULK_EVERY, "bulk", n + 1)

    def _do_restart(self, t: float) -> None:
        ids = [d["device_id"] for d in self.devices]
        st, body = self.api.call("POST", "/api/v1/devices/bulk-restart", {"device_ids": ids})
        if st == 200:
            self.count("bulk restarts sent")
            th = threading.Thread(target=self._follow, args=(body["data"]["setup_id"], "bulk restarts"),
                                  name="soak-restart-sse", daemon=True)
            th.start()
            th.join(120)
        else:
            self.error("restart", f"{st} {body}")
        self.at(t + RESTART_EVERY, "restart")

    def _follow(self, setup_id: str, what: str = "bulk operations") -> None:
        seen: set[str] = set()
        try:
            sse_events(self.api, f"/api/v1/devices/bulk-events/{setup_id}", self.stop, seen.add)
        except Exception as exc:  # noqa: BLE001
            self.error("bulk SSE", repr(exc))
            return
        if "complete" in seen:
            self.count(f"{what} complete")
        else:
            self.error("bulk SSE", f"{setup_id}: ended without complete ({sorted(seen)})")

    def _do_probe(self, t: float) -> None:
        for path in ("/api/health", "/api/bays"):
            st, body = self.api.call("GET", path, auth=False)
            if st == 200:
                self.count("probes ok")
            else:
                self.error("probe", f"{path} {st} {body}")
        self.at(t + PROBE_EVERY, "probe")

    def _do_upload(self, t: float, device_id: str) -> None:
        now = int(time.time() * 1000)
        # The items of sim.fleet.Fleet.upload_logs, from the device itself (same id, signed).
        items = [{"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": now + i, "total_amount": 20,
                  "bank": {"20": 1, "50": 0, "100": 0, "500": 0, "1000": 0},
                  "coin": {"1": 0, "2": 0, "5": 0, "10": 0}, "qr": {"chargeId": None, "net_amount": 0}}
                 for i in range(10)]
        raw = json.dumps({"device_id": device_id, "items": items}, separators=(",", ":")).encode()
        st, body = self.api.call("POST", "/api/v1/device-event-logs/uploads", raw, auth=False,
                                 headers={"x-signature": http_signature(raw, self.key)})
        if st in (200, 201):
            self.count("extra log uploads")
        else:
            self.error("upload", f"{st} {body}")

    def _dashboard(self) -> None:
        """The technician page's live view, reconnecting like an EventSource (retry: 2000)."""
        while not self.stop.is_set():
            try:
                sse_events(self.api, "/api/wash/events", self.stop, lambda _e: self.count("dashboard SSE events"))
            except Exception as exc:  # noqa: BLE001
                if self.stop.is_set():
                    return
                self.error("dashboard SSE", repr(exc))
            if not self.stop.is_set():  # the stream ended under a running site
                self.count("dashboard SSE reconnects")
            self.stop.wait(2.0)


# --- sampling ---------------------------------------------------------------------------------


@dataclass
class Watched:
    """One process role; follows a replaced gunicorn worker, keeping its I/O counters cumulative
    (a reaped worker's counters are added to its parent's by the kernel, so the arbiter's include
    them: the total stays right either way)."""

    role: str
    proc: psutil.Process
    pids: list[int] = field(default_factory=list)
    io_base: tuple[int, int] = (0, 0)
    last_io: tuple[int, int] = (0, 0)
    cpu_base: float = 0.0
    last_cpu: float = 0.0

    def replace(self, proc: psutil.Process) -> None:
        self.io_base = (self.io_base[0] + self.last_io[0], self.io_base[1] + self.last_io[1])
        self.cpu_base += self.last_cpu
        self.proc = proc
        self.pids.append(proc.pid)

    def sample(self) -> dict[str, Any]:
        """One sample; raises psutil.NoSuchProcess if the process is gone."""
        p = self.proc
        with p.oneshot():
            mem = p.memory_full_info()
            io = p.io_counters()
            cpu = p.cpu_times()
            out: dict[str, Any] = {"rss_mb": mem.rss / MB, "pss_mb": mem.pss / MB, "fds": p.num_fds(),
                                   "threads": p.num_threads()}
        out["fd_kinds"] = fd_kinds(p.pid)
        self.last_io = (io.write_bytes, io.write_chars)
        self.last_cpu = cpu.user + cpu.system
        out["write_bytes"] = self.io_base[0] + io.write_bytes
        out["wchar"] = self.io_base[1] + io.write_chars
        out["cpu_s"] = self.cpu_base + self.last_cpu
        return out


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds of a process by kind (database files, sockets, pipes, other files, anon inodes),
    so that a growing count says what leaks; each SQLite connection holds the db and the WAL."""
    kinds: Counter[str] = Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(("socket:", "pipe:", "anon_inode:")):
            kinds[target.split(":", 1)[0]] += 1
        elif re.search(r"\.db(-wal|-shm)?$", target):
            kinds["db"] += 1
        else:
            kinds["file"] += 1
    return dict(kinds)


def find_gateway(demo: psutil.Process, timeout: float = 30.0) -> tuple[psutil.Process, psutil.Process]:
    """The core and the gunicorn arbiter among the demo's children (`carwash-gateway web` execs
    gunicorn, keeping its pid)."""
    deadline = time.monotonic() + timeout
    while True:
        core = arbiter = None
        for c in demo.children():
            try:
                cmd = c.cmdline()
            except psutil.Error:
                continue
            if "gateway" in cmd and "core" in cmd:
                core = c
            elif any("gunicorn" in part for part in cmd):
                arbiter = c
        if core and arbiter:
            return core, arbiter
        if time.monotonic() > deadline:
            raise RuntimeError(f"core or web not found among the demo's children: {demo.children()}")
        time.sleep(0.2)


def the_worker(arbiter: psutil.Process, timeout: float = 15.0) -> psutil.Process:
    """The arbiter's one worker; waits while gunicorn replaces it (none or two for a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        workers = arbiter.children()
        if len(workers) == 1:
            return workers[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected one gunicorn worker, found {len(workers)}")
        time.sleep(0.2)


def file_mb(path: Path) -> float:
    try:
        return path.stat().st_size / MB
    except FileNotFoundError:
        return 0.0


def table_rows(db: Path) -> dict[str, int]:
    """Row count of every table, from a read-only connection opened and closed at once (a
    lasting reader would hold back the WAL checkpoints the soak is watching)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                           "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {n: int(con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0]) for n in names}
    finally:
        con.close()


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path`."""
    best, kind = "", "?"
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint
        if str(path).startswith(mp.rstrip("/") + "/") or str(path) == mp:
            if len(mp) > len(best):
                best, kind = mp, part.fstype
    return kind


class WalWatch:
    """Reads the frames appended to the database's WAL, on a thread, every `every` s: how many
    frames (pages written) and commits, by the table or index owning each page (dbstat). After a
    checkpoint SQLite restarts the WAL with new salts; frames of the old generation written after
    the last read are missed, so a short period keeps the undercount small. A frame of a rolled
    back transaction that is overwritten later counts twice (rare)."""

    HEADER, FRAME_HEADER = 32, 24

    def __init__(self, db: Path, every: float = 1.0, new_page_lookup: float = 1.0) -> None:
        """`new_page_lookup`: the least time between two dbstat reads for pages not seen yet
        (0 when polled between transactions, as bench/upload_writes.py does)."""
        self.db, self.wal, self.every = db, db.with_name(db.name + "-wal"), every
        self.new_page_lookup = new_page_lookup
        self.frames: Counter[str] = Counter()
        self.commits = 0
        self.generations = 0
        self._salt: tuple[int, int] | None = None
        self._next = 0  # next frame index of the current generation
        self._names: dict[int, str] = {}
        self._names_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-wal", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self.frames), self.commits

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.poll()
            except (OSError, sqlite3.Error, struct.error):
                pass  # the demo is stopping or a frame is half written: read again next time

    def _name(self, page: int) -> str:
        # Pages move between tables as they are freed and reused: refresh the map now and then,
        # and for an unknown page (new), at most every `new_page_lookup` s (it may be of a transaction
        # still open).
        age = time.monotonic() - self._names_at
        if age > 30 or (page not in self._names and age >= self.new_page_lookup):
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
            try:
                self._names = {int(p): str(n) for p, n in con.execute("SELECT pageno, name FROM dbstat")}
            finally:
                con.close()
            self._names_at = time.monotonic()
        name = self._names.get(page, "(free or new page)")
        return "(db header, page 1)" if page == 1 else name

    def poll(self) -> None:
        with self.wal.open("rb") as f:
            head = f.read(self.HEADER)
            if len(head) < self.HEADER:
                return
            _magic, _version, page_size, _ckpt, s1, s2 = struct.unpack(">6I", head[:24])
            if (s1, s2) != self._salt:
                self._salt, self._next = (s1, s2), 0
                self.generations += 1
            size = self.FRAME_HEADER + page_size
            f.seek(self.HEADER + self._next * size)
            while True:
                fh = f.read(self.FRAME_HEADER)
                if len(fh) < self.FRAME_HEADER:
                    return
                page, db_pages, f1, f2 = struct.unpack(">4I", fh[:16])
                if (f1, f2) != self._salt or len(f.read(page_size)) < page_size:
                    return  # the end of this generation's frames (or one being written)
                name = self._name(page)
                with self._lock:
                    self.frames[name] += 1
                    self.commits += db_pages != 0  # a commit frame carries the database size
                self._next += 1


# --- the run ----------------------------------------------------------------------------------


def load_kind() -> str:
    kind = os.environ.get(ENV_LOAD, "demo")
    if kind not in LOADS:
        raise RuntimeError(f"{ENV_LOAD} must be one of {', '.join(LOADS)}, not {kind!r}")
    return kind


def duration_for(quick: bool) -> float:
    env = os.environ.get(ENV_SECONDS)
    if env:
        return max(30.0, float(env))
    return QUICK_SECONDS if quick else FULL_SECONDS


def _print_header() -> None:
    log(f"{NAME}:     t |  core RSS   PSS  fds thr | web RSS   PSS | wrk fds thr |  WAL MB   DB MB |"
        f" core wr KB  web wr KB | load")


def _print_row(s: dict[str, Any], counts: Counter[str]) -> None:
    c, a, w = s["core"], s["arbiter"], s["worker"]
    log(f"{NAME}: {s['t']:5.0f} | {c['rss_mb']:8.1f} {c['pss_mb']:5.1f} {c['fds']:4d} {c['threads']:3d} |"
        f" {a['rss_mb'] + w['rss_mb']:7.1f} {a['pss_mb'] + w['pss_mb']:5.1f} | {w['fds']:7d} {w['threads']:3d} |"
        f" {s['wal_mb']:7.2f} {s['db_mb']:7.2f} | {c['write_bytes'] / 1024:10.0f} "
        f"{(a['write_bytes'] + w['write_bytes']) / 1024:10.0f} | washes {counts['washes started']}, "
        f"bulk {counts['bulk operations complete']}/{counts['bulk operations sent']}, "
        f"restarts {counts['bulk restarts complete']}/{counts['bulk restarts sent']}")


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the soak runs, SIGTERM raises KeyboardInterrupt in the main thread, so that a soak
    stopped from outside (an hour is long) still stops the demo and removes its directory in the
    `finally` blocks; the default action would kill this process and orphan the demo."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(quick: bool) -> list[Result]:
    """Run the soak (see the module's docstring); raises RuntimeError if the site fails."""
    with _sigterm_interrupts():
        return _run(quick)


def _run(quick: bool) -> list[Result]:
    kind = load_kind()
    duration = duration_for(quick)
    interval = max(1.0, min(10.0 if quick else 30.0, duration / 30))
    warmup = duration * WARMUP_SHARE
    samples: list[dict[str, Any]] = []
    rows: dict[str, dict[str, int]] = {}
    with temp_dir("carwash-soak-") as tmp:
        data = tmp / "site"
        fs = fs_type(tmp)
        if fs in ("tmpfs", "ramfs"):
            log(f"{NAME}: WARNING {tmp} is on {fs}: write_bytes will read 0; set TMPDIR to a disk")
        demo = psutil.Popen(gateway_command("demo", "--data-dir", str(data), *DEMO_ARGS[kind]), env=child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert demo.stdout is not None
        out = DemoOutput(demo.stdout)
        family: dict[int, psutil.Process] = {}  # every descendant seen, to stop leftovers by pid
        leftovers: list[str] = []
        load: Load | None = None
        wal: WalWatch | None = None
        demo_rc: int | None = None
        try:
            if not out.ready.wait(READY_TIMEOUT * 3) or demo.poll() is not None:
                raise RuntimeError(f"demo did not start (exit code {demo.poll()}):\n" + "\n".join(out.tail))
            header = "\n".join(out.header)
            web = re.search(r"^web: (http://127\.0\.0\.1:\d+)/$", header, re.M)
            if not web:
                raise RuntimeError(f"no web URL in the demo's output:\n{header}")
            core_p, arbiter_p = find_gateway(demo)
            family.update((p.pid, p) for p in demo.children(recursive=True))
            watched = {"core": Watched("core", core_p, [core_p.pid]),
                       "arbiter": Watched("arbiter", arbiter_p, [arbiter_p.pid])}
            worker_p = the_worker(arbiter_p)
            watched["worker"] = Watched("worker", worker_p, [worker_p.pid])
            db = data / "gateway.db"
            wal = WalWatch(db)
            wal.start()
            t0 = time.monotonic()
            load = Load(Api(web.group(1)), t0, duration, warmup, spec_test_key(), kind=kind)
            load.prepare()
            log(f"{NAME}: demo up (core {core_p.pid}, web {arbiter_p.pid}/{worker_p.pid}), {len(load.devices)} "
                f"devices claimed, {len(load.bays)} bays; load {load.kind}; {duration:.0f} s, warm-up {warmup:.0f} s, "
                f"a sample every {interval:g} s; data on {fs}")
            _print_header()
            k = 0
            while True:
                for p in demo.children(recursive=True):
                    family.setdefault(p.pid, p)
                if demo.poll() is not None:
                    raise RuntimeError(f"the demo exited with {demo.returncode} at {time.monotonic() - t0:.0f} s:\n"
                                       + "\n".join(out.tail))
                for role in ("core", "arbiter"):
                    if not watched[role].proc.is_running():
                        raise RuntimeError(f"the {role} died at {time.monotonic() - t0:.0f} s:\n" + "\n".join(out.tail))
                w = the_worker(arbiter_p)
                if w.pid != watched["worker"].proc.pid:
                    log(f"{NAME}: the gunicorn worker was replaced ({watched['worker'].proc.pid} -> {w.pid})")
                    watched["worker"].replace(w)
                s: dict[str, Any] = {"t": round(time.monotonic() - t0, 2)}
                for role, wp in watched.items():
                    s[role] = wp.sample()
                s["wal_mb"], s["db_mb"] = file_mb(db.with_name(db.name + "-wal")), file_mb(db)
                s["log_bytes"] = out.snapshot()
                s["wal_frames"], s["wal_commits"] = wal.snapshot()
                samples.append(s)
                _print_row(s, load.counts)
                if not rows and s["t"] >= warmup:
                    rows["warm-up end"] = table_rows(db)
                k += 1
                if s["t"] >= duration:
                    break
                time.sleep(max(0.0, t0 + min(k * interval, duration) - time.monotonic()))
            rows["end"] = table_rows(db)
            pids = {role: wp.pids for role, wp in watched.items()}
        finally:
            if load is not None:
                load.close()
            if wal is not None:
                wal.stop()
            demo_rc = stop_process(demo, timeout=90)  # SIGTERM: the demo stops its children in order
            leftovers = _stop_leftovers(list(family.values()))
            if load is not None:
                load.join(10)
            out.join(10)
            demo.stdout.close()
    return _results(samples, warmup, load, out, rows, pids, demo_rc, fs, interval, leftovers)


def _alive(p: psutil.Process) -> bool:
    """Running and not a zombie (an orphan whose parent exited before reaping it stays a zombie
    until pid 1 reaps it: gone for every purpose here)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # is_running checks the start time too
    except psutil.Error:
        return False


def _stop_leftovers(family: list[psutil.Process]) -> list[str]:
    """SIGKILL, by pid, whatever the demo left running after 5 s of grace; returns what it was."""
    alive = [p for p in family if _alive(p)]
    if alive:
        _gone, alive = psutil.wait_procs(alive, timeout=5)
    out = []
    for p in alive:
        if not _alive(p):
            continue
        try:
            out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
        except psutil.Error:
            pass
    for line in out:
        log(f"{NAME}: killed a process the demo left running: {line}")
    return out


def _slope_per_h(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope, per hour (robust to a single high or low sample, unlike end points)."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    den = sum((t - mt) ** 2 for t in ts)
    return 0.0 if den == 0 else sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den * 3600


def _results(samples: list[dict[str, Any]], warmup: float, load: Load | None, out: DemoOutput,
             rows: dict[str, dict[str, int]], pids: dict[str, list[int]], demo_rc: int | None, fs: str,
             interval: float, leftovers: list[str]) -> list[Result]:
    assert load is not None
    steady = [s for s in samples if s["t"] >= warmup]
    warm = [s for s in samples if s["t"] < warmup] or samples[:1]
    if len(steady) < 2:
        raise RuntimeError("too few samples after the warm-up")
    first, last = steady[0], steady[-1]
    hours = (last["t"] - first["t"]) / 3600
    span = f"{first['t']:.0f}-{last['t']:.0f} s"

    def web(s: dict[str, Any], key: str) -> float:
        return float(s["arbiter"][key] + s["worker"][key])

    def val(s: dict[str, Any], who: str, key: str) -> float:
        return web(s, key) if who == "web" else float(s[who][key])

    res: list[Result] = []
    extra_series = {"interval_s": interval, "warmup_s": warmup, "pids": pids, "series": samples}
    for who, label in (("core", "core"), ("web", "web arbiter+worker")):
        for key, kind in (("rss_mb", "RSS"), ("pss_mb", "PSS")):
            w3 = [val(s, who, key) for s in warm[-3:]]
            e3 = [val(s, who, key) for s in samples[-3:]]
            growth = (median(e3) - median(w3)) / median(w3) * 100
            slope = _slope_per_h([s["t"] for s in steady], [val(s, who, key) for s in steady])
            if kind == "RSS":
                res.append(Result(NAME, f"{label} {kind} at end of warm-up", "MB", w3,
                                  notes=f"last 3 samples before {warmup:.0f} s",
                                  extra=extra_series if not res else {}))
                res.append(Result(NAME, f"{label} {kind} at end", "MB", e3, notes="last 3 samples"))
            res.append(Result(NAME, f"{label} {kind} growth after warm-up", "%", [growth],
                              notes=f"goal < {GOAL_GROWTH_PCT:g} %; slope {slope:+.2f} MB/h over {span}; "
                                    f"max {max(val(s, who, key) for s in samples):.1f} MB"))
    # Disk writes at steady state.
    total = 0.0
    for who in ("core", "arbiter", "worker"):
        wb = (last[who]["write_bytes"] - first[who]["write_bytes"]) / hours / MB
        wc = (last[who]["wchar"] - first[who]["wchar"]) / hours / MB
        cpu = (last[who]["cpu_s"] - first[who]["cpu_s"]) / (hours * 3600) * 100
        total += wb
        res.append(Result(NAME, f"{who} disk writes at steady state", "MB/h", [wb],
                          notes=f"/proc/pid/io write_bytes over {span}; wchar {wc:.2f} MB/h (all write(2): "
                                f"sockets, pipes); CPU {cpu:.1f} %"))
    res.append(Result(NAME, "core+web disk writes at steady state", "MB/h", [total],
                      notes=(f"goal <= {GOAL_WRITES_MB_H:g} MB/h" if load.kind == "demo"
                             else f"load {load.kind} (the goal of <= {GOAL_WRITES_MB_H:g} MB/h is for load demo)")
                            + f"; data dir on {fs}"))
    # Files and database.
    res.append(Result(NAME, "max WAL size", "MB", [max(s["wal_mb"] for s in samples)],
                      notes=f"at end {samples[-1]['wal_mb']:.2f} MB; main DB {samples[0]['db_mb']:.2f} -> "
                            f"{samples[-1]['db_mb']:.2f} MB (start -> end)"))
    commits = (last["wal_commits"] - first["wal_commits"]) / hours
    by_table = {t: (n - first["wal_frames"].get(t, 0)) / hours for t, n in last["wal_frames"].items()}
    by_table = {t: v for t, v in sorted(by_table.items(), key=lambda kv: -kv[1]) if v > 0}
    frames = sum(by_table.values())
    res.append(Result(NAME, "database commits at steady state", "commits/h", [commits],
                      notes=f"{frames:,.0f} WAL frames/h ({frames / max(commits, 1):.1f} pages a commit), by table: "
                            + ", ".join(f"{t} {v:,.0f}" for t, v in list(by_table.items())[:8]),
                      extra={"wal_frames_per_h_by_table": by_table}))
    db_rate = (last["db_mb"] - first["db_mb"]) / hours
    grown = {t: rows["end"][t] - rows["warm-up end"].get(t, 0) for t in rows.get("end", {})
             if rows.get("warm-up end") and rows["end"][t] != rows["warm-up end"].get(t, 0)}
    res.append(Result(NAME, "main DB growth at steady state", "MB/h", [db_rate],
                      notes="rows added after warm-up: " + ", ".join(f"{t} {n:+d}" for t, n in sorted(grown.items())),
                      extra={"rows": rows}))
    for who in ("core", "arbiter", "worker"):
        for key, what in (("fds", "open fds"), ("threads", "threads")):
            a, wu, b = samples[0][who][key], warm[-1][who][key], samples[-1][who][key]
            mx = max(s[who][key] for s in samples)
            kinds = ""
            if key == "fds":
                k0, k1 = samples[0][who].get("fd_kinds", {}), samples[-1][who].get("fd_kinds", {})
                kinds = "; by kind start -> end: " + ", ".join(f"{k} {k0.get(k, 0)}->{k1.get(k, 0)}"
                                                              for k in sorted(set(k0) | set(k1)))
            res.append(Result(NAME, f"{who} {what} (end - start)", "count", [b - a],
                              notes=f"start {a}, end of warm-up {wu}, end {b}, max {mx}{kinds}"))
    # Log volume (journald in production).
    for who in ("core", "web"):
        lb = (last["log_bytes"].get(who, 0) - first["log_bytes"].get(who, 0)) / hours / 1024
        lv = ", ".join(f"{k.split()[1]} {n}" for k, n in sorted(out.levels.items()) if k.startswith(who + " "))
        res.append(Result(NAME, f"{who} log output at steady state", "KB/h", [lb],
                          notes=f"lines by level over the run: {lv or 'none'}"))
    c = load.counts
    res.append(Result(NAME, "load: washes started", "count", [float(c["washes started"])],
                      notes=f"every {WASH_EVERY:g} s per bay on {len(load.bays)} bays; {c['washes stopped']} stopped; "
                            f"{c['wash start errors']} refused",
                      extra={"counts": dict(c), "errors": load.errors, "log_problems": out.problems,
                             "demo_exit_code": demo_rc, "leftover_processes": leftovers}))
    n_errors = sum(v for k, v in c.items() if k.endswith("errors"))
    res.append(Result(NAME, "load: bulk APPLY_CONFIG complete", "count", [float(c["bulk operations complete"])],
                      notes=f"of {c['bulk operations sent']} sent (one per device type every {BULK_EVERY:g} s, "
                            f"{len(load.devices)} devices); dashboard SSE {c['dashboard SSE events']} events, "
                            f"{c['dashboard SSE reconnects']} reconnects; bulk restarts "
                            f"{c['bulk restarts complete']}/{c['bulk restarts sent']}; {n_errors} errors in all; "
                            f"demo exit code {demo_rc}; {len(leftovers)} processes left running"))
    for line in load.errors[:10]:
        log(f"{NAME}: load error: {line}")
    for line in out.problems[:10]:
        log(f"{NAME}: logged: {line}")
    return res


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
