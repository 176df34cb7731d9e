"""A PLC simulator of the washbay-v1 profile on a real pymodbus server (RTU on a serial path,
e.g. one end of a socat pty pair, or TCP), with fault controls for tests and the demo.

It behaves as the register map and real PLCs do (shared/spec/plc-register-map.md):
- holding registers only: FC03, FC06, FC16; any other function code gets exception 1 (illegal
  function), an address past the served registers exception 2 (illegal data address);
- a command is taken when `cmd` becomes non-zero, however it was written (the block in one FC16 or
  FC06/FC16 pieces), with the cmd_course and cmd_seq in the registers then; `cmd` is cleared to 0
  and cmd_course/cmd_seq read back as written; a cmd_seq equal to ack_seq is a repeat, not acted on;
- errors latch: `set_error(bay, code)` is the fault condition; the bay shows ERROR with the code
  and stays in ERROR after `set_error(bay, 0)` until RESET_ERROR (cmd 3) or `local_reset(bay)`.

The bay models are the source of truth; a pymodbus `SimDevice` action copies them into the
served registers on every request and takes commands from writes. pymodbus's own request handler
runs each decoded frame as a task of its own and reads the request back from a shared attribute
after awaiting, so a slow answer could overtake or be mixed up with the next; `_InOrderHandler`
replaces that dispatch with one queue per connection, answered strictly in arrival order, which is
also where the faults live: `late(delay_s)` (each reply D seconds after its request arrived, still
in order), `garbage(on)` (random bytes instead of each reply) and mute (no answer at all, as a dead
PLC on RS485).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu import ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.transaction import TransactionManager

from plc.profile import Profile, builtin_profiles

log = logging.getLogger(__name__)

TICK_SEC = 0.05
FUNCTIONS = (3, 6, 16)  # holding registers only, as the register map says


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
    fault: int = 0  # the live fault condition; error_code is what the PLC latched
    cmd: list[int] = field(default_factory=lambda: [0, 0, 0])  # cmd, cmd_course, cmd_seq as written
    raw: dict[int, int] = field(default_factory=dict)


class _InOrderHandler(ServerRequestHandler):
    """One connection of the server: requests queued as decoded, answered one at a time in order."""

    def __init__(self, owner: Any, sim: PlcSimulator) -> None:
        super().__init__(owner, None, None, None)
        self.sim = sim
        self._queue: asyncio.Queue[tuple[float, ModbusPDU | None, ModbusPDU | None, Any]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        # pymodbus takes one frame per call; take every complete frame of the chunk (two requests
        # in one read would otherwise leave the second waiting for the next byte on the line).
        used = 0
        while used < len(data):
            chunk = data[used:]
            if self.sim.rtu_path is not None:
                # pymodbus's RTU framer swallows the whole buffer with its first frame: hand it one
                # frame at a time, as a PLC that sees the silence between requests would take them.
                pdu_class = self.framer.decoder.lookupPduClass(chunk)
                size = pdu_class.calculateRtuFrameSize(chunk) if pdu_class else 0
                if size and len(chunk) > size:
                    chunk = chunk[:size]
            try:
                n = TransactionManager.callback_data(self, chunk, addr)
            except ModbusIOException as exc:  # a function code pymodbus cannot decode
                resp = ExceptionResponse(exc.fcode or 0, ExcCodes.ILLEGAL_FUNCTION, device_id=exc.dev_id,
                                         transaction=exc.transaction_id)
                self._enqueue(None, resp, addr)
                return len(data)
            if self.last_pdu is not None:
                self._enqueue(self.last_pdu, None, self.last_addr)
            if n <= 0:
                break
            used += n
        return used

    def _enqueue(self, pdu: ModbusPDU | None, resp: ModbusPDU | None, addr: Any) -> None:
        self._queue.put_nowait((self.loop.time(), pdu, resp, addr))
        if self._worker is None:
            self._worker = self.loop.create_task(self._work(), name="plc-sim-replies")
            self.sim._workers.add(self._worker)
            self._worker.add_done_callback(self.sim._workers.discard)

    def callback_disconnected(self, exc: Exception | None) -> None:
        super().callback_disconnected(exc)
        if self._worker is not None:
            self._worker.cancel()

    async def _work(self) -> None:
        while True:
            arrived, pdu, resp, addr = await self._queue.get()
            sim = self.sim
            sim.replied += 1
            if sim.late_s and sim.replied % sim.late_every == 0:
                wait = arrived + sim.late_s - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            if resp is None:
                assert pdu is not None
                resp = await self._respond(pdu)
            elif sim._muted_unit(resp.dev_id):
                continue
            if resp is None:
                continue
            if self.sim.garbage_on:
                self.low_level_send(os.urandom(len(self.framer.buildFrame(resp))), addr=addr)
            else:
                self.pdu_send(resp, addr)

    async def _respond(self, pdu: ModbusPDU) -> ModbusPDU | None:
        sim = self.sim
        if sim._muted_unit(pdu.dev_id):
            return None
        fc = pdu.function_code
        exc: int | None = None
        if fc not in FUNCTIONS:
            exc = ExcCodes.ILLEGAL_FUNCTION
        elif pdu.dev_id in sim._units:
            count = 1 if fc == 6 else int(getattr(pdu, "count", 0) or len(getattr(pdu, "registers", [])))
            if pdu.address + count > sim._span:
                exc = ExcCodes.ILLEGAL_ADDRESS
        if exc is not None:
            return ExceptionResponse(fc, exc, device_id=pdu.dev_id, transaction=pdu.transaction_id)
        try:
            resp = await pdu.datastore_update(self.server.context, pdu.dev_id)
        except Exception:  # an id this PLC does not serve (pymodbus's own answer: device failure)
            resp = ExceptionResponse(fc, ExcCodes.DEVICE_FAILURE)
        resp.transaction_id = pdu.transaction_id
        resp.dev_id = pdu.dev_id
        return resp


class _SerialServer(ModbusSerialServer):
    def __init__(self, sim: PlcSimulator, *args: Any, **kw: Any) -> None:
        self._sim = sim
        super().__init__(*args, **kw)

    def callback_new_connection(self) -> ServerRequestHandler:
        return _InOrderHandler(self, self._sim)


class _TcpServer(ModbusTcpServer):
    def __init__(self, sim: PlcSimulator, *args: Any, **kw: Any) -> None:
        self._sim = sim
        super().__init__(*args, **kw)

    def callback_new_connection(self) -> ServerRequestHandler:
        return _InOrderHandler(self, self._sim)


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
        self.late_s = 0.0
        self.late_every = 1
        self.replied = 0
        self.garbage_on = False
        self.requests = 0
        # (bay, cmd, time.monotonic()) of every non-zero cmd written: for benchmarks and tests.
        self.commands: list[tuple[str, int, float]] = []
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._units = {b.unit: [x for x in self.bays.values() if x.unit == b.unit] for b in self.bays.values()}
        self._span = max(b.base for b in self.bays.values()) + self.profile.span
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
        await self._shutdown_server()
        await self._serve()

    async def _serve(self) -> None:
        devices = [SimDevice(id=unit, simdata=[SimData(0, count=self._span, values=0, datatype=DataType.REGISTERS)],
                             action=partial(self._action, unit)) for unit in self._units]
        if self.rtu_path is not None:
            self._server = _SerialServer(self, devices, port=self.rtu_path, baudrate=self.baudrate,
                                         reconnect_delay=0.2)
        else:
            assert self.tcp_addr is not None
            self._server = _TcpServer(self, devices, address=self.tcp_addr)
        await self._server.serve_forever(background=True)

    async def _shutdown_server(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None
        workers = list(self._workers)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._shutdown_server()

    # --- fault controls -----------------------------------------------------------------------

    def set_error(self, bay: str, code: int) -> None:
        """The fault condition of a bay (0: gone). The error latches: see local_reset and RESET_ERROR."""
        b = self.bays[bay]
        b.fault = int(code)
        self._advance(b, time.monotonic())

    def local_reset(self, bay: str) -> bool:
        """The reset button on the PLC's panel: clears a latched error once its fault is gone."""
        return self._reset(self.bays[bay])

    def mute(self, bay: str | None, on: bool) -> None:
        """No answer at all from the unit of `bay` (every unit: None)."""
        if bay is None:
            self.all_muted = on
        else:
            self.bays[bay].muted = on

    def freeze(self, bay: str, on: bool) -> None:
        self.bays[bay].frozen = on

    def ignore_commands(self, bay: str, on: bool) -> None:
        self.bays[bay].ignore_commands = on

    def late(self, delay_s: float, every: int = 1) -> None:
        """Answer every `every`-th request from now on `delay_s` after it arrived (0: on time);
        replies stay in arrival order, so the ones behind a late reply wait for it."""
        self.late_s, self.late_every, self.replied = max(0.0, float(delay_s)), max(1, int(every)), 0

    def garbage(self, on: bool) -> None:
        """Random bytes of the reply's length instead of every reply."""
        self.garbage_on = on

    def local_start(self, bay: str, course_code: int) -> bool:
        """A session started on the PLC itself (coin box, button); refused unless the bay is free."""
        b = self.bays[bay]
        if b.state not in ("IDLE", "DONE", "CANCELED") or course_code not in self.profile.courses:
            return False
        self._begin(b, course_code, time.monotonic())
        return True

    def set_wash_time(self, bay: str, seconds: float) -> None:
        self.bays[bay].wash_time = float(seconds)

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
                "course": b.course, "heartbeat": b.heartbeat, "session_counter": b.session_counter,
                "fault": b.fault, "cmd": list(b.cmd)}

    def command_log(self) -> list[tuple[str, int, float]]:
        return list(self.commands)

    # --- the PLC's behaviour ------------------------------------------------------------------

    def _begin(self, b: SimBay, course: int, now: float) -> None:
        b.course, b.state, b.progress, b.phase_at = course, "STARTING", 0, now
        b.session_counter = (b.session_counter + 1) & 0xFFFFFFFF

    def _reset(self, b: SimBay) -> bool:
        if b.state != "ERROR" or b.fault:
            return False
        b.state, b.error_code, b.progress = "IDLE", 0, 0
        return True

    def _command(self, b: SimBay, cmd: int, course: int, seq: int, now: float) -> None:
        p = self.profile.commands
        if b.ignore_commands or cmd == 0 or seq == 0 or seq == b.ack_seq:
            return
        if cmd == p["START"] and b.state in ("IDLE", "DONE", "CANCELED") and course in self.profile.courses:
            b.ack_seq = seq
            self._begin(b, course, now)
        elif cmd == p["STOP"] and b.state in ("STARTING", "WASHING"):
            b.ack_seq, b.state, b.phase_at = seq, "CANCELED", now
        elif cmd == p["RESET_ERROR"]:
            b.ack_seq = seq
            self._reset(b)

    def _advance(self, b: SimBay, now: float) -> None:
        if b.fault:
            b.state, b.error_code = "ERROR", b.fault
            return
        if b.state == "STARTING" and now - b.phase_at >= self.start_delay:
            b.state, b.phase_at = "WASHING", now
        if b.state == "WASHING":
            frac = (now - b.phase_at) / b.wash_time if b.wash_time > 0 else 1.0
            b.progress = min(100, int(frac * 100))
            if frac >= 1.0:
                b.state, b.progress, b.phase_at = "DONE", 100, now
        elif b.state in ("DONE", "CANCELED") and now - b.phase_at >= self.done_hold:
            b.state, b.progress = "IDLE", 0

    async def _tick_forever(self) -> None:
        while True:
            now = time.monotonic()
            beat = now - self._last_beat >= 1.0
            if beat:
                self._last_beat += 1.0
                if now - self._last_beat > 1.0:  # the process was stopped: no burst of beats after it
                    self._last_beat = now
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
        for i, name in enumerate(("cmd", "cmd_course", "cmd_seq")):
            regs[r[name]] = b.cmd[i]
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
        """Called by pymodbus before it reads or stores: render the bays, take written commands."""
        self.requests += 1
        now = time.monotonic()
        bays = self._units[unit]
        if set_values is not None and function_code in (6, 16):
            r = self.profile.registers
            c = self.profile.command_offset
            values = [int(v) for v in set_values]
            for b in bays:
                for name in ("cmd", "cmd_course", "cmd_seq"):
                    reg = b.base + r[name]
                    if address <= reg < address + len(values):
                        b.cmd[r[name] - c] = values[reg - address]
                if b.cmd[0]:
                    cmd, course, seq = b.cmd
                    b.cmd[0] = 0  # taken: the PLC clears cmd; course and seq stay as written
                    self.commands.append((b.bay_id, cmd, now))
                    self._command(b, cmd, course, seq, now)
        for b in bays:
            self._advance(b, now)
            current_registers[b.base:b.base + self.profile.span] = self._render(b)
        # pymodbus stores written values after this returns; every request renders first, so a
        # read never sees a stale cmd.
        return None

    def _muted_unit(self, unit: int) -> bool:
        return self.all_muted or any(b.muted for b in self._units.get(unit, []))


