"""plc/: the profile as data, the register codec, and the bus scheduler against the simulator
over a real socat pty pair and over TCP."""

from __future__ import annotations

import asyncio
import os
from itertools import pairwise
from pathlib import Path

import pytest

from plc.bus import BayAddress, BusScheduler, BusSettings, PlcError, PollResult, inter_frame_gap
from plc.link import LinkDown, SerialLink
from plc.profile import (
    DecodeError,
    ProfileError,
    builtin_profiles,
    decode_status,
    encode_command,
    load_profile,
    load_profiles,
    next_seq,
)
from sim.demo import free_port
from sim.plc import PlcSimulator
from sim.pty import SocatPair

P = builtin_profiles()["washbay-v1"]


def test_washbay_v1_is_the_spec_page() -> None:
    assert (P.poll_offset, P.poll_count, P.command_offset, P.span) == (10, 8, 0, 18)
    assert dict(P.registers) == {"cmd": 0, "cmd_course": 1, "cmd_seq": 2, "state": 10, "progress": 11, "ack_seq": 12,
                                 "error_code": 13, "course": 14, "heartbeat": 15, "session_counter": 16}
    assert dict(P.courses) == {1: "BASIC", 2: "STANDARD", 3: "PREMIUM"}
    assert dict(P.commands) == {"START": 1, "STOP": 2, "RESET_ERROR": 3}
    assert P.error_name(4) == "DOOR_OPEN" and P.error_name(0) is None and P.error_name(42) == "PLC_ERROR_42"
    assert dict(P.states)[5] == "ERROR"


