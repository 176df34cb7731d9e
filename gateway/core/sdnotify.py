"""systemd readiness, watchdog and status notifications.

Uses systemd-python's `systemd.daemon.notify` when installed, else writes the datagram itself
(the protocol is one AF_UNIX datagram to $NOTIFY_SOCKET; `@` means the abstract namespace), so
the core behaves the same with or without the library. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket

try:  # pragma: no branch - which path depends on the install
    from systemd import daemon as _sd_daemon  # type: ignore[import-not-found,attr-defined,unused-ignore]
except ImportError:  # pragma: no cover
    _sd_daemon = None


class Notifier:
    """Reads $NOTIFY_SOCKET and $WATCHDOG_USEC once, when created (no I/O)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.socket_path = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wd_for_us = not pid or pid == str(os.getpid())
        self.watchdog_usec = int(usec) if usec.isascii() and usec.isdigit() and int(usec) > 0 and wd_for_us else 0
        # The library reads the environment itself; use it only when it would see the same socket.
        self._use_lib = _sd_daemon is not None and environ is None

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: under half of WATCHDOG_USEC (a third, for slack)."""
        return self.watchdog_usec / 3e6 if self.watchdog_usec else None

    def notify(self, state: str) -> bool:
        if not self.socket_path:
            return False
        if self._use_lib:
            try:
                return bool(_sd_daemon.notify(state))
            except OSError:  # the manager's socket is gone (it stopped listening)
                return False
        addr = self.socket_path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(state.encode(), addr)
            return True
        except OSError:
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
