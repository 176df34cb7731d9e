"""An independent washbay-v1 PLC on umodbus, written from shared/spec/plc-register-map.md.

It stands for a vendor's PLC: the register map is hard-coded here as a PLC program would have it,
and nothing of the gateway is imported (neither pymodbus nor `plc/`). umodbus decodes the request
PDUs, dispatches them through its route map and builds the replies and exception PDUs; this module
adds the line (RTU framing with CRC on a serial path, or Modbus TCP) and the behaviour of a real
PLC, quirks included:

- several bays behind one unit id at different bases, holding registers only: FC03, FC06, FC16;
  any other function code gets exception 1, any address past the registers exception 2;
- a command is taken when `cmd` becomes non-zero, however it was written (one FC16 of the block or
  FC06/FC16 pieces), with the cmd_course and cmd_seq in the registers at that moment; `cmd` is then
  cleared to 0, cmd_course and cmd_seq read back as written; a command whose cmd_seq equals ack_seq
  is a repeat and is not acted on again;
- errors latch: a fault puts the bay in ERROR (5) with its code, and the bay stays there after the
  fault is gone until RESET_ERROR (cmd 3, a new cmd_seq) or the reset button on the panel;
- RTU: only its own unit ids answer (a frame for another unit is silence, as on a shared line);
  a frame with a bad CRC is dropped with everything up to the next 3.5-character silence;
- TCP: one connection at a time (the next one waits in the listen backlog until the first closes),
  and the unit id is ignored (every unit id answers from the same registers);
- faults: `late` answers every request (or every N-th) D seconds after it arrived, strictly in
  arrival order (a slow scan: a request that comes in meanwhile is answered after the late one); `mute` (no answer),
  `freeze` (heartbeat stops), `garbage` (random bytes instead of each reply); SIGSTOP/SIGCONT of the
  process stop and resume everything, as a hung PLC would.

Run: `python -m sim.plc_umodbus --rtu PATH | --tcp HOST:PORT --bay ID:UNIT:BASE ... --wash-time S
--control UNIXSOCKET`. It prints one line starting with "plc simulator:" once it serves; the
control socket speaks `sim.control`'s protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import termios
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from umodbus.client.serial.redundancy_check import get_crc
from umodbus.exceptions import IllegalDataAddressError, IllegalFunctionError, ModbusError
from umodbus.functions import create_function_from_request_pdu
from umodbus.route import Map
from umodbus.utils import pack_exception_pdu, pack_mbap

# washbay-v1, as the PLC program has it (offsets from a bay's base).
CMD, CMD_COURSE, CMD_SEQ = 0, 1, 2
STATE, PROGRESS, ACK_SEQ, ERROR_CODE, COURSE, HEARTBEAT, COUNTER_HI, COUNTER_LO = range(10, 18)
SPAN = 18
IDLE, STARTING, WASHING, DONE, CANCELED, ERROR = range(6)
STATE_NAMES = ("IDLE", "STARTING", "WASHING", "DONE", "CANCELED", "ERROR")
START, STOP, RESET_ERROR = 1, 2, 3
COURSES = (1, 2, 3)
FUNCTIONS = (3, 6, 16)  # holding registers only
ILLEGAL_DATA_VALUE = 3
TICK_SEC = 0.05
READY_LINE = "plc simulator:"


@dataclass
class Bay:
    """One bay's program state. `fault` is the live fault condition; `error_code` what is latched."""

    bay_id: str
    unit: int
    base: int
    wash_time: float
    state: int = IDLE
    progress: int = 0
    ack_seq: int = 0
    error_code: int = 0
    course: int = 0
    heartbeat: int = 0
    session_counter: int = 0
    cmd: list[int] = field(default_factory=lambda: [0, 0, 0])
    fault: int = 0
    frozen: bool = False
    muted: bool = False
    ignore_commands: bool = False
    phase_at: float = 0.0
    raw: dict[int, int] = field(default_factory=dict)


