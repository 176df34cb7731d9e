"""Both washbay-v1 PLC simulators behind one interface, for tests and benchmarks.

- kind "project": the project's own simulator (`sim/plc.py`, pymodbus); in the test's event
  loop by default, or as its own process (`carwash-gateway simulate-plc --control ...`).
- kind "independent": `sim/plc_umodbus.py` (umodbus, written from the register map), always its
  own process.

`make_plc(kind, ...)` returns a `TestPlc`: `await start()`, the controls under the simulators'
names (`set_error`, `local_reset`, `mute`, `freeze`, `ignore_commands`, `local_start`, `late`,
`garbage`, `set_raw`, `set_wash_time`, `status`, `command_log`), `await reopen()` after the pty pair
came back, `pause()`/`resume()` (SIGSTOP/SIGCONT; process PLCs only) and `await stop()`.
Control calls are synchronous and short; on a paused process they time out.

`RawClient` is a plain Modbus client on raw bytes (RTU on a pty path, or TCP), sharing nothing with
either simulator or the gateway, for checking what is on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.control import PlcControl
from sim.plc import PlcSimulator
from sim.procs import child_env, gateway_command

KINDS = ("project", "independent")
READY_LINE = "plc simulator:"
READY_TIMEOUT = 20.0
Bays = Sequence[tuple[str, int, int]]


class TestPlc:
    """A PLC simulator of either kind; see the module docstring."""

    __test__ = False  # not a test class for pytest
    kind: str
    in_process: bool = False

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def reopen(self) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        raise TypeError(f"{self.kind} PLC in this process: run it as a process to pause it")

    def resume(self) -> None:
        raise TypeError(f"{self.kind} PLC in this process: run it as a process to pause it")

    def _call(self, op: str, *args: Any) -> Any:
        raise NotImplementedError

    def set_error(self, bay: str, code: int) -> None:
        self._call("set_error", bay, code)

    def local_reset(self, bay: str) -> bool:
        return bool(self._call("local_reset", bay))

    def mute(self, bay: str | None, on: bool) -> None:
        self._call("mute", bay, on)

    def freeze(self, bay: str, on: bool) -> None:
        self._call("freeze", bay, on)

    def ignore_commands(self, bay: str, on: bool) -> None:
        self._call("ignore_commands", bay, on)

    def local_start(self, bay: str, course: int) -> bool:
        return bool(self._call("local_start", bay, course))

    def late(self, delay_s: float, every: int = 1) -> None:
        """Every `every`-th reply from now on comes `delay_s` after its request (0: off), in order."""
        self._call("late", delay_s, every)

    def garbage(self, on: bool) -> None:
        self._call("garbage", on)

    def set_raw(self, bay: str, offset: int, value: int) -> None:
        self._call("set_raw", bay, offset, value)

    def set_wash_time(self, bay: str, seconds: float) -> None:
        self._call("set_wash_time", bay, seconds)

    def status(self, bay: str) -> dict[str, Any]:
        return dict(self._call("status", bay))

    def command_log(self) -> list[tuple[str, int, float]]:
        return [(b, int(c), float(t)) for b, c, t in self._call("command_log")]


class InProcessPlc(TestPlc):
    """The project's simulator in the caller's event loop (controls are plain method calls)."""

    in_process = True

    def __init__(self, sim: PlcSimulator) -> None:
        self.kind = "project"
        self.sim = sim

    async def start(self) -> None:
        await self.sim.start()

    async def stop(self) -> None:
        await self.sim.stop()

    async def reopen(self) -> None:
        await self.sim.reopen()

    def _call(self, op: str, *args: Any) -> Any:
        return getattr(self.sim, op)(*args)


class ProcessPlc(TestPlc):
    """A simulator in a process of its own, driven over its control socket (sim.control)."""

    def __init__(self, kind: str, argv: list[str], control_path: str, log_path: Path) -> None:
        self.kind = kind
        self.argv = argv
        self.control = PlcControl(control_path)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    async def start(self) -> None:
        await asyncio.to_thread(self.start_blocking)

    def start_blocking(self) -> None:
        """start() for code without an event loop: returns once the PLC serves."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=child_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                         stderr=log, cwd=str(Path(__file__).resolve().parent.parent))
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + READY_TIMEOUT
        out = b""
        while READY_LINE.encode() not in out:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            chunk = os.read(fd, 4096) if ready else b""
            if not chunk:
                self.stop_blocking()
                raise AssertionError(f"{self.kind} PLC did not start: {out!r}\n{self.log()[-2000:]}")
            out += chunk

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_blocking)

    def stop_blocking(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            if self.paused:
                p.send_signal(signal.SIGCONT)
                self.paused = False
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p.stdout is not None:
            p.stdout.close()

    async def reopen(self) -> None:
        await asyncio.to_thread(self.control.call, "reopen")

    def pause(self) -> None:
        """SIGSTOP: the PLC stops dead (no scan, no heartbeat, no answer) until resume()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _call(self, op: str, *args: Any) -> Any:
        return self.control.call(op, *args)


def make_plc(kind: str, workdir: Path, *, bays: Bays, rtu: str | None = None, tcp: tuple[str, int] | None = None,
             wash_time: float = 10.0, process: bool = False, name: str = "plc") -> TestPlc:
    """A PLC of `kind` serving `bays` [(bay_id, unit, base)] on `rtu` (a serial path) or `tcp`.
    No I/O until start(). The project kind runs in the caller's event loop unless `process`."""
    if (rtu is None) == (tcp is None):
        raise ValueError("give exactly one of rtu= and tcp=")
    if kind == "project" and not process:
        if rtu is not None:
            return InProcessPlc(PlcSimulator.rtu(rtu, bays=bays, wash_time=wash_time))
        assert tcp is not None
        return InProcessPlc(PlcSimulator.tcp(tcp[0], tcp[1], bays=bays, wash_time=wash_time))
    workdir.mkdir(parents=True, exist_ok=True)
    control = str(workdir / f"{name}.ctl")
    line = ["--rtu", rtu] if rtu is not None else ["--tcp", f"{tcp[0]}:{tcp[1]}"]  # type: ignore[index]
    opts = [*line, *(a for b, u, base in bays for a in ("--bay", f"{b}:{u}:{base}")),
            "--wash-time", str(wash_time), "--control", control]
    if kind == "project":
        argv = gateway_command("simulate-plc", *opts)
    elif kind == "independent":
        argv = [sys.executable, "-m", "sim.plc_umodbus", *opts]
    else:
        raise ValueError(f"unknown PLC kind {kind!r}; one of {KINDS}")
    return ProcessPlc(kind, argv, control, workdir / f"{name}.log")


# --- a raw Modbus client ---------------------------------------------------------------------------


def crc16(data: bytes) -> bytes:
    """Modbus RTU CRC-16 (poly 0xA001, init 0xFFFF), little-endian."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return struct.pack("<H", crc)


class NoReply(TimeoutError):
    pass


class RawClient:
    """Modbus on raw bytes: `send(unit, pdu)` writes one request, `recv(timeout)` returns the next
    reply as (unit, pdu) (TCP: plus the transaction id) without matching it to any request, so a
    test sees exactly what the PLC put on the line and in which order. Use as a context manager."""

    def __init__(self, *, rtu: str | None = None, tcp: tuple[str, int] | None = None) -> None:
        self.rtu_path = rtu
        self.tcp_addr = tcp
        self._fd: int | None = None
        self._sock: socket.socket | None = None
        self._buf = b""
        self._tid = 0

    def __enter__(self) -> RawClient:
        if self.rtu_path is not None:
            self._fd = os.open(self.rtu_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            tty.setraw(self._fd)
            termios.tcflush(self._fd, termios.TCIOFLUSH)
        else:
            assert self.tcp_addr is not None
            self._sock = socket.create_connection(self.tcp_addr, timeout=5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, unit: int, pdu: bytes, tid: int | None = None) -> int:
        """Write one request; returns its TCP transaction id (RTU: 0)."""
        if self._fd is not None:
            adu = bytes([unit]) + pdu
            os.write(self._fd, adu + crc16(adu))
            return 0
        assert self._sock is not None
        self._tid = (self._tid + 1) & 0xFFFF if tid is None else tid
        self._sock.sendall(struct.pack(">HHHB", self._tid, 0, len(pdu) + 1, unit) + pdu)
        return self._tid

    def send_raw(self, data: bytes) -> None:
        if self._fd is not None:
            os.write(self._fd, data)
        else:
            assert self._sock is not None
            self._sock.sendall(data)

    def _read(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NoReply("no reply")
        src = self._fd if self._fd is not None else self._sock
        assert src is not None
        ready, _, _ = select.select([src], [], [], left)
        if not ready:
            raise NoReply("no reply")
        chunk = os.read(self._fd, 512) if self._fd is not None else self._sock.recv(512)  # type: ignore[union-attr]
        if not chunk:
            raise ConnectionError("closed by the PLC")
        self._buf += chunk

    def recv_bytes(self, timeout: float, quiet: float = 0.05) -> bytes:
        """Everything that arrives until `quiet` seconds pass without a byte (or `timeout`)."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(NoReply):
            self._read(deadline)
            while True:
                self._read(min(deadline, time.monotonic() + quiet))
        out, self._buf = self._buf, b""
        return out

    def recv(self, timeout: float = 2.0) -> tuple[int, bytes, int]:
        """The next reply: (unit, pdu, transaction id; 0 on RTU). RTU frames are checked (CRC);
        a bad one raises ValueError."""
        deadline = time.monotonic() + timeout
        if self._sock is not None:
            while len(self._buf) < 7:
                self._read(deadline)
            tid, pid, length, unit = struct.unpack(">HHHB", self._buf[:7])
            if pid != 0 or length < 2:
                raise ValueError(f"not a Modbus TCP reply: {self._buf[:7].hex()}")
            while len(self._buf) < 6 + length:
                self._read(deadline)
            pdu, self._buf = self._buf[7:6 + length], self._buf[6 + length:]
            return unit, pdu, tid
        while len(self._buf) < 5:
            self._read(deadline)
        fc = self._buf[1]
        if fc & 0x80:
            size = 5
        elif fc == 3:
            size = 5 + self._buf[2]
        else:
            size = 8
        while len(self._buf) < size:
            self._read(deadline)
        frame, self._buf = self._buf[:size], self._buf[size:]
        if crc16(frame[:-2]) != frame[-2:]:
            raise ValueError(f"bad CRC: {frame.hex()}")
        return frame[0], frame[1:-2], 0

    def request(self, unit: int, pdu: bytes, timeout: float = 2.0) -> bytes:
        """One request and its reply's PDU (the next thing on the line)."""
        self.send(unit, pdu)
        return self.recv(timeout)[1]

    # PDUs
    @staticmethod
    def read(address: int, count: int, fc: int = 3) -> bytes:
        return struct.pack(">BHH", fc, address, count)

    @staticmethod
    def write1(address: int, value: int) -> bytes:
        return struct.pack(">BHH", 6, address, value)

    @staticmethod
    def write(address: int, values: Sequence[int]) -> bytes:
        return struct.pack(f">BHHB{len(values)}H", 16, address, len(values), 2 * len(values), *values)

    def registers(self, unit: int, address: int, count: int, timeout: float = 2.0) -> list[int]:
        pdu = self.request(unit, self.read(address, count), timeout)
        if pdu[0] != 3 or pdu[1] != 2 * count:
            raise ValueError(f"unexpected reply {pdu.hex()}")
        return list(struct.unpack(f">{count}H", pdu[2:]))