def test_decode_and_encode() -> None:
    s = decode_status(P, [2, 45, 7, 0, 3, 99, 1, 2])
    assert (s.state, s.progress, s.ack_seq, s.course, s.heartbeat, s.session_counter) == (
        "WASHING", 45, 7, "PREMIUM", 99, 65538)
    with pytest.raises(DecodeError, match="state=9"):
        decode_status(P, [9, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(DecodeError, match="progress=250"):
        decode_status(P, [2, 250, 0, 0, 0, 0, 0, 0])
    with pytest.raises(DecodeError, match="registers=7"):
        decode_status(P, [0] * 7)
    assert encode_command(P, "START", 2, 65535) == [1, 2, 65535]
    assert encode_command(P, "STOP", 0, 1) == [2, 0, 1]
    with pytest.raises(ValueError):
        encode_command(P, "START", 1, 0)
    assert next_seq(65535) == 1 and next_seq(1) == 2


def test_site_profile_file_and_errors(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "plc" / "profiles" / "washbay-v1.toml").read_text()
    site = tmp_path / "site.toml"
    site.write_text(text.replace('name = "washbay-v1"', 'name = "acme-v2"').replace('4 = "DOOR_OPEN"', '4 = "HOOD_UP"'))
    profiles = load_profiles([str(site)])
    assert set(profiles) == {"washbay-v1", "acme-v2"} and profiles["acme-v2"].error_name(4) == "HOOD_UP"
    with pytest.raises(ProfileError, match="already defined"):
        load_profiles([str(site), str(site)])
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("progress = 11", "progress = 30"))
    with pytest.raises(ProfileError, match=r"bad.toml: registers.progress"):
        load_profile(bad)
    bad.write_text(text.replace('5 = "ERROR"', '5 = "BROKEN"'))
    with pytest.raises(ProfileError, match="states"):
        load_profile(bad)


def test_inter_frame_gap() -> None:
    rtu = BusSettings(name="b", type="rtu", device="/dev/x", baudrate=9600)
    assert inter_frame_gap(rtu) == pytest.approx(3.5 * 10 / 9600)
    assert inter_frame_gap(BusSettings(name="b", type="rtu", device="/dev/x", baudrate=115200)) == 0.00175
    assert inter_frame_gap(BusSettings(name="b", type="tcp", host="h")) == 0.0


class Collector:
    def __init__(self) -> None:
        self.results: list[PollResult] = []
        self.changed = asyncio.Event()

    def __call__(self, r: PollResult) -> None:
        self.results.append(r)
        self.changed.set()

    async def wait(self, pred, timeout: float = 30) -> PollResult:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while True:
                for r in reversed(self.results):
                    if pred(r):
                        return r
                self.changed.clear()
                await self.changed.wait()

    def count(self, bay: str, ok: bool | None = None) -> int:
        return sum(1 for r in self.results if r.bay_id == bay and (ok is None or (r.error is None) == ok))


async def test_scheduler_rtu_polls_writes_mute_unplug_and_garbage(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path / "pty")
    await asyncio.to_thread(pair.start)
    sim = PlcSimulator.rtu(pair.plc_path, bays=[("a", 1, 0), ("b", 2, 0), ("c", 3, 20)], wash_time=0.5)
    await sim.start()
    col = Collector()
    cfg = BusSettings(name="rs485", type="rtu", device=pair.gateway_path, baudrate=115200, timeout=0.1)
    bays = [BayAddress("a", 1, 0, P, 0.05), BayAddress("b", 2, 0, P, 0.05), BayAddress("c", 3, 20, P, 0.05),
            BayAddress("ghost", 9, 0, P, 0.05)]
    bus = BusScheduler(cfg, bays, col, offline_after=3, backoff_max=1.0)
    task = asyncio.create_task(bus.run())
    try:
        await col.wait(lambda r: r.bay_id == "c" and r.status is not None)
        # A unit the PLC does not serve: a Modbus exception reply (4), a per-bay error, backed off.
        await col.wait(lambda r: r.bay_id == "ghost" and r.error == "exception 4")
        # A write goes ahead of polls and the PLC acts on it.
        await bus.write("a", P.command_offset, encode_command(P, "START", 1, 11))
        await col.wait(lambda r: r.bay_id == "a" and r.status is not None and r.status.state == "DONE")
        assert sim.status("a")["ack_seq"] == 11
        # A muted PLC: its polls fail, the others go on.
        sim.mute("b", True)
        await col.wait(lambda r: r.bay_id == "b" and r.error == "timeout")
        a_before = col.count("a", ok=True)
        await col.wait(lambda r: col.count("a", ok=True) >= a_before + 20)
        assert bus.stats()["b"]["offline_backoff"] > 0
        sim.mute("b", False)
        await col.wait(lambda r: r.bay_id == "b" and r.status is not None)
        # Garbage on the line: a few bad replies at worst, then polls go on.
        with open(pair.plc_path, "wb", buffering=0) as line:
            line.write(os.urandom(64))
        ok_before = col.count("c", ok=True)
        await col.wait(lambda r: col.count("c", ok=True) >= ok_before + 10)
        # The adapter vanishes: every bay gets "disconnected"; it comes back by itself.
        await asyncio.to_thread(pair.kill)
        await col.wait(lambda r: r.error == "disconnected")
        with pytest.raises(PlcError):
            await bus.write("a", P.command_offset, encode_command(P, "STOP", 0, 12))
        await asyncio.to_thread(pair.start)
        await sim.reopen()
        n = len(col.results)
        await col.wait(lambda r: col.results.index(r) >= n and r.bay_id == "a" and r.status is not None, 15)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sim.stop()
        await asyncio.to_thread(pair.stop)


async def test_scheduler_tcp_and_exception_replies(tmp_path: Path) -> None:
    port = free_port()
    sim = PlcSimulator.tcp("127.0.0.1", port, bays=[("t1", 1, 0)], wash_time=0.3)
    await sim.start()
    col = Collector()
    cfg = BusSettings(name="lan", type="tcp", host="127.0.0.1", port=port, timeout=0.2)
    # Unit 1 at base 100 is outside what the simulated PLC serves: a Modbus exception reply.
    bus = BusScheduler(cfg, [BayAddress("t1", 1, 0, P, 0.05), BayAddress("bad", 1, 100, P, 0.05)], col)
    task = asyncio.create_task(bus.run())
    try:
        await col.wait(lambda r: r.bay_id == "t1" and r.status is not None)
        r = await col.wait(lambda r: r.bay_id == "bad" and r.error is not None)
        assert r.error == "exception 2"
        sim.set_raw("t1", 11, 250)
        r = await col.wait(lambda r: r.bay_id == "t1" and r.error is not None)
        assert r.error == "decode: progress=250"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sim.stop()


async def test_rs485_direction_pin_brackets_every_frame(tmp_path: Path) -> None:
    """`direction_gpio`: the DE/RE pin (gpiozero's MockFactory here) is high while a request is on
    the line and low while the PLC answers; polls work as without it."""
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    Device.pin_factory = MockFactory()
    pair = SocatPair(tmp_path / "pty")
    await asyncio.to_thread(pair.start)
    sim = PlcSimulator.rtu(pair.plc_path, bays=[("a", 1, 0)], wash_time=0.5)
    await sim.start()
    col = Collector()
    cfg = BusSettings(name="rs485", type="rtu", device=pair.gateway_path, baudrate=115200, timeout=0.1,
                    direction_gpio=22)
    bus = BusScheduler(cfg, [BayAddress("a", 1, 0, P, 0.05)], col)
    task = asyncio.create_task(bus.run())
    try:
        await col.wait(lambda r: col.count("a", ok=True) >= 5)
        await bus.write("a", P.command_offset, encode_command(P, "START", 1, 21))
        await col.wait(lambda r: r.status is not None and r.status.ack_seq == 21)
        pin = Device.pin_factory.pin(22)
        states = [s.state for s in pin.states]
        highs = sum(1 for before, after in pairwise(states) if not before and after)
        assert highs >= 6  # one rise per request written (5 polls and a write at least)
        assert pin.state == 0  # low between frames: the PLC's answers were not talked over
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sim.stop()
        await asyncio.to_thread(pair.stop)
        Device.pin_factory.reset()
        Device.pin_factory.close()
        Device.pin_factory = None


async def test_serial_link_reports_a_vanished_adapter_as_link_down(tmp_path: Path) -> None:
    """An unplugged adapter makes the driver's flush fail with termios.error (not an OSError): the
    link must turn that into LinkDown, or the bus task would die with it and every bay go silent."""
    pair = SocatPair(tmp_path / "pty")
    await asyncio.to_thread(pair.start)
    link = SerialLink(pair.gateway_path, baudrate=115200, bytesize=8, parity="N", stopbits=1)
    await link.open()
    try:
        # Killed without letting the loop run, so the link's reader has not seen the hang-up yet
        # and discard() meets the dead line first.
        pair.kill()
        with pytest.raises(LinkDown):
            link.discard()
            link.send(b"\x01\x03\x00\x00\x00\x01\x84\x0a")
        with pytest.raises(LinkDown):
            await link.receive(0.1)
    finally:
        link.close()
        pair.stop()


class _InstantPlc:
    """A `plc.link.Link` in memory that answers every read at once, on a clock the test moves:
    the silence the transactor keeps is read off that clock, not off a real line."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.sent_at: list[float] = []
        self.replied_at: list[float] = []
        self._reply = b""

    def send(self, data: bytes) -> None:
        from plc.frames import crc16

        self.sent_at.append(self.clock[0])
        body = bytes((data[0], 3, 2, 0, 7))  # unit, read holding registers, 2 bytes: the value 7
        self._reply = body + crc16(body).to_bytes(2, "little")

    async def receive(self, timeout: float) -> bytes:
        reply, self._reply = self._reply, b""
        self.replied_at.append(self.clock[0])
        return reply

    def discard(self) -> int:
        return 0


async def test_inter_frame_silence_runs_from_the_end_of_the_last_frame() -> None:
    """The silence before a request is counted from the previous reply's last byte, so the time
    the gateway spends on the reply is part of it (the line is silent meanwhile): with 1 ms of
    handling, 0.75 ms of the 1.75 ms silence are left to wait, not 1.75 ms."""
    from plc.frames import Request
    from plc.transact import Transactor

    clock = [100.0]
    link = _InstantPlc(clock)
    gap = 0.00175
    tx = Transactor(link, "rtu", timeout=0.1, gap=gap, guard=0.02, clock=lambda: clock[0])  # type: ignore[arg-type]
    waited: list[float] = []

    async def keep(self: Transactor) -> None:  # what the transactor would wait, on the test's clock
        remaining = max(0.0, self._quiet_until - self.clock())
        waited.append(remaining)
        clock[0] += remaining

    tx._keep_silence = keep.__get__(tx)  # type: ignore[method-assign]
    for _ in range(3):
        reply = await tx.execute(Request.read(1, 10, 1))
        assert list(reply.registers) == [7]
        clock[0] += 0.001  # the gateway decodes the reply and picks the next request
    assert waited[1:] == [pytest.approx(gap - 0.001)] * 2
    # On the wire: each request starts a full silence after the previous reply's last byte.
    for replied, sent in pairwise(zip(link.replied_at, link.sent_at, strict=True)):
        assert sent[1] - replied[0] >= gap - 1e-12


async def test_inter_frame_silence_is_kept_on_the_real_clock() -> None:
    """`Transactor._keep_silence` on the real clock: never less than what remains (the whole
    milliseconds on the loop, the rest in place)."""
    import time

    from plc.transact import Transactor

    link = _InstantPlc([0.0])
    tx = Transactor(link, "rtu", timeout=0.1, gap=0.00175, guard=0.02)  # type: ignore[arg-type]
    for remaining in (0.0, 0.0004, 0.00175, 0.0031):
        tx._quiet_until = time.monotonic() + remaining
        await tx._keep_silence()
        assert time.monotonic() >= tx._quiet_until
