"""A reply is only ever credited to the request it answers (docs/decisions.md, "Fieldbus truth").

The bus scheduler talks to a scripted PLC (tests/scripted_plc.py: its own frame parser, no Modbus
library) that answers some requests long after the gateway's timeout, on a real socat pty pair
and over TCP. Four bays sit behind one unit id at bases 0/100/200/300, so their poll replies have
the same size and no address; every reply says which base it was read from, and a poll credited
to the wrong bay shows up as a wrong `ack_seq`. The frame codec itself is tested on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from plc.bus import BayAddress, BusScheduler, BusSettings, PollResult
from plc.frames import (
    FrameError,
    Request,
    RtuReader,
    TcpReader,
    answers,
    crc16,
    rtu_frame,
    tcp_frame,
)
from plc.profile import builtin_profiles
from sim.pty import SocatPair
from tests.scripted_plc import ScriptedRtuPlc, ScriptedTcpPlc
from tests.test_plc import Collector

P = builtin_profiles()["washbay-v1"]
BASES = (0, 100, 200, 300)


def every_10th(n: int) -> bool:
    """Requests 5, 15, 25, ... are answered late, during the transaction after them."""
    return n % 10 == 5


class Polls(Collector):
    """The poll results, and a wait on any condition of them."""

    async def until(self, pred, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()

    def ok(self) -> list[PollResult]:
        return [r for r in self.results if r.status is not None]


def bays() -> list[BayAddress]:
    return [BayAddress(f"bay{b // 100 + 1}", 1, b, P, 0.02) for b in BASES]


def misattributed(polls: Polls) -> list[PollResult]:
    base = {f"bay{b // 100 + 1}": b for b in BASES}
    return [r for r in polls.ok() if r.status is not None and r.status.ack_seq != base[r.bay_id]]


# --- the codec ---------------------------------------------------------------------------------

def test_rtu_frames_round_trip_and_are_checked() -> None:
    req = Request.read(1, 110, 8)
    frame = rtu_frame(req)
    assert frame[:6] == bytes((1, 3, 0, 110, 0, 8)) and crc16(frame) == 0  # a frame with its CRC sums to 0
    reader = RtuReader()
    reply = bytes((1, 3, 16)) + bytes(range(16))
    stale_other_size = bytes((1, 3, 2, 0, 7))
    for body in (stale_other_size, reply):
        reader.feed(body + crc16(body).to_bytes(2, "little"))
    first, second = list(reader.frames())
    assert not answers(first, req) and answers(second, req)  # the size tells a fence's reply apart
    assert second.registers[0] == 0x0001
    # A write's echo must name the same address and count.
    w = Request.write(1, 0, [1, 2, 3])
    echo = bytes((1, 16, 0, 0, 0, 3))
    reader.feed(echo + crc16(echo).to_bytes(2, "little"))
    assert answers(next(reader.frames()), w) and not answers(next(iter([first])), w)
    # An exception reply answers its unit and function.
    exc = bytes((1, 0x83, 2))
    reader.feed(exc + crc16(exc).to_bytes(2, "little"))
    e = next(reader.frames())
    assert e.exception == 2 and answers(e, req) and not answers(e, Request.read(2, 110, 8))
    # Noise: a bad CRC, or a function no reply has.
    reader.feed(reply + b"\x00\x00")
    with pytest.raises(FrameError, match="CRC"):
        list(reader.frames())
    reader.feed(bytes((1, 0x2B, 0, 0, 0)))
    with pytest.raises(FrameError, match="function 0x2b"):
        list(reader.frames())
    assert reader.pending == 0


def test_tcp_frames_carry_the_transaction_id() -> None:
    req = Request.read(1, 10, 8)
    assert tcp_frame(req, 7) == struct.pack(">HHHB", 7, 0, 6, 1) + bytes((3, 0, 10, 0, 8))
    reader = TcpReader()
    pdu = bytes((3, 16)) + bytes(16)
    reader.feed(struct.pack(">HHHB", 6, 0, len(pdu) + 1, 1) + pdu + struct.pack(">HHHB", 7, 0, len(pdu) + 1, 1))
    (stale,) = list(reader.frames())
    reader.feed(pdu)
    (mine,) = list(reader.frames())
    assert (stale.tid, mine.tid) == (6, 7) and answers(mine, req)
    reader.feed(struct.pack(">HHHB", 8, 5, 3, 1) + bytes((0x83, 2)))
    with pytest.raises(FrameError, match="protocol id 5"):
        list(reader.frames())


# --- the bus against a PLC that answers late --------------------------------------------------

@contextlib.asynccontextmanager
async def running_bus(settings: BusSettings) -> AsyncIterator[tuple[BusScheduler, Polls]]:
    polls = Polls()
    bus = BusScheduler(settings, bays(), polls, offline_after=3, backoff_max=0.2)
    task = asyncio.create_task(bus.run(), name="bus")
    try:
        yield bus, polls
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def rtu_line(tmp_path: Path, late: Callable[[int], bool] = lambda n: False) -> AsyncIterator[
        tuple[ScriptedRtuPlc, BusScheduler, Polls]]:
    """The scripted PLC on one end of a socat pty pair, the bus scheduler on the other."""
    pair = SocatPair(tmp_path / "pty")
    await asyncio.to_thread(pair.start)
    plc = ScriptedRtuPlc(pair.plc_path, late=late)
    await plc.start()
    try:
        async with running_bus(BusSettings(name="rs485", type="rtu", device=pair.gateway_path, baudrate=115200,
                                           timeout=0.05)) as (bus, polls):
            yield plc, bus, polls
    finally:
        await plc.stop()
        await asyncio.to_thread(pair.stop)


async def test_rtu_late_replies_are_never_credited_to_the_next_request(tmp_path: Path) -> None:
    async with rtu_line(tmp_path, every_10th) as (plc, bus, polls):
        await polls.until(lambda: len(polls.ok()) >= 120 and plc.late_sent >= 5)
        stats = bus.line_stats()
    assert misattributed(polls) == []
    # The late replies reached the gateway during later transactions, and were dropped as stale.
    assert stats["stale_dropped"] >= 5 and stats["fences"] >= 5
    assert {r.bay_id for r in polls.ok()} == {"bay1", "bay2", "bay3", "bay4"}


async def test_rtu_garbage_on_the_line_costs_one_poll_and_nothing_is_misread(tmp_path: Path) -> None:
    async with rtu_line(tmp_path) as (plc, bus, polls):
        await polls.until(lambda: len(polls.ok()) >= 8)
        for _ in range(3):
            plc.garbage(bytes(range(1, 40)))
            n = len(polls.ok())
            await polls.until(lambda: len(polls.ok()) >= n + 8)  # noqa: B023 - awaited in this iteration
        stats = bus.line_stats()
    assert misattributed(polls) == []
    assert stats["bad_frames"] + stats["drained_bytes"] + stats["stale_dropped"] > 0


async def test_tcp_late_replies_are_told_apart_by_transaction_id() -> None:
    plc = ScriptedTcpPlc(late=every_10th)
    await plc.start()
    try:
        async with running_bus(BusSettings(name="lan", type="tcp", host="127.0.0.1", port=plc.port,
                                           timeout=0.05)) as (bus, polls):
            await polls.until(lambda: len(polls.ok()) >= 120 and plc.late_sent >= 5)
            stats = bus.line_stats()
    finally:
        await plc.stop()
    assert misattributed(polls) == []
    assert stats["stale_dropped"] >= 1 and stats["fences"] == 0