CONTROLS = ("set_error", "local_reset", "mute", "freeze", "ignore_commands", "local_start", "late", "garbage",
            "set_raw", "set_wash_time", "status", "command_log")


async def serve_control(path: str, sims: Sequence[PlcSimulator]) -> asyncio.AbstractServer:
    """The control protocol of `sim/control.py` (one JSON line in, one out) for a simulator process,
    so tests drive it as they drive the independent PLC. Calls naming a bay go to its simulator;
    the others (late, garbage, mute None, command_log, reopen) to all of them."""

    async def call(op: str, args: list[Any]) -> Any:
        if op == "reopen":
            for s in sims:
                if s.rtu_path is not None:
                    await s.reopen()
            return True
        if op not in CONTROLS:
            raise ValueError(f"unknown operation {op!r}")
        if op == "command_log":
            return sorted((e for s in sims for e in s.command_log()), key=lambda e: e[2])
        if op in ("late", "garbage") or (op == "mute" and args and args[0] is None):
            for s in sims:
                getattr(s, op)(*args)
            return None
        owner = next((s for s in sims if args and args[0] in s.bays), None)
        if owner is None:
            raise KeyError(f"no bay {args[0] if args else None!r}")
        return getattr(owner, op)(*args)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                req = json.loads(await reader.readline())
                reply = {"ok": True, "result": await call(str(req["op"]), list(req.get("args", [])))}
            except Exception as e:  # the caller gets the refusal; the simulator goes on
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(client, path)


