"""Test harness: leak checks, async test runner, and fixtures for real gateway processes.

- Every test fails if it leaves threads, child processes or asyncio tasks behind.
- `async def` tests run in a fresh event loop (no plugin needed); tasks still pending when the
  test coroutine returns are a failure.
- Tiers: tests/unit runs in-process (fakes at existing seams); every other test is marked `slow`
  here (real processes); the longest files are collected first (see LONGEST_FIRST).
- `site` writes a config + secrets in a temporary directory with free ports; `core` and `web`
  start the real processes and wait for their READY=1 on a NOTIFY_SOCKET.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import random
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from gateway.config import Config, Secrets, load_config, load_secrets
from sim.demo import free_port, write_demo_site
from sim.procs import NotifySocket, child_env, gateway_command, stop_process

REPO = Path(__file__).resolve().parent.parent
SHARED_SPEC = REPO.parent / "shared" / "spec"
LEAK_GRACE_SEC = 5.0


# --- tiers and order -------------------------------------------------------------------------

UNIT_DIR = REPO / "tests" / "unit"
# The files that took longest in a whole run (--durations, 2 workers, 2026-12-07), longest first.
# `./dev test` hands whole files to the two workers in collection order (--no-loadscope-reorder;
# xdist's default starts with the files of most tests, which left a 10-minute one-test file for
# the end, on one worker while the other idled). A file missing here just runs after these.
LONGEST_FIRST = ("test_package.py", "test_wash_e2e.py", "test_device_api.py", "test_powercut.py",
                 "test_uplink_e2e.py", "test_technician_page.py", "test_fuzz_api.py", "test_ops_cli.py",
                 "test_processes.py", "test_mqtt_accounts_e2e.py", "test_site_access.py", "test_fieldbus_e2e.py",
                 "test_commands_e2e.py", "test_pages.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test outside tests/unit is `slow` (the tier of real processes, ptys and outside
    brokers: `-m "not slow"` is the unit tier). Order: the longest files first, then the other
    slow ones, then tests/unit, whose short files fill in at the end. The sort is stable: tests
    keep their order within a file."""

    def rank(item: pytest.Item) -> tuple[int, int]:
        path = Path(str(item.path))
        if UNIT_DIR in path.parents:
            return (2, 0)
        if path.name in LONGEST_FIRST:
            return (0, LONGEST_FIRST.index(path.name))
        return (1, 0)

    for item in items:
        if UNIT_DIR not in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.slow)
    items.sort(key=rank)


# --- leak checks ----------------------------------------------------------------------------


def pytest_collection_finish(session: pytest.Session) -> None:
    # What exists once the tests are collected (modules, libraries, test functions) lives for the
    # whole session: out of the collector's way, so the full collection after each test
    # (`no_leaks`) walks only what tests created.
    gc.freeze()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    threads_before = set(threading.enumerate())
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    yield
    leaked_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    for t in leaked_threads:
        t.join(LEAK_GRACE_SEC / max(1, len(leaked_threads)))
    still = [t.name for t in leaked_threads if t.is_alive()]
    children = [p for p in me.children(recursive=True) if p.pid not in children_before]
    gone, alive = psutil.wait_procs(children, timeout=LEAK_GRACE_SEC if children else 0)
    # A socket or file the test dropped unclosed warns (ResourceWarning, an error here) when it is
    # collected: collect now, so the warning fails the test that leaked it, not a later one.
    gc.collect()
    assert not still, f"test leaked threads: {still}"
    assert not alive, f"test leaked child processes: {[(p.pid, p.name()) for p in alive]}"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    funcargs = pyfuncitem.funcargs
    kwargs = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}

    async def runner() -> None:
        await pyfuncitem.obj(**kwargs)
        current = asyncio.current_task()
        leaked = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        for t in leaked:
            t.cancel()
        if leaked:
            await asyncio.gather(*leaked, return_exceptions=True)
        assert not leaked, f"test leaked asyncio tasks: {[t.get_name() + ' ' + repr(t.get_coro()) for t in leaked]}"

    asyncio.run(runner())
    return True


# --- a site on disk ---------------------------------------------------------------------------


@dataclass
class Site:
    dir: Path
    config_path: Path
    web_port: int
    mqtt_port: int

    @property
    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def secrets(self) -> Secrets:
        return load_secrets(self.config)

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"


# Listening ports for sites are drawn below the kernel's ephemeral range: a port from bind(0) is
# one that any outgoing connection (a paho client, an HTTP request, another engineer's suite on the
# same machine) may be given before the core or gunicorn binds it ("address already in use").
LISTEN_PORTS = range(20000, 32768)


def listen_port() -> int:
    """A free port for a server the test starts later, outside the ephemeral range when possible."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = LISTEN_PORTS.stop
    candidates = range(LISTEN_PORTS.start, min(LISTEN_PORTS.stop, low))
    for _ in range(50):
        port = random.choice(candidates) if candidates else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    return free_port()


def make_site(tmp: Path, extra_toml: str = "") -> Site:
    web_port, mqtt_port = listen_port(), listen_port()
    cfg = write_demo_site(tmp, web_port=web_port, mqtt_port=mqtt_port, extra_toml=extra_toml)
    return Site(tmp, cfg, web_port, mqtt_port)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "site")


# --- real processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    notify: NotifySocket
    log_path: Path

    def stop(self, timeout: float = 10.0) -> int:
        rc = stop_process(self.popen, timeout)
        self.notify.close()
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_process(site: Site, name: str, *, env: dict[str, str] | None = None, ready_timeout: float = 30.0,
                  preexec_fn: Callable[[], None] | None = None) -> Proc:
    notify = NotifySocket(site.dir / f"{name}.notify")
    log_path = site.dir / f"{name}.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            gateway_command(name, "--config", str(site.config_path)),
            env=child_env(notify, **(env or {})),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    proc = Proc(popen, notify, log_path)
    try:
        notify.wait_for("READY=1", ready_timeout)
    except TimeoutError:
        rc = proc.stop()
        raise AssertionError(f"{name} not ready: rc={rc}\n{proc.log()[-3000:]}") from None
    return proc


@pytest.fixture
def core(site: Site) -> Iterator[Proc]:
    proc = start_process(site, "core")
    yield proc
    rc = proc.stop()
    assert rc == 0, f"core exited with {rc}:\n{proc.log()[-3000:]}"


@pytest.fixture
def web(site: Site, core: Proc) -> Iterator[Proc]:
    proc = start_process(site, "web")
    yield proc
    proc.stop()


def start_demo(data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """`carwash-gateway demo --data-dir DIR` and what it printed up to "Press Ctrl-C" (the demo is
    then running; the caller stops it and closes its stdout). Its logs, and those of the core and
    web it starts, go to `DIR.log`: a pipe nobody reads would block them once full."""
    with open(f"{data_dir}.log", "ab") as log:
        proc = subprocess.Popen(gateway_command("demo", "--data-dir", str(data_dir)), env=child_env(),
                                stdout=subprocess.PIPE, stderr=log, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # ends when the demo prints its last line or dies
        lines.append(line.rstrip("\n"))
        if line.startswith("Press Ctrl-C"):
            break
    return proc, "\n".join(lines)
