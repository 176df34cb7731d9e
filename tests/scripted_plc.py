"""A scripted Modbus peer for fieldbus tests: answers each request in order, some of them late
(as the test chooses), with registers that say which address was read.

It knows no washbay logic and no Modbus library: it parses request frames itself (RTU on the PLC
end of a socat pty pair, or Modbus TCP on a loopback port) and answers a read of address A with
the poll block of a bay whose `ack_seq` register is A's bay base (A - 10), so a reply credited to
the wrong request is visible in the decoded status.

`late(n)` says whether the n-th request (from 0) is answered late: its reply is held back until the
next request arrives, and then sent at once, ahead of that request's own reply, as a PLC whose scan
overran answers after the gateway gave up and sent its next request. The late reply thus always
lands while the next transaction is in flight, whatever the speed of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass, field

from plc.frames import crc16

POLL_OFFSET = 10


def poll_block(address: int, count: int, beat: int) -> list[int]:
    """IDLE, progress 0, ack_seq = the bay's base, heartbeat `beat`, session counter = base."""
    base = address - POLL_OFFSET
    regs = [0, 0, base & 0xFFFF, 0, 0, beat & 0xFFFF, 0, base & 0xFFFF]
    return (regs + [0] * count)[:count]


@dataclass
class ScriptedPlc:
    late: Callable[[int], bool] = lambda n: False
    requests: int = 0
    answered: int = 0
    late_sent: int = 0
    log: list[tuple[int, int, int, int]] = field(default_factory=list)  # (n, unit, function, address)
    _held: tuple[int, bytes, int | None] | None = None
    _send: Callable[[bytes], None] = lambda data: None

    def reply_pdu(self, function: int, address: int, count: int, n: int) -> bytes:
        if function == 3:
            regs = poll_block(address, count, n)
            return bytes((3, 2 * count)) + b"".join(struct.pack(">H", r) for r in regs)
        if function == 16:
            return bytes((16,)) + struct.pack(">HH", address, count)
        return bytes((function | 0x80, 1))

    def _answer(self, n: int, request: bytes, tid: int | None) -> None:
        unit, function = request[0], request[1]
        address, count = struct.unpack(">HH", request[2:6])
        pdu = self.reply_pdu(function, address, count, n)
        if tid is None:
            frame = bytes((unit,)) + pdu
            self._send(frame + crc16(frame).to_bytes(2, "little"))
        else:
            self._send(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)
        self.answered += 1

    def _take(self, unit_pdu: bytes, tid: int | None) -> None:
        n = self.requests
        self.requests += 1
        address = struct.unpack(">H", unit_pdu[2:4])[0]
        self.log.append((n, unit_pdu[0], unit_pdu[1], address))
        if self._held is not None:
            held, self._held = self._held, None
            self._answer(*held)
            self.late_sent += 1
        if self.late(n):
            self._held = (n, unit_pdu, tid)
        else:
            self._answer(n, unit_pdu, tid)

    async def stop(self) -> None:
        self._held = None


class ScriptedRtuPlc(ScriptedPlc):
    """On the PLC end of a pty pair."""

    def __init__(self, path: str, late: Callable[[int], bool] = lambda n: False) -> None:
        super().__init__(late=late)
        self.path = path
        self._fd = -1
        self._buf = bytearray()

    async def start(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        attrs = termios.tcgetattr(self._fd)
        attrs[3] &= ~(termios.ICANON | termios.ECHO)
        termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
        self._send = self._write
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def garbage(self, data: bytes) -> None:
        os.write(self._fd, data)

    def _readable(self) -> None:
        try:
            self._buf += os.read(self._fd, 4096)
        except BlockingIOError:
            return
        while len(self._buf) >= 8:
            fc = self._buf[1]
            size = 9 + self._buf[6] if fc == 16 else 8
            if len(self._buf) < size:
                return
            frame = bytes(self._buf[:size])
            del self._buf[:size]
            if crc16(frame[:-2]) == int.from_bytes(frame[-2:], "little"):
                self._take(frame[:-2], None)

    async def stop(self) -> None:
        await super().stop()
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class ScriptedTcpPlc(ScriptedPlc):
    """A Modbus TCP server on 127.0.0.1 (one connection at a time, as small PLCs)."""

    def __init__(self, late: Callable[[int], bool] = lambda n: False, port: int = 0) -> None:
        super().__init__(late=late)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._send = writer.write
        self._held = None  # a new connection: nothing of the old one is owed on it
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _pid, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                self._take(bytes((unit,)) + pdu, tid)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(me)

    async def stop(self) -> None:
        for t in list(self._handlers):
            t.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await super().stop()
