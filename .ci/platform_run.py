#!/usr/bin/env python3
"""Helpers of `.ci/platforms` that are easier in Python than in shell (standard library only: runs
on the host's python3, whatever the release in the roots).

  serve ROOT --web-port N [--login USER:PASSWORD]
      start core and web inside ROOT as their installed systemd units would (ExecStart, User,
      Group, SupplementaryGroups, Environment, StateDirectory; NOTIFY_SOCKET a datagram socket read
      here), wait for READY=1 from each, then `/api/health` (mqtt and db true) and optionally a
      technician login; stop both with SIGTERM. Exit 0 only if all of that held.
  emulate --qemu Q --root R --python /usr/bin/python3.X --site DIR --config TOML --web-port N
      the same for an arm64 userland under qemu-aarch64-static run directly (no binfmt_misc): the
      core to READY=1, gunicorn (started through qemu: `carwash-gateway web` would execv an arm64
      binary, which the kernel cannot run here) to `/api/health`.
  wheels --constraints FILE --python 3.11 --python 3.13 [--may-build NAME]...
      which pins have an aarch64 wheel for each Python; exit 1 if one lacks it and is not allowed
      to build from source on the Pi.
  free-port
      print a free TCP port of 127.0.0.1.
Every wait has a deadline; a failure names what was expected and shows the process's log tail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

READY_SEC = 120.0  # native start takes ~1 s; generous for a loaded 2-core machine
EMULATED_READY_SEC = 600.0  # qemu-user is ~10x slower, and imports dominate the start
STOP_SEC = 30.0


class Failed(Exception):
    """A check did not hold; the message says which and why."""


def log(msg: str) -> None:
    print(f"[platform_run] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Notify:
    """An AF_UNIX datagram socket at `path` (mode 0777: the services run as another user)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)
        self.messages: list[str] = []

    def wait_for(self, wanted: str, proc: subprocess.Popen[bytes], timeout: float, logfile: Path) -> float:
        """Seconds until a datagram with the line `wanted` arrived; Failed if the process exits or
        the deadline passes first."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(f"no {wanted} within {timeout:.0f} s; got {self.messages!r}\n{tail(logfile)}")
            if proc.poll() is not None:
                raise Failed(f"exited with {proc.returncode} before {wanted}\n{tail(logfile)}")
            self.sock.settimeout(min(left, 1.0))  # wake up to notice an exited process
            try:
                data = self.sock.recv(4096).decode(errors="replace")
            except socket.timeout:
                continue
            self.messages.append(data)
            if wanted in data.splitlines():
                return time.monotonic() - start

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def http(url: str, body: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_health(url: str, timeout: float, proc: subprocess.Popen[bytes], logfile: Path) -> dict[str, object]:
    """Poll `/api/health` until it answers 200 with mqtt and db true (the web connects to the core's
    broker just after READY); a readiness poll with a deadline."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"web exited with {proc.returncode}\n{tail(logfile)}")
        try:
            code, health = http(url)
            last = (code, health)
            if code == 200 and health.get("mqtt") is True and health.get("db") is True:
                return health
        except (OSError, ValueError) as e:
            last = e
        time.sleep(0.5)
    raise Failed(f"{url} not healthy within {timeout:.0f} s: {last!r}\n{tail(logfile)}")


def stop(procs: Sequence[tuple[str, subprocess.Popen[bytes]]]) -> dict[str, int]:
    """SIGTERM in reverse start order, as systemd stops the target; SIGKILL past STOP_SEC."""
    codes: dict[str, int] = {}
    for name, p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            codes[name] = p.wait(STOP_SEC)
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = p.wait()
            log(f"{name} ignored SIGTERM for {STOP_SEC:.0f} s: killed")
    return codes


# --- serve: the installed package in a chroot -------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit file: key -> every value given (in order)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def ids(root: Path, user: str, group: str, extra: Sequence[str]) -> tuple[int, int, list[int]]:
    """uid, gid and supplementary gids from the ROOT's own account files."""
    passwd = {f[0]: f for f in (l.split(":") for l in (root / "etc/passwd").read_text().splitlines()) if len(f) > 3}
    groups = {f[0]: int(f[2]) for f in (l.split(":") for l in (root / "etc/group").read_text().splitlines()) if len(f) > 2}
    if user not in passwd:
        raise Failed(f"no user {user!r} in {root}/etc/passwd (the package's sysusers did not run)")
    missing = [g for g in (group, *extra) if g not in groups]
    if missing:
        raise Failed(f"no group {missing} in {root}/etc/group")
    return int(passwd[user][2]), groups[group], [groups[g] for g in extra]


