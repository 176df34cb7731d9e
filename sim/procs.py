"""Starting gateway processes and waiting for their systemd readiness, outside systemd.

`NotifySocket` binds an AF_UNIX datagram socket and reads what a child sends to $NOTIFY_SOCKET
(READY=1, WATCHDOG=1, STOPPING=1, STATUS=...), so the demo, the tests and the benchmarks wait
for real readiness instead of polling or sleeping.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class NotifySocket:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for(self, needle: str, timeout: float, count: int = 1) -> float:
        """Block until `count` datagrams containing the line `needle` have arrived; return the
        arrival time (time.monotonic()) of the last one. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            hits = [at for at, msg in self.messages if needle in msg.splitlines()]
            if len(hits) >= count:
                return hits[count - 1]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(hits)} of {count} {needle!r} within {timeout:g} s "
                                   f"(got {[m for _, m in self.messages][-10:]})")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode(errors="replace")))


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def gateway_command(*args: str) -> list[str]:
    """argv running this installation's `carwash-gateway` with the current interpreter."""
    import sys

    return [sys.executable, "-m", "gateway", *args]


def child_env(notify: NotifySocket | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(k, None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.path
    # Run from the source tree when not installed (the demo and tests use the checkout).
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env
