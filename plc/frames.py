"""Modbus frames, pure: requests built, replies parsed and checked against the request they answer.

Only what the gateway sends is built: read holding registers (0x03) and write multiple registers
(0x10). A reply is parsed in full (unit, function, byte count, CRC or MBAP header) before any
register is decoded, and `answers()` says whether it is the reply to a given request. On RTU a
read reply carries no address, so two reads of the same size to the same unit have replies that
look alike: telling them apart is the transaction layer's job (`plc.transact`), not the frame's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

READ_HOLDING = 0x03
WRITE_MULTIPLE = 0x10
MAX_READ = 125
MAX_WRITE = 123


class FrameError(ValueError):
    """Bytes that cannot be a reply (bad CRC, bad header, impossible length): line noise or a
    foreign talker. The message names what is wrong."""


@dataclass(frozen=True)
class Request:
    unit: int
    function: int
    address: int
    count: int
    values: tuple[int, ...] = ()

    @classmethod
    def read(cls, unit: int, address: int, count: int) -> Request:
        if not 1 <= count <= MAX_READ:
            raise ValueError(f"count={count}: 1..{MAX_READ} registers")
        return cls(_unit(unit), READ_HOLDING, _address(address, count), count)

    @classmethod
    def write(cls, unit: int, address: int, values: tuple[int, ...] | list[int]) -> Request:
        vals = tuple(int(v) for v in values)
        if not 1 <= len(vals) <= MAX_WRITE or any(not 0 <= v <= 0xFFFF for v in vals):
            raise ValueError(f"values: 1..{MAX_WRITE} registers of 0..65535")
        return cls(_unit(unit), WRITE_MULTIPLE, _address(address, len(vals)), len(vals), vals)

    def pdu(self) -> bytes:
        head = bytes((self.function,)) + self.address.to_bytes(2, "big") + self.count.to_bytes(2, "big")
        if self.function == READ_HOLDING:
            return head
        return head + bytes((2 * self.count,)) + b"".join(v.to_bytes(2, "big") for v in self.values)

    def shape(self) -> tuple[int, int]:
        """What a reply of this request is recognised by on RTU: (function, registers)."""
        return (self.function, self.count)


@dataclass(frozen=True)
class Reply:
    unit: int
    function: int  # without the exception bit
    exception: int | None = None
    registers: tuple[int, ...] = ()
    address: int | None = None  # the echo of a write
    count: int | None = None
    tid: int | None = None  # Modbus TCP only


def answers(reply: Reply, request: Request) -> bool:
    """True when `reply` has the unit, function and size of `request`'s reply (and, for a write,
    its echo). An exception reply answers any request of its unit and function."""
    if reply.unit != request.unit or reply.function != request.function:
        return False
    if reply.exception is not None:
        return True
    if request.function == READ_HOLDING:
        return len(reply.registers) == request.count
    return reply.address == request.address and reply.count == request.count


def _unit(unit: int) -> int:
    if not 0 <= unit <= 247:
        raise ValueError(f"unit={unit}: 0..247")
    return unit


def _address(address: int, count: int) -> int:
    if not 0 <= address or address + count > 0x10000:
        raise ValueError(f"address={address}: the registers must lie in 0..65535")
    return address


# --- RTU -------------------------------------------------------------------------------------------

def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus CRC-16 (poly 0xA001 reflected, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def rtu_frame(request: Request) -> bytes:
    body = bytes((request.unit,)) + request.pdu()
    return body + crc16(body).to_bytes(2, "little")


def _pdu_length(pdu_start: bytes) -> int | None:
    """Length of a reply PDU from its first bytes; None until enough bytes are there."""
    if not pdu_start:
        return None
    fc = pdu_start[0]
    if fc & 0x80:
        return 2
    if fc == READ_HOLDING or fc == 0x04:
        if len(pdu_start) < 2:
            return None
        return 2 + pdu_start[1]
    if fc in (0x05, 0x06, WRITE_MULTIPLE, 0x0F):
        return 5
    raise FrameError(f"function 0x{fc:02x} is not a reply the gateway asks for")


def parse_pdu(unit: int, pdu: bytes, tid: int | None = None) -> Reply:
    """A whole reply PDU → Reply, or FrameError naming what does not hold together."""
    fc = pdu[0]
    if fc & 0x80:
        if len(pdu) != 2:
            raise FrameError(f"exception reply of {len(pdu)} bytes")
        return Reply(unit, fc & 0x7F, exception=pdu[1], tid=tid)
    if fc in (READ_HOLDING, 0x04):
        count = pdu[1] if len(pdu) > 1 else -1
        if count != len(pdu) - 2 or count % 2 or count == 0:
            raise FrameError(f"byte count {count} for a {len(pdu) - 2}-byte payload")
        regs = tuple(int.from_bytes(pdu[i:i + 2], "big") for i in range(2, len(pdu), 2))
        return Reply(unit, fc, registers=regs, tid=tid)
    if len(pdu) != 5:
        raise FrameError(f"function 0x{fc:02x} reply of {len(pdu)} bytes")
    return Reply(unit, fc, address=int.from_bytes(pdu[1:3], "big"), count=int.from_bytes(pdu[3:5], "big"), tid=tid)


class _Reader:
    """Bytes received and not yet cut into replies."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> int:
        """Drop what is buffered; returns how many bytes that was."""
        n = len(self._buf)
        self._buf.clear()
        return n

    @property
    def pending(self) -> int:
        return len(self._buf)

    def frames(self) -> Iterator[Reply]:
        raise NotImplementedError