def unit_command(root: Path, unit: Path, notify_inside: str) -> tuple[list[str], tuple[int, int]]:
    """The chroot command line that starts `unit` as systemd would (ExecStart under User=, with
    its Environment= and StateDirectory=), and the service's (uid, gid)."""
    keys = parse_unit(unit)
    if keys.get("Type") != ["notify"]:
        raise Failed(f"{unit.name}: Type={keys.get('Type')}, expected notify")
    user, group = keys["User"][0], keys.get("Group", keys["User"])[0]
    supp = [g for v in keys.get("SupplementaryGroups", []) for g in v.split()]
    uid, gid, supp_gids = ids(root, user, group, supp)
    for state in (d for v in keys.get("StateDirectory", []) for d in v.split()):
        path = root / "var/lib" / state
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, int(keys.get("StateDirectoryMode", ["0755"])[0], 8))
        os.chown(path, uid, gid)
    home = next(l.split(":")[5] for l in (root / "etc/passwd").read_text().splitlines() if l.startswith(user + ":"))
    env = ["PATH=/usr/local/bin:/usr/bin:/bin", f"NOTIFY_SOCKET={notify_inside}", f"HOME={home}", f"USER={user}",
           f"LOGNAME={user}", "LANG=C.UTF-8"]
    for v in keys.get("Environment", []):
        env += shlex.split(v)
    argv = shlex.split(keys["ExecStart"][0])
    groups_arg = ",".join(str(g) for g in [gid, *supp_gids])
    return ["chroot", f"--userspec={uid}:{gid}", f"--groups={groups_arg}", str(root),
            "/usr/bin/env", "-i", *env, *argv], (uid, gid)


def serve(args: argparse.Namespace) -> None:
    root = Path(args.root).resolve()
    unit_dir = next((d for d in (root / "usr/lib/systemd/system", root / "lib/systemd/system")
                     if (d / "carwash-gateway-core.service").is_file()), None)
    if unit_dir is None:
        raise Failed(f"no carwash-gateway-core.service under {root}/(usr/)lib/systemd/system")
    logs = Path(tempfile.mkdtemp(prefix="carwash-platform-logs-"))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    notifies: list[Notify] = []
    try:
        for name in ("core", "web"):
            notify = Notify(root / "run/carwash-platform" / f"{name}.notify")
            notifies.append(notify)
            argv, _ = unit_command(root, unit_dir / f"carwash-gateway-{name}.service", f"/run/carwash-platform/{name}.notify")
            logfile = logs / f"{name}.log"
            with logfile.open("wb") as out:
                p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/")
            procs.append((name, p))
            took = notify.wait_for("READY=1", p, READY_SEC, logfile)
            log(f"{name}: READY=1 after {took:.1f} s (as {argv[1]}, {argv[-4:]})")
        url = f"http://127.0.0.1:{args.web_port}"
        health = wait_health(url + "/api/health", 60, procs[1][1], logs / "web.log")
        log(f"/api/health: {json.dumps(health, sort_keys=True)[:200]}")
        if args.login:
            user, password = args.login.split(":", 1)
            code, body = http(url + "/api/v1/auth/login", {"username": user, "password": password})
            if code != 200:
                raise Failed(f"login of {user!r} answered {code}: {body}")
            log(f"technician {user!r} logged in (the database's users survived)")
    finally:
        codes = stop(procs)
        for n in notifies:
            n.close()
        if procs:
            log(f"stopped: {codes}")
    bad = {k: v for k, v in codes.items() if v != 0}
    if bad:
        raise Failed(f"services did not exit 0 on SIGTERM: {bad}\n{tail(logs / 'core.log')}\n{tail(logs / 'web.log')}")


# --- emulate: the arm64 userland under qemu-user ----------------------------------------------