class WashbayPlc:
    """The PLC's program and registers, no I/O. `handle(unit, pdu)` answers one request PDU
    (None: no answer). With `unit_ignored` (TCP) every unit id reaches the same registers."""

    def __init__(self, bays: Sequence[tuple[str, int, int]], *, wash_time: float, start_delay: float = 0.5,
                 done_hold: float = 2.0, unit_ignored: bool = False) -> None:
        self.bays = {b: Bay(b, u, base, wash_time) for b, u, base in bays}
        self.start_delay = start_delay
        self.done_hold = done_hold
        self.unit_ignored = unit_ignored
        self.all_muted = False
        self.command_log: list[tuple[str, int, float]] = []
        # One register space per unit id (one for all on TCP): its bays and its size.
        self.spaces: dict[int, list[Bay]] = {}
        for b in self.bays.values():
            self.spaces.setdefault(0 if unit_ignored else b.unit, []).append(b)
        for space in self.spaces.values():
            bases = sorted(b.base for b in space)
            if any(nxt - cur < SPAN for cur, nxt in pairwise(bases)):
                raise ValueError(f"bays overlap in one register space: bases {bases}")
        self.memory = {k: [0] * (max(b.base for b in v) + SPAN) for k, v in self.spaces.items()}
        self.routes = Map()
        for key, size in ((k, len(m)) for k, m in self.memory.items()):
            units = None if unit_ignored else [key]
            self.routes.add_rule(self._reader(key), units, [3], range(size))
            self.routes.add_rule(self._writer(key), units, [6, 16], range(size))
        self._last_beat = time.monotonic()

    # --- requests ------------------------------------------------------------------------------

    def serves(self, unit: int) -> bool:
        return self.unit_ignored or unit in self.spaces

    def muted(self, unit: int) -> bool:
        key = 0 if self.unit_ignored else unit
        return self.all_muted or any(b.muted for b in self.spaces.get(key, []))

    def handle(self, unit: int, pdu: bytes) -> bytes | None:
        """The response PDU to one request PDU; None when this PLC stays silent (muted)."""
        if not self.serves(unit) or self.muted(unit):
            return None
        self.tick(time.monotonic())
        fc = pdu[0]
        if fc not in FUNCTIONS:
            return bytes(pack_exception_pdu(fc, IllegalFunctionError.error_code))
        key = 0 if self.unit_ignored else unit
        try:
            function = create_function_from_request_pdu(pdu)
            if fc == 16:
                # umodbus writes register by register and stops at the first bad one; a PLC
                # refuses the whole request instead, before any register changes.
                end = function.starting_address + len(function.values)
                if end > len(self.memory[key]):
                    raise IllegalDataAddressError()
            results = function.execute(unit, self.routes)
        except ModbusError as e:
            return bytes(pack_exception_pdu(fc, e.error_code))
        except (struct.error, ValueError, IndexError):
            return bytes(pack_exception_pdu(fc, ILLEGAL_DATA_VALUE))
        if fc == 3:
            return bytes(function.create_response_pdu(results))
        self._take_commands(key)
        return bytes(function.create_response_pdu())

    def _reader(self, key: int) -> Callable[..., int]:
        def read(slave_id: int, address: int, function_code: int) -> int:
            for b in self.spaces[key]:
                if b.base <= address < b.base + SPAN:
                    return self._register(b, address - b.base)
            return self.memory[key][address]
        return read

    def _writer(self, key: int) -> Callable[..., None]:
        def write(slave_id: int, address: int, value: int, function_code: int) -> None:
            for b in self.spaces[key]:
                off = address - b.base
                if 0 <= off <= CMD_SEQ:
                    b.cmd[off] = value
                    return
                if 0 <= off < SPAN:
                    return  # status registers belong to the program: its next scan rewrites them
            self.memory[key][address] = value
        return write

    def _register(self, b: Bay, off: int) -> int:
        if off in b.raw:
            return b.raw[off]
        if off <= CMD_SEQ:
            return b.cmd[off]
        return {STATE: b.state, PROGRESS: b.progress, ACK_SEQ: b.ack_seq, ERROR_CODE: b.error_code,
                COURSE: b.course, HEARTBEAT: b.heartbeat, COUNTER_HI: b.session_counter >> 16,
                COUNTER_LO: b.session_counter & 0xFFFF}.get(off, 0)

    # --- the program ---------------------------------------------------------------------------

    def _take_commands(self, key: int) -> None:
        now = time.monotonic()
        for b in self.spaces[key]:
            cmd, course, seq = b.cmd
            if cmd == 0:
                continue
            b.cmd[CMD] = 0
            self.command_log.append((b.bay_id, cmd, now))
            if b.ignore_commands or seq == 0 or seq == b.ack_seq:
                continue  # not taken; a repeated cmd_seq was already acted on
            if cmd == START and b.state in (IDLE, DONE, CANCELED) and course in COURSES:
                b.ack_seq = seq
                self._begin(b, course, now)
            elif cmd == STOP and b.state in (STARTING, WASHING):
                b.ack_seq, b.state, b.phase_at = seq, CANCELED, now
            elif cmd == RESET_ERROR:
                b.ack_seq = seq
                self._reset(b)

    def _begin(self, b: Bay, course: int, now: float) -> None:
        b.course, b.state, b.progress, b.phase_at = course, STARTING, 0, now
        b.session_counter = (b.session_counter + 1) & 0xFFFFFFFF

    def _reset(self, b: Bay) -> bool:
        """Clear a latched error; refused while the fault is still there."""
        if b.state != ERROR or b.fault:
            return False
        b.state, b.error_code, b.progress = IDLE, 0, 0
        return True

    def tick(self, now: float) -> None:
        """One PLC scan: faults, phases, heartbeat."""
        beat = now - self._last_beat >= 1.0
        if beat:
            self._last_beat += 1.0
            if now - self._last_beat > 1.0:  # the process was stopped: no burst of beats after SIGCONT
                self._last_beat = now
        for b in self.bays.values():
            if beat and not b.frozen:
                b.heartbeat = (b.heartbeat + 1) & 0xFFFF
            if b.fault:
                b.state, b.error_code = ERROR, b.fault
                continue
            if b.state == STARTING and now - b.phase_at >= self.start_delay:
                b.state, b.phase_at = WASHING, now
            if b.state == WASHING:
                frac = (now - b.phase_at) / b.wash_time if b.wash_time > 0 else 1.0
                b.progress = min(100, int(frac * 100))
                if frac >= 1.0:
                    b.state, b.progress, b.phase_at = DONE, 100, now
            elif b.state in (DONE, CANCELED) and now - b.phase_at >= self.done_hold:
                b.state, b.progress = IDLE, 0

    # --- the panel and the test bench (control operations) -------------------------------------

    def set_error(self, bay: str, code: int) -> None:
        b = self.bays[bay]
        b.fault = int(code)
        self.tick(time.monotonic())

    def local_reset(self, bay: str) -> bool:
        return self._reset(self.bays[bay])

    def local_start(self, bay: str, course: int) -> bool:
        b = self.bays[bay]
        if b.state not in (IDLE, DONE, CANCELED) or course not in COURSES:
            return False
        self._begin(b, course, time.monotonic())
        return True

    def mute(self, bay: str | None, on: bool) -> None:
        if bay is None:
            self.all_muted = bool(on)
        else:
            self.bays[bay].muted = bool(on)

    def freeze(self, bay: str, on: bool) -> None:
        self.bays[bay].frozen = bool(on)

    def ignore_commands(self, bay: str, on: bool) -> None:
        self.bays[bay].ignore_commands = bool(on)

    def set_raw(self, bay: str, offset: int, value: int) -> None:
        b = self.bays[bay]
        if value < 0:
            b.raw.pop(offset, None)
        else:
            b.raw[offset] = value

    def set_wash_time(self, bay: str, seconds: float) -> None:
        self.bays[bay].wash_time = float(seconds)

    def status(self, bay: str) -> dict[str, Any]:
        b = self.bays[bay]
        return {"state": STATE_NAMES[b.state], "progress": b.progress, "ack_seq": b.ack_seq,
                "error_code": b.error_code, "course": b.course, "heartbeat": b.heartbeat,
                "session_counter": b.session_counter, "fault": b.fault, "cmd": list(b.cmd)}


