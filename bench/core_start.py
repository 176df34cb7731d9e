"""Core start → READY=1: from Popen of the real core process to the arrival of its READY=1
datagram on our NOTIFY_SOCKET.

Two metrics:
- `fresh database`: every start gets a new temporary data directory, so the core creates the
  SQLite database and runs every migration before it says READY=1;
- `migrated database`: one data directory is migrated by a first (unmeasured) start, then the
  core is started again and again on it.

Each start is stopped with SIGTERM (stop_process) before the next one; a non-zero exit is an
error. The core's output goes to a log file in its data directory (shown on failure).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.common import Result, log, tail, temp_dir
from sim.demo import free_port, write_demo_site
from sim.procs import NotifySocket, child_env, gateway_command, stop_process

NAME = "core_start"
READY_TIMEOUT = 30.0


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    ready_s: float  # Popen → READY=1
    config: Path
    mqtt_port: int
    log: Path


def wait_ready(notify: NotifySocket, proc: subprocess.Popen[bytes], line: str, timeout: float) -> float:
    """notify.wait_for(line), but give up as soon as `proc` exits. Returns the arrival time (the
    datagram's, recorded when received: waiting in slices does not change it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return notify.wait_for(line, min(0.2, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            if proc.poll() is not None:
                raise TimeoutError(f"process exited with {proc.returncode} before {line!r}") from None
            if time.monotonic() >= deadline:
                raise


@contextmanager
def run_core(data_dir: Path, *, config: Path | None = None, mqtt_port: int | None = None,
             tag: str = "core") -> Iterator[Started]:
    """Start the core on `data_dir` (writing a demo site there unless `config` is given), wait
    for READY=1, yield, then SIGTERM it. Raises RuntimeError if it dies or is not ready in time."""
    if config is None:
        mqtt_port = free_port()
        config = write_demo_site(data_dir, web_port=free_port(), mqtt_port=mqtt_port)
    assert mqtt_port is not None
    logfile = data_dir / f"{tag}.log"
    with NotifySocket(data_dir / f"{tag}.notify") as notify, logfile.open("ab") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(gateway_command("core", "--config", str(config)), env=child_env(notify),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                t_ready = wait_ready(notify, proc, "READY=1", READY_TIMEOUT)
            except TimeoutError as exc:
                raise RuntimeError(f"core not ready (exit code {proc.poll()}): {exc}\n{tail(logfile)}") from None
            yield Started(proc, t_ready - t0, config, mqtt_port, logfile)
        finally:
            code = stop_process(proc)
        if code != 0:
            raise RuntimeError(f"core exited with {code} on SIGTERM\n{tail(logfile)}")


def run(quick: bool) -> list[Result]:
    n = 3 if quick else 10
    fresh: list[float] = []
    for i in range(n):
        with temp_dir() as d, run_core(d) as core:
            fresh.append(core.ready_s)
        log(f"{NAME}: fresh database {i + 1}/{n}: {core.ready_s * 1000:.0f} ms")

    migrated: list[float] = []
    with temp_dir() as d:
        with run_core(d, tag="core-migrate") as first:  # creates and migrates; not measured
            config, port = first.config, first.mqtt_port
        for i in range(n):
            with run_core(d, config=config, mqtt_port=port, tag=f"core-{i}") as core:
                migrated.append(core.ready_s)
            log(f"{NAME}: migrated database {i + 1}/{n}: {core.ready_s * 1000:.0f} ms")

    how = "Popen → READY=1 on NOTIFY_SOCKET"
    return [
        Result(NAME, "READY=1, fresh database", "s", fresh,
               f"n={n}; {how}; new data dir per start (create + migrate DB)"),
        Result(NAME, "READY=1, migrated database", "s", migrated,
               f"n={n}; {how}; same data dir, DB already migrated"),
    ]