def emulate(args: argparse.Namespace) -> None:
    root, site = Path(args.root).resolve(), Path(args.site).resolve()
    work = Path(args.config).resolve().parent
    qemu = [args.qemu, "-L", str(root), str(root) + args.python]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    arch = subprocess.run([*qemu, "-c", "import platform, sys; print(platform.machine(), sys.version.split()[0])"],
                          env=env, capture_output=True, text=True, timeout=300)
    if arch.returncode != 0 or not arch.stdout.startswith("aarch64"):
        raise Failed(f"the emulated python did not run as aarch64: {arch.stdout!r} {arch.stderr[-2000:]!r}")
    log(f"emulated interpreter: {arch.stdout.strip()}")
    cli = "import sys; from gateway.cli import main; sys.argv[0] = 'carwash-gateway'; sys.exit(main())"
    commands = {
        "core": [*qemu, "-c", cli, "core", "--config", args.config],
        "web": [*qemu, "-m", "gunicorn", "--config", str(site / "web/gunicorn_conf.py"), "web.wsgi:app"],
    }
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    notifies: list[Notify] = []
    try:
        for name in ("core", "web"):
            notify = Notify(work / f"{name}.notify")
            notifies.append(notify)
            logfile = work / f"{name}.log"
            with logfile.open("wb") as out:
                p = subprocess.Popen(commands[name], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**env, "NOTIFY_SOCKET": str(notify.path),
                                          "CARWASH_GATEWAY_CONFIG": args.config})
            procs.append((name, p))
            took = notify.wait_for("READY=1", p, EMULATED_READY_SEC, logfile)
            log(f"{name} (aarch64, emulated): READY=1 after {took:.1f} s")
        health = wait_health(f"http://127.0.0.1:{args.web_port}/api/health", EMULATED_READY_SEC, procs[1][1], work / "web.log")
        log(f"/api/health (aarch64, emulated): {json.dumps(health, sort_keys=True)[:200]}")
    finally:
        codes = stop(procs)
        for n in notifies:
            n.close()
        if procs:
            log(f"stopped: {codes}")


# --- wheels: which pins have aarch64 wheels ---------------------------------------------------

PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_26_aarch64", "manylinux_2_28_aarch64")


def _resolves(pins: Sequence[str], python: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as target:
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
               "--ignore-installed", "--no-deps", "--only-binary=:all:", "--target", target,
               "--implementation", "cp", "--python-version", python]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        return subprocess.run([*cmd, *pins], capture_output=True, text=True, timeout=900)


def wheels(args: argparse.Namespace) -> None:
    pins = [l.split("#")[0].strip() for l in Path(args.constraints).read_text().splitlines()]
    pins = [p for p in pins if p]
    allowed = {n.lower() for n in args.may_build}
    problems = []
    for python in args.python:
        left, lacking = list(pins), []
        # One resolution of every pin at once; pip names the first pin without a wheel: set it
        # aside and go again (a handful of rounds, not one pip call per pin).
        while left:
            r = _resolves(left, python)
            if r.returncode == 0:
                break
            m = re.search(r"No matching distribution found for ([^\s]+)", r.stderr)
            if not m or m.group(1) not in left:
                raise Failed(f"pip failed for Python {python} in an unexpected way:\n{r.stderr[-3000:]}")
            lacking.append(m.group(1))
            left.remove(m.group(1))
        names = [p.split("==")[0] for p in lacking]
        log(f"cp{python.replace('.', '')} aarch64: {len(left)} of {len(pins)} pins have a wheel; "
            f"no wheel: {', '.join(names) or 'none'}")
        problems += [f"{n} (cp{python.replace('.', '')})" for n in names if n.lower() not in allowed]
    if problems:
        raise Failed("no aarch64 wheel and not known to build on a Pi: " + ", ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("root")
    s.add_argument("--web-port", type=int, required=True)
    s.add_argument("--login", help="USER:PASSWORD that must log in")
    e = sub.add_parser("emulate")
    for k in ("--qemu", "--root", "--python", "--site", "--config"):
        e.add_argument(k, required=True)
    e.add_argument("--web-port", type=int, required=True)
    w = sub.add_parser("wheels")
    w.add_argument("--constraints", required=True)
    w.add_argument("--python", action="append", required=True)
    w.add_argument("--may-build", action="append", default=[])
    sub.add_parser("free-port")
    args = ap.parse_args(argv)
    actions: dict[str, Callable[[argparse.Namespace], None]] = {
        "serve": serve, "emulate": emulate, "wheels": wheels, "free-port": lambda a: print(free_port())}
    try:
        actions[args.cmd](args)
    except Failed as e:
        print(f"[platform_run] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