class RtuReader(_Reader):
    """Cuts RTU replies out of the bytes received. `feed()` then iterate `frames()`; a frame whose
    CRC fails, or bytes that start no reply, raise FrameError (the rest of the buffer is dropped:
    after noise the line must be drained anyway)."""

    def frames(self) -> Iterator[Reply]:
        while len(self._buf) >= 2:
            try:
                n = _pdu_length(bytes(self._buf[1:3]))
            except FrameError:
                self._buf.clear()
                raise
            if n is None or len(self._buf) < 1 + n + 2:
                return
            frame = bytes(self._buf[:1 + n + 2])
            del self._buf[:1 + n + 2]
            if crc16(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
                self._buf.clear()
                raise FrameError(f"CRC error in a {len(frame)}-byte frame")
            try:
                yield parse_pdu(frame[0], frame[1:-2])
            except FrameError:
                self._buf.clear()
                raise


# --- TCP -------------------------------------------------------------------------------------------

def tcp_frame(request: Request, tid: int) -> bytes:
    pdu = request.pdu()
    return tid.to_bytes(2, "big") + b"\x00\x00" + (len(pdu) + 1).to_bytes(2, "big") + bytes((request.unit,)) + pdu


class TcpReader(_Reader):
    """Cuts Modbus TCP replies (MBAP header + PDU) out of a stream. A header that cannot be one
    raises FrameError: the stream has lost its framing and the connection must be dropped."""

    def frames(self) -> Iterator[Reply]:
        while len(self._buf) >= 7:
            tid = int.from_bytes(self._buf[0:2], "big")
            pid = int.from_bytes(self._buf[2:4], "big")
            length = int.from_bytes(self._buf[4:6], "big")
            if pid != 0 or not 3 <= length <= 254:
                self._buf.clear()
                raise FrameError(f"MBAP header protocol id {pid}, length {length}")
            if len(self._buf) < 6 + length:
                return
            unit, pdu = self._buf[6], bytes(self._buf[7:6 + length])
            del self._buf[:6 + length]
            try:
                expected = _pdu_length(pdu[:2])
            except FrameError:
                self._buf.clear()
                raise
            if expected != len(pdu):
                self._buf.clear()
                raise FrameError(f"MBAP length {length} for a {expected}-byte PDU")
            yield parse_pdu(unit, pdu, tid)