def simulate_plc_main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carwash-gateway simulate-plc", description="washbay-v1 PLC simulator")
    ap.add_argument("--rtu", metavar="PATH", help="serve Modbus RTU on this serial device (e.g. a socat pty)")
    ap.add_argument("--tcp", metavar="HOST:PORT", help="serve Modbus TCP")
    ap.add_argument("--bays", type=int, default=0, help="bays bay1..bayN on unit ids 1..N, base 0")
    ap.add_argument("--bay", action="append", default=[], metavar="ID:UNIT:BASE")
    ap.add_argument("--wash-time", type=float, default=10.0)
    ap.add_argument("--baudrate", type=int, default=115200)
    ap.add_argument("--control", metavar="UNIXSOCKET", help="serve the tests' control protocol on this socket")
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
        control = await serve_control(args.control, sims) if args.control else None
        for s in sims:
            where = f"rtu {s.rtu_path}" if s.rtu_path else f"tcp {s.tcp_addr[0]}:{s.tcp_addr[1]}"  # type: ignore[index]
            print(f"plc simulator: {where}: {', '.join(f'{b}@{u}+{base}' for b, u, base in bays)}", flush=True)
        await stop.wait()
        if control is not None:
            control.close()
            await control.wait_closed()
        for s in sims:
            await s.stop()

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main())
    return 0
