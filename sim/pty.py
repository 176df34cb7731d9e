"""A socat pty pair standing in for an RS485 line: the gateway opens one end, the simulator the other.

Both ends are reached through stable symlinks in a directory, so killing socat (an unplugged USB
adapter) and starting it again gives the same paths back. Start-up waits on socat's own log line,
never on a sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

READY_TIMEOUT = 10.0


class SocatPair:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.gateway_path = str(self.dir / "gateway.pty")
        self.plc_path = str(self.dir / "sim.pty")
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Start socat and return once both symlinks exist (TimeoutError otherwise)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in (self.gateway_path, self.plc_path):
            if os.path.lexists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(
            ["socat", "-d", "-d", f"pty,raw,echo=0,link={self.gateway_path}", f"pty,raw,echo=0,link={self.plc_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                if b"starting data transfer loop" in line:
                    ready.set()
            ready.set()  # socat ended: let start() see it

        self._reader = threading.Thread(target=read, name="socat-log", daemon=True)
        self._reader.start()
        if not ready.wait(READY_TIMEOUT) or self.proc.poll() is not None:
            self.kill()
            raise TimeoutError("socat did not start its pty pair")

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL socat: both ends vanish at once, like an unplugged adapter."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()
