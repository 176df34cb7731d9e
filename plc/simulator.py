"""A PLC simulator of the washbay-v1 profile on a real pymodbus server (RTU on a serial path,
e.g. one end of a socat pty pair, or TCP), with fault controls for tests and the demo.

The bay models are the source of truth; a pymodbus `SimDevice` action copies them into the
served registers on every request and takes commands from writes. A muted unit gets no answer at
all (its responses are dropped on the way out), as a dead PLC on RS485 would.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from plc.profile import Profile, builtin_profiles

log = logging.getLogger(__name__)

TICK_SEC = 0.05


@dataclass
class SimBay:
    bay_id: str
    unit: int
    base: int
    wash_time: float
    state: str = "IDLE"
    progress: int = 0
    ack_seq: int = 0
    error_code: int = 0
    course: int = 0
    heartbeat: int = 0
    session_counter: int = 0
    frozen: bool = False
    muted: bool = False
    ignore_commands: bool = False
    phase_at: float = 0.0
    raw: dict[int, int] = field(default_factory=dict)


class PlcSimulator:
    """Serve bays `[(bay_id, unit, base), ...]`. Create with `rtu()` or `tcp()`; no I/O until start()."""

    def __init__(self, bays: Sequence[tuple[str, int, int]], *, wash_time: float = 10.0, start_delay: float = 0.5,
                 done_hold: float = 2.0, profile: Profile | None = None, rtu_path: str | None = None,
                 baudrate: int = 115200, tcp: tuple[str, int] | None = None) -> None:
        self.profile = profile or builtin_profiles()["washbay-v1"]
        self.bays = {b: SimBay(b, u, base, wash_time) for b, u, base in bays}
        self.start_delay = start_delay
        self.done_hold = done_hold
        self.rtu_path = rtu_path
        self.baudrate = baudrate
        self.tcp_addr = tcp
        self.all_muted = False
        self.requests = 0
        # (bay, cmd, time.monotonic()) of every command block written: for benchmarks and tests.
        self.command_log: list[tuple[str, int, float]] = []
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._units = {b.unit: [x for x in self.bays.values() if x.unit == b.unit] for b in self.bays.values()}
        self._last_beat = 0.0

    @classmethod
    def rtu(cls, path: str, *, bays: Sequence[tuple[str, int, int]], **kw: Any) -> PlcSimulator:
        return cls(bays, rtu_path=path, **kw)

    @classmethod
    def tcp(cls, host: str, port: int, *, bays: Sequence[tuple[str, int, int]], **kw: Any) -> PlcSimulator:
        return cls(bays, tcp=(host, port), **kw)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self._serve()
        self._last_beat = time.monotonic()
        self._task = asyncio.create_task(self._tick_forever(), name="plc-sim-tick")

    async def reopen(self) -> None:
        """Serve again on the same path after the line vanished (socat restarted); bays keep state."""
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
        await self._serve()

    async def _serve(self) -> None:
        span = max(b.base for b in self.bays.values()) + self.profile.span
        devices = [SimDevice(id=unit, simdata=[SimData(0, count=span, values=0, datatype=DataType.REGISTERS)],
                             action=partial(self._action, unit)) for unit in self._units]
        if self.rtu_path is not None:
            self._server = ModbusSerialServer(devices, port=self.rtu_path, baudrate=self.baudrate,
                                              trace_packet=self._trace_rtu, reconnect_delay=0.2)
        else:
            assert self.tcp_addr is not None
            self._server = ModbusTcpServer(devices, address=self.tcp_addr, trace_packet=self._trace_tcp)
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    # --- fault controls -----------------------------------------------------------------------

    def set_error(self, bay: str, code: int) -> None:
        b = self.bays[bay]
        b.error_code = code
        b.state = "ERROR" if code else "IDLE"
        if not code:
            b.progress = 0

    def mute(self, bay: str | None, on: bool) -> None:
        if bay is None:
            self.all_muted = on
        else:
            self.bays[bay].muted = on

    def freeze(self, bay: str, on: bool) -> None:
        self.bays[bay].frozen = on

    def ignore_commands(self, bay: str, on: bool) -> None:
        self.bays[bay].ignore_commands = on

    def local_start(self, bay: str, course_code: int) -> None:
        b = self.bays[bay]
        self._begin(b, course_code, time.monotonic())

    def set_raw(self, bay: str, offset: int, value: int) -> None:
        """Override one register as served (e.g. state 9, progress 250); -1 removes the override."""
        b = self.bays[bay]
        if value < 0:
            b.raw.pop(offset, None)
        else:
            b.raw[offset] = value

    def registers(self, bay: str) -> list[int]:
        return self._render(self.bays[bay])

    def status(self, bay: str) -> dict[str, Any]:
        b = self.bays[bay]
        return {"state": b.state, "progress": b.progress, "ack_seq": b.ack_seq, "error_code": b.error_code,
                "course": b.course, "heartbeat": b.heartbeat, "session_counter": b.session_counter}

    # --- the PLC's behaviour ------------------------------------------------------------------

    def _begin(self, b: SimBay, course: int, now: float) -> None:
        b.course, b.state, b.progress, b.phase_at = course, "STARTING", 0, now
        b.session_counter = (b.session_counter + 1) & 0xFFFFFFFF

    def _command(self, b: SimBay, cmd: int, course: int, seq: int, now: float) -> None:
        p = self.profile.commands
        if b.ignore_commands or cmd == 0:
            return
        if cmd == p["START"] and b.state in ("IDLE", "DONE", "CANCELED") and not b.error_code:
            b.ack_seq = seq
            self._begin(b, course, now)
        elif cmd == p["STOP"] and b.state in ("STARTING", "WASHING"):
            b.ack_seq, b.state, b.phase_at = seq, "CANCELED", now
        elif cmd == p["RESET_ERROR"]:
            b.ack_seq, b.error_code = seq, 0
            if b.state == "ERROR":
                b.state, b.progress = "IDLE", 0

    def _advance(self, b: SimBay, now: float) -> None:
        if b.state == "STARTING" and now - b.phase_at >= self.start_delay:
            b.state, b.phase_at = "WASHING", now
        if b.state == "WASHING":
            frac = (now - b.phase_at) / b.wash_time if b.wash_time > 0 else 1.0
            b.progress = min(100, int(frac * 100))
            if frac >= 1.0:
                b.state, b.progress, b.phase_at = "DONE", 100, now
        elif b.state in ("DONE", "CANCELED") and now - b.phase_at >= self.done_hold:
            b.state, b.progress, b.course = "IDLE", 0, b.course

    async def _tick_forever(self) -> None:
        while True:
            now = time.monotonic()
            beat = now - self._last_beat >= 1.0
            if beat:
                self._last_beat += 1.0
            for b in self.bays.values():
                self._advance(b, now)
                if beat and not b.frozen:
                    b.heartbeat = (b.heartbeat + 1) & 0xFFFF
            await asyncio.sleep(TICK_SEC)

    def _render(self, b: SimBay) -> list[int]:
        prof = self.profile
        regs = [0] * prof.span
        r = prof.registers
        state_codes = {v: k for k, v in prof.states.items()}
        regs[r["state"]] = state_codes[b.state]
        regs[r["progress"]] = b.progress
        regs[r["ack_seq"]] = b.ack_seq
        regs[r["error_code"]] = b.error_code
        regs[r["course"]] = b.course
        regs[r["heartbeat"]] = b.heartbeat
        regs[r["session_counter"]] = b.session_counter >> 16
        regs[r["session_counter"] + 1] = b.session_counter & 0xFFFF
        for off, v in b.raw.items():
            regs[off] = v
        return regs

    async def _action(self, unit: int, function_code: int, start_address: int, address: int, count: int,
                      current_registers: list[int], set_values: list[int] | list[bool] | None) -> ExcCodes | None:
        self.requests += 1
        now = time.monotonic()
        for b in self._units[unit]:
            self._advance(b, now)
            current_registers[b.base:b.base + self.profile.span] = self._render(b)
        if set_values is not None and function_code in (6, 16):
            values = [int(v) for v in set_values]
            for b in self._units[unit]:
                cmd_off = b.base + self.profile.command_offset
                if address <= cmd_off and address + len(values) >= cmd_off + 3:
                    block = values[cmd_off - address:cmd_off - address + 3]
                    r = self.profile.registers
                    c = self.profile.command_offset
                    self.command_log.append((b.bay_id, block[r["cmd"] - c], now))
                    self._command(b, block[r["cmd"] - c], block[r["cmd_course"] - c], block[r["cmd_seq"] - c], now)
                    # The PLC clears cmd once taken: the write lands, then we render over it.
            # Let pymodbus store the written values, then restore the model's view.
            return None
        return None

    def _muted_unit(self, unit: int) -> bool:
        return self.all_muted or any(b.muted for b in self._units.get(unit, []))

    def _trace_rtu(self, sending: bool, data: bytes) -> bytes:
        if sending and data and self._muted_unit(data[0]):
            return b""
        return data

    def _trace_tcp(self, sending: bool, data: bytes) -> bytes:
        if sending and len(data) > 6 and self._muted_unit(data[6]):
            return b""
        return data


def simulate_plc_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carwash-gateway simulate-plc", description="washbay-v1 PLC simulator")
    ap.add_argument("--rtu", metavar="PATH", help="serve Modbus RTU on this serial device (e.g. a socat pty)")
    ap.add_argument("--tcp", metavar="HOST:PORT", help="serve Modbus TCP")
    ap.add_argument("--bays", type=int, default=0, help="bays bay1..bayN on unit ids 1..N, base 0")
    ap.add_argument("--bay", action="append", default=[], metavar="ID:UNIT:BASE")
    ap.add_argument("--wash-time", type=float, default=10.0)
    ap.add_argument("--baudrate", type=int, default=115200)
    args = ap.parse_args(argv)
    bays = [(f"bay{i}", i, 0) for i in range(1, args.bays + 1)]
    for spec in args.bay:
        bid, unit, base = spec.split(":")
        bays.append((bid, int(unit), int(base)))
    if not bays or not (args.rtu or args.tcp):
        ap.error("give --rtu and/or --tcp, and --bays or --bay")

    async def main() -> None:
        sims = []
        if args.rtu:
            sims.append(PlcSimulator.rtu(args.rtu, bays=bays, wash_time=args.wash_time, baudrate=args.baudrate))
        if args.tcp:
            host, port = args.tcp.rsplit(":", 1)
            sims.append(PlcSimulator.tcp(host, int(port), bays=bays, wash_time=args.wash_time))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        for s in sims:
            await s.start()
            where = f"rtu {s.rtu_path}" if s.rtu_path else f"tcp {s.tcp_addr[0]}:{s.tcp_addr[1]}"  # type: ignore[index]
            print(f"plc simulator: {where}: {', '.join(f'{b}@{u}+{base}' for b, u, base in bays)}", flush=True)
        await stop.wait()
        for s in sims:
            await s.stop()

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
    return 0
