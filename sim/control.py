"""The control protocol of a PLC simulator running as its own process, and its client.

One Unix stream socket; each call is one JSON line `{"op": NAME, "args": [...]}` answered by one
line `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. The project's simulator
(`sim/plc.py`, `--control PATH`) and the independent one (`sim/plc_umodbus.py`) serve the same
operations under the same names, so tests drive either through `PlcControl`.
"""

from __future__ import annotations

import json
import socket
from typing import Any

CALL_TIMEOUT = 5.0


class ControlError(RuntimeError):
    """The simulator refused a call (unknown operation, bad arguments)."""


class PlcControl:
    """Synchronous client: one short connection per call, so it is safe from any thread.

    No I/O in the constructor. A paused (SIGSTOPped) simulator makes a call time out after
    `timeout` seconds (TimeoutError)."""

    def __init__(self, path: str, timeout: float = CALL_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, op: str, *args: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                s.sendall(json.dumps({"op": op, "args": list(args)}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError(f"plc control {self.path}: closed during {op}")
                    buf += chunk
            except TimeoutError:
                raise TimeoutError(f"plc control {self.path}: no answer to {op} within {self.timeout} s") from None
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise ControlError(f"{op}: {reply.get('error')}")
        return reply.get("result")

    # The controls, with the names of sim.plc.PlcSimulator's.
    def set_error(self, bay: str, code: int) -> None:
        self.call("set_error", bay, code)

    def local_reset(self, bay: str) -> bool:
        return bool(self.call("local_reset", bay))

    def mute(self, bay: str | None, on: bool) -> None:
        self.call("mute", bay, on)

    def freeze(self, bay: str, on: bool) -> None:
        self.call("freeze", bay, on)

    def ignore_commands(self, bay: str, on: bool) -> None:
        self.call("ignore_commands", bay, on)

    def local_start(self, bay: str, course: int) -> bool:
        return bool(self.call("local_start", bay, course))

    def late(self, delay_s: float, every: int = 1) -> None:
        self.call("late", delay_s, every)

    def garbage(self, on: bool) -> None:
        self.call("garbage", on)

    def set_raw(self, bay: str, offset: int, value: int) -> None:
        self.call("set_raw", bay, offset, value)

    def set_wash_time(self, bay: str, seconds: float) -> None:
        self.call("set_wash_time", bay, seconds)

    def status(self, bay: str) -> dict[str, Any]:
        return dict(self.call("status", bay))

    def command_log(self) -> list[tuple[str, int, float]]:
        return [(b, int(c), float(t)) for b, c, t in self.call("command_log")]

    def reopen(self) -> None:
        self.call("reopen")
