"""Shared helpers of the benchmarks: statistics over samples, the result record, the table and
the JSON file, and small process/temp-dir utilities.

Every figure a benchmark returns is a `Result` built from samples measured in the current run;
`median` and `p99` are computed here from those samples (nothing is ever hard-coded).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the checkout
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "results.json"


# --- statistics -----------------------------------------------------------------------------


def median(samples: Sequence[float]) -> float:
    return percentile(samples, 50.0)


def p99(samples: Sequence[float]) -> float:
    return percentile(samples, 99.0)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default "linear" method).

    With few samples p99 is close to the maximum: it is the tail of *this* run's samples, not a
    population estimate."""
    if not samples:
        raise ValueError("no samples")
    xs = sorted(float(x) for x in samples)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --- results --------------------------------------------------------------------------------


@dataclass
class Result:
    benchmark: str
    metric: str
    unit: str
    samples: list[float]
    notes: str = ""
    median: float | None = None  # computed from samples unless given (derived figures)
    p99: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples:
            if self.median is None:
                self.median = median(self.samples)
            if self.p99 is None and len(self.samples) > 1:
                self.p99 = p99(self.samples)
            elif self.p99 is None:
                self.p99 = self.samples[0]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n"] = len(self.samples)
        if self.samples:
            d["min"] = min(self.samples)
            d["max"] = max(self.samples)
        return d


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.3f}".rstrip("0").rstrip(".") if ax < 10 else f"{x:.2f}"
    return f"{x:.3f}"


def table(results: Sequence[Result]) -> str:
    header = ("benchmark", "metric", "median", "p99", "unit", "notes")
    rows = [(r.benchmark, r.metric, fmt(r.median), fmt(r.p99), r.unit, r.notes) for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {2, 3}  # numbers right-aligned

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            if i == len(cells) - 1:
                out.append(c)  # notes: no padding
            else:
                out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return " | ".join(out).rstrip()

    sep = "-+-".join("-" * w for w in widths[:-1]) + "-+-" + "-" * min(widths[-1], 40)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def environment() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        from importlib import metadata

        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    mosq = None
    try:
        out = subprocess.run(["/usr/sbin/mosquitto", "-h"], capture_output=True, text=True, timeout=5)
        first = (out.stdout or out.stderr).splitlines()
        mosq = first[0].strip() if first else None
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "packages": {d: version(d) for d in ("amqtt", "paho-mqtt", "gunicorn", "Flask", "psutil")},
        "mosquitto": mosq,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --- process helpers ------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@contextmanager
def temp_dir(prefix: str = "carwash-bench-") -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_port(host: str, port: int, timeout: float) -> None:
    """Until a TCP connect to host:port succeeds; TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not accepting connections within {timeout:g} s") from None
            time.sleep(0.05)


WEB_CONNECTED = "STATUS=serving; connected to the local broker"


def start_notified(cmd: list[str], tmp: Path, name: str, *, wait_connected: bool = False,
                   env_extra: dict[str, str] | None = None) -> tuple[Any, Any]:
    """Start a gateway process with its own NOTIFY_SOCKET and log file in `tmp`; returns
    `(psutil.Popen, NotifySocket)` once it said READY=1 (and, for the web, joined the broker)."""
    import psutil

    from sim.procs import NotifySocket, child_env

    notify = NotifySocket(tmp / f"{name}.notify")
    with (tmp / f"{name}.log").open("wb") as out:
        proc = psutil.Popen(cmd, env=child_env(notify, **(env_extra or {})), stdout=out, stderr=out)
    notify.wait_for("READY=1", 30)
    if wait_connected:
        notify.wait_for(WEB_CONNECTED, 30)
    return proc, notify


def readline(proc: Any, timeout: float) -> str:
    """One line of a child's stdout (a pipe), or TimeoutError."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"no output within {timeout:g} s")
    return proc.stdout.readline().decode()  # type: ignore[no-any-return]


def http_json(url: str, body: Any = None, headers: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """POST `body` as JSON (GET without one) and return the JSON answer; HTTP errors raise."""
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class DemoSite:
    """A demo-like site's core and web, started in `tmp` (see `start_site`); `stop()` ends both."""

    tmp: Path
    config: Path
    web_port: int
    mqtt_port: int
    key: str  # the spec's device signing key (the demo signs with it)
    core: Any
    web: Any
    core_notify: Any
    web_notify: Any
    auth: dict[str, str]  # the demo technician's Bearer header

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def database(self) -> Path:
        return self.tmp / "site" / "gateway.db"

    def stop(self) -> None:
        from sim.procs import stop_process

        stop_process(self.web)
        stop_process(self.core)
        self.web_notify.close()
        self.core_notify.close()


def start_site(tmp: Path, extra_toml: str = "") -> DemoSite:
    """Write a demo site under `tmp/site`, start its core and web (each ready, the web on the
    broker) and log the demo technician in."""
    from sim.demo import ensure_demo_user, free_port, write_demo_site
    from sim.procs import gateway_command

    web_port, mqtt_port = free_port(), free_port()
    cfg = write_demo_site(tmp / "site", web_port=web_port, mqtt_port=mqtt_port, extra_toml=extra_toml)
    key = json.loads((ROOT / "gateway" / "data" / "spec-vectors.json").read_text())["secret_key"]
    core, cn = start_notified(gateway_command("core", "--config", str(cfg)), tmp, "core")
    web, wn = start_notified(gateway_command("web", "--config", str(cfg)), tmp, "web", wait_connected=True)
    ensure_demo_user(cfg)
    token = http_json(f"http://127.0.0.1:{web_port}/api/v1/auth/login",
                      {"username": "demo", "password": "demo"})["data"]["token"]
    return DemoSite(tmp, cfg, web_port, mqtt_port, key, core, web, cn, wn, {"Authorization": "Bearer " + token})