@dataclass
class _Request:
    arrived: float
    unit: int
    pdu: bytes
    send: Callable[[bytes], None]  # frames a response PDU (or raw bytes, for garbage) onto the line
    frame: Callable[[int, bytes], bytes]


class PlcServer:
    """The PLC on its line: RTU on a serial path or Modbus TCP, one reply pipeline in arrival order."""

    def __init__(self, plc: WashbayPlc, *, rtu: str | None = None, tcp: tuple[str, int] | None = None,
                 baudrate: int = 115200) -> None:
        self.plc = plc
        self.rtu_path = rtu
        self.tcp_addr = tcp
        # 3.5 characters of 11 bits, fixed 1.75 ms above 19200 baud (Modbus over serial line, 2.5.1.1).
        self.t35 = 3.5 * 11 / baudrate if baudrate <= 19200 else 0.00175
        self.late_s = 0.0
        self.late_every = 1
        self._replied = 0
        self.garbage_on = False
        self.line_open = asyncio.Event()
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._fd: int | None = None
        self._buf = bytearray()
        self._discarding = False
        self._silence: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lsock: socket.socket | None = None

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._replies(), name="plc-replies"))
        self._tasks.append(asyncio.create_task(self._scan(), name="plc-scan"))
        if self.rtu_path is not None:
            self._open_line()
            self._tasks.append(asyncio.create_task(self._keep_line(), name="plc-line"))
        else:
            assert self.tcp_addr is not None
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(self.tcp_addr)
            ls.listen(4)
            ls.setblocking(False)
            self._lsock = ls
            self.line_open.set()
            self._tasks.append(asyncio.create_task(self._accept(), name="plc-accept"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._close_line()
        if self._lsock is not None:
            self._lsock.close()

    async def _scan(self) -> None:
        while True:
            self.plc.tick(time.monotonic())
            await asyncio.sleep(TICK_SEC)

    def late(self, delay_s: float, every: int = 1) -> None:
        """Hold every `every`-th reply from now on until D s after its request arrived (0: off)."""
        self.late_s, self.late_every, self._replied = max(0.0, float(delay_s)), max(1, int(every)), 0

    async def _replies(self) -> None:
        """Answer requests one at a time in arrival order; a late reply holds up the ones behind it."""
        loop = asyncio.get_running_loop()
        while True:
            req = await self._queue.get()
            self._replied += 1
            if self.late_s and self._replied % self.late_every == 0:
                wait = req.arrived + self.late_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            pdu = self.plc.handle(req.unit, req.pdu)
            if pdu is None:
                continue
            frame = req.frame(req.unit, pdu)
            with contextlib.suppress(OSError, ConnectionError):
                req.send(os.urandom(len(frame)) if self.garbage_on else frame)

    # --- RTU -----------------------------------------------------------------------------------

    def _open_line(self) -> bool:
        try:
            fd = os.open(self.rtu_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)  # type: ignore[arg-type]
        except OSError:
            return False
        with contextlib.suppress(termios.error):
            tty.setraw(fd)
        self._fd = fd
        self._buf.clear()
        asyncio.get_running_loop().add_reader(fd, self._readable)
        self.line_open.set()
        return True

    def _close_line(self) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        self.line_open.clear()

    async def _keep_line(self) -> None:
        """The line vanished (socat killed, adapter unplugged): open it again once it is back."""
        while True:
            await asyncio.sleep(0.1)
            if self._fd is None:
                self._open_line()

    def reopen(self) -> None:
        self._close_line()
        self._open_line()

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_line()
            return
        loop = asyncio.get_running_loop()
        self._buf += data
        if self._silence is not None:
            self._silence.cancel()
        self._silence = loop.call_later(self.t35, self._on_silence)
        if not self._discarding:
            self._frames(loop.time())

    def _frames(self, now: float) -> None:
        """Take every complete request frame at the head of the buffer (length from the function
        code, as PLC stacks do); a bad CRC discards the rest until the line is silent."""
        while len(self._buf) >= 4:
            fc = self._buf[1]
            if fc in (1, 2, 3, 4, 5, 6):
                size = 8
            elif fc in (15, 16):
                if len(self._buf) < 7:
                    return
                size = 9 + self._buf[6]
            else:
                return  # unknown length: the silence after it ends the frame
            if len(self._buf) < size:
                return
            frame = bytes(self._buf[:size])
            del self._buf[:size]
            if get_crc(frame[:-2]) != frame[-2:]:
                self._discarding = True
                return
            self._rtu_request(frame, now)

    def _on_silence(self) -> None:
        self._silence = None
        if not self._discarding and len(self._buf) >= 4 and get_crc(bytes(self._buf[:-2])) == bytes(self._buf[-2:]):
            self._rtu_request(bytes(self._buf), asyncio.get_running_loop().time())
        self._buf.clear()
        self._discarding = False

    def _rtu_request(self, frame: bytes, now: float) -> None:
        unit = frame[0]
        if unit == 0 or not self.plc.serves(unit):
            return  # another slave's frame, or a broadcast (this PLC takes none)
        fd = self._fd

        def send(data: bytes) -> None:
            if fd is not None and fd == self._fd:
                os.write(fd, data)

        self._queue.put_nowait(_Request(now, unit, frame[1:-2], send, _rtu_frame))

    # --- TCP -----------------------------------------------------------------------------------

    async def _accept(self) -> None:
        """One connection at a time: the next is accepted only when this one has ended, so a second
        client's connect completes in the kernel backlog and its requests wait, as on a small PLC."""
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            conn, _ = await loop.sock_accept(self._lsock)
            try:
                await self._connection(conn)
            finally:
                conn.close()

    async def _connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(sock=conn)
        try:
            while True:
                head = await reader.readexactly(7)
                tid, pid, length, unit = struct.unpack(">HHHB", head)
                if pid != 0 or not 2 <= length <= 254:
                    return  # not Modbus: drop the connection
                pdu = await reader.readexactly(length - 1)

                def frame(unit: int, resp: bytes, tid: int = tid) -> bytes:
                    return bytes(pack_mbap(tid, 0, len(resp) + 1, unit)) + resp

                def send(data: bytes) -> None:
                    if not writer.is_closing():
                        writer.write(data)

                self._queue.put_nowait(_Request(loop.time(), unit, pdu, send, frame))
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _rtu_frame(unit: int, pdu: bytes) -> bytes:
    adu = bytes([unit]) + pdu
    return adu + bytes(get_crc(adu))


# --- control socket -------------------------------------------------------------------------------


async def serve_control(path: str, dispatch: Callable[[str, list[Any]], Any]) -> asyncio.AbstractServer:
    """Serve sim.control's protocol on a Unix socket: one JSON line in, one out, per connection."""

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                req = json.loads(line)
                result = dispatch(str(req["op"]), list(req.get("args", [])))
                if asyncio.iscoroutine(result):
                    result = await result
                reply = {"ok": True, "result": result}
            except Exception as e:  # the caller gets the refusal; the PLC goes on
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(client, path)


CONTROLS = ("set_error", "local_reset", "mute", "freeze", "ignore_commands", "local_start", "set_raw",
            "set_wash_time", "status")


def _dispatcher(server: PlcServer) -> Callable[[str, list[Any]], Any]:
    def dispatch(op: str, args: list[Any]) -> Any:
        if op in CONTROLS:
            return getattr(server.plc, op)(*args)
        if op == "late":
            server.late(*args)
            return None
        if op == "garbage":
            server.garbage_on = bool(args[0])
            return None
        if op == "command_log":
            return server.plc.command_log
        if op == "reopen":
            if server.rtu_path is not None:
                server.reopen()
            return server.line_open.is_set()
        raise ValueError(f"unknown operation {op!r}")
    return dispatch


def parse_bay(spec: str) -> tuple[str, int, int]:
    try:
        bay, unit, base = spec.split(":")
        return bay, int(unit), int(base)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bay {spec!r}: expected ID:UNIT:BASE") from None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.plc_umodbus", description=__doc__.split("\n")[0])
    line = ap.add_mutually_exclusive_group(required=True)
    line.add_argument("--rtu", metavar="PATH", help="serve Modbus RTU on this serial path (e.g. a socat pty)")
    line.add_argument("--tcp", metavar="HOST:PORT", help="serve Modbus TCP")
    ap.add_argument("--bay", action="append", type=parse_bay, required=True, metavar="ID:UNIT:BASE")
    ap.add_argument("--wash-time", type=float, default=10.0)
    ap.add_argument("--start-delay", type=float, default=0.5)
    ap.add_argument("--done-hold", type=float, default=2.0)
    ap.add_argument("--baudrate", type=int, default=115200)
    ap.add_argument("--control", metavar="UNIXSOCKET", help="serve the control protocol (sim.control) here")
    args = ap.parse_args(argv)
    tcp = None
    if args.tcp:
        host, port = args.tcp.rsplit(":", 1)
        tcp = (host, int(port))
    try:
        plc = WashbayPlc(args.bay, wash_time=args.wash_time, start_delay=args.start_delay, done_hold=args.done_hold,
                         unit_ignored=tcp is not None)
    except ValueError as e:
        ap.error(str(e))

    async def run() -> None:
        server = PlcServer(plc, rtu=args.rtu, tcp=tcp, baudrate=args.baudrate)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await server.start()
        control = await serve_control(args.control, _dispatcher(server)) if args.control else None
        where = f"rtu {args.rtu}" if args.rtu else f"tcp {args.tcp}"
        bays = ", ".join(f"{b}@{u}+{base}" for b, u, base in args.bay)
        print(f"{READY_LINE} {where}: {bays} (umodbus)", flush=True)
        await stop.wait()
        if control is not None:
            control.close()
            await control.wait_closed()
        await server.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
