"""Both washbay-v1 PLC simulators against the register map, checked on the wire with a raw Modbus
client (tests/plcs.py `RawClient`) over a socat pty pair and over TCP.

The project's simulator (pymodbus) and the independent one (umodbus) each run as their own process,
so the test can pause them (SIGSTOP) as a hung PLC. What both must do: bays behind one unit id at
bases 0/100/200/300, holding registers only (exception 1 for other function codes, 2 past the
registers), a command block taken whole or in pieces, errors latched until RESET_ERROR, the session
counter, progress and DONE held then IDLE, and the faults (late replies in order, mute, garbage,
freeze, pause). The independent PLC's own quirks (one TCP connection at a time, unit id ignored on
TCP, silence for other units and bad CRCs on RTU) are checked on it alone.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sim.demo import free_port
from sim.pty import SocatPair
from tests.plcs import KINDS, NoReply, ProcessPlc, RawClient, crc16, make_plc

T = TypeVar("T")
WASH_TIME = 1.0
RTU_BAYS = [("b0", 1, 0), ("b1", 1, 100), ("b2", 1, 200), ("b3", 1, 300), ("other", 2, 0)]
TCP_BAYS = [("b0", 1, 0), ("b1", 1, 100), ("b2", 1, 200), ("b3", 1, 300)]
END = 318  # past bay b3's 18 registers


@dataclass
class Line:
    kind: str
    transport: str
    plc: ProcessPlc
    rtu: str | None = None
    tcp: tuple[str, int] | None = None

    def client(self) -> RawClient:
        return RawClient(rtu=self.rtu, tcp=self.tcp)


@pytest.fixture(params=[(k, t) for k in KINDS for t in ("rtu", "tcp")], ids=lambda p: f"{p[0]}-{p[1]}")
def line(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Line]:
    kind, transport = request.param
    pair: SocatPair | None = None
    if transport == "rtu":
        pair = SocatPair(tmp_path / "pty")
        pair.start()
        plc = make_plc(kind, tmp_path, bays=RTU_BAYS, rtu=pair.plc_path, wash_time=WASH_TIME, process=True)
        ln = Line(kind, transport, plc, rtu=pair.gateway_path)  # type: ignore[arg-type]
    else:
        addr = ("127.0.0.1", free_port())
        plc = make_plc(kind, tmp_path, bays=TCP_BAYS, tcp=addr, wash_time=WASH_TIME, process=True)
        ln = Line(kind, transport, plc, tcp=addr)  # type: ignore[arg-type]
    assert isinstance(plc, ProcessPlc)
    try:
        plc.start_blocking()
        yield ln
    finally:
        plc.stop_blocking()
        if pair is not None:
            pair.stop()


def wait_for(fn: Callable[[], T], pred: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Call fn until pred holds for its result (TimeoutError naming the last value otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if pred(v):
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s; last value {v!r}")
        time.sleep(0.02)


def status(c: RawClient, base: int, unit: int = 1) -> dict[str, Any]:
    r = c.registers(unit, base + 10, 8)
    return {"state": r[0], "progress": r[1], "ack_seq": r[2], "error_code": r[3], "course": r[4],
            "heartbeat": r[5], "session_counter": (r[6] << 16) | r[7]}


def test_bays_behind_one_unit_holding_registers_only(line: Line) -> None:
    with line.client() as c:
        for _, unit, base in (TCP_BAYS if line.transport == "tcp" else RTU_BAYS):
            assert status(c, base, unit)["state"] == 0
        hb = status(c, 300)["heartbeat"]
        wait_for(lambda: status(c, 300)["heartbeat"], lambda v: v >= hb + 1)
        assert c.request(1, c.read(10, 8, fc=4)) == b"\x84\x01"  # input registers: not in the map
        assert c.request(1, c.read(0, 1, fc=1)) == b"\x81\x01"  # coils neither
        assert c.request(1, c.read(END, 1)) == b"\x83\x02"
        assert c.request(1, c.read(310, 9)) == b"\x83\x02"
        assert c.request(1, c.write1(END, 1)) == b"\x86\x02"
        assert c.request(1, c.write(316, [1, 2, 3])) == b"\x90\x02"
        block = c.registers(1, 300, 18)  # a whole bay in one read
        assert block[:3] == [0, 0, 0] and block[10] == 0


def test_command_block_in_one_request_or_in_pieces(line: Line) -> None:
    with line.client() as c:
        # One FC16 of cmd, cmd_course, cmd_seq: taken, cmd cleared, course and seq read back.
        assert c.request(1, c.write(100, [1, 2, 7])) == struct.pack(">BHH", 16, 100, 3)
        s = wait_for(lambda: status(c, 100), lambda s: s["ack_seq"] == 7)
        assert s["state"] in (1, 2) and s["course"] == 2 and s["session_counter"] == 1
        assert c.registers(1, 100, 3) == [0, 2, 7]
        assert status(c, 0)["state"] == 0 and status(c, 200)["ack_seq"] == 0  # the other bays untouched
        # In pieces (FC06 each): course, seq, then cmd STOP.
        for addr, value in ((101, 0), (102, 8)):
            assert c.request(1, c.write1(addr, value)) == struct.pack(">BHH", 6, addr, value)
        assert c.registers(1, 100, 3) == [0, 0, 8] and status(c, 100)["ack_seq"] == 7  # nothing taken yet
        c.request(1, c.write1(100, 2))
        s = status(c, 100)
        assert (s["state"], s["ack_seq"]) == (4, 8)
        assert c.registers(1, 100, 3) == [0, 0, 8]
        # FC16 of course and seq, then FC06 of cmd: START from CANCELED.
        c.request(1, c.write(101, [3, 9]))
        c.request(1, c.write1(100, 1))
        s = status(c, 100)
        assert (s["state"], s["ack_seq"], s["course"], s["session_counter"]) == (1, 9, 3, 2)
        # The same cmd_seq again is a repeat: not acted on (a STOP with seq 9 would cancel).
        c.request(1, c.write(100, [2, 0, 9]))
        assert status(c, 100)["state"] in (1, 2)
        assert c.registers(1, 100, 3) == [0, 0, 9]


def test_errors_latch_until_reset_error(line: Line) -> None:
    plc = line.plc
    with line.client() as c:
        plc.set_error("b2", 4)
        assert (status(c, 200)["state"], status(c, 200)["error_code"]) == (5, 4)
        plc.set_error("b2", 0)  # the fault is gone; the error stays latched
        s = status(c, 200)
        assert (s["state"], s["error_code"]) == (5, 4)
        assert plc.status("b2")["state"] == "ERROR"
        c.request(1, c.write(200, [1, 1, 20]))  # a START is refused while latched
        s = status(c, 200)
        assert (s["state"], s["ack_seq"]) == (5, 0)
        c.request(1, c.write(200, [3, 0, 21]))  # RESET_ERROR
        s = status(c, 200)
        assert (s["state"], s["error_code"], s["ack_seq"]) == (0, 0, 21)
        # A reset while the fault is still there leaves the bay in ERROR.
        plc.set_error("b2", 6)
        c.request(1, c.write(200, [3, 0, 22]))
        s = status(c, 200)
        assert (s["state"], s["error_code"], s["ack_seq"]) == (5, 6, 22)
        plc.set_error("b2", 0)
        c.request(1, c.write(200, [3, 0, 22]))  # same cmd_seq: a repeat, not a new reset
        assert status(c, 200)["state"] == 5
        # The reset button on the panel.
        assert plc.local_reset("b2") is True
        assert (status(c, 200)["state"], status(c, 200)["error_code"]) == (0, 0)
        assert plc.local_reset("b2") is False  # nothing latched


def test_session_counter_progress_done_held_then_idle_heartbeat_freeze(line: Line) -> None:
    plc = line.plc
    with line.client() as c:
        assert plc.local_start("b1", 3) is True
        seen: list[dict[str, Any]] = []
        wait_for(lambda: seen.append(status(c, 100)) or seen[-1], lambda s: s["state"] == 0 and len(seen) > 1,
                 timeout=15)
        states = [s["state"] for s in seen]
        assert states[0] in (1, 2) and 2 in states and 3 in states and states[-1] == 0
        washing = [s["progress"] for s in seen if s["state"] == 2]
        assert washing == sorted(washing) and max(s["progress"] for s in seen if s["state"] == 3) == 100
        assert {s["session_counter"] for s in seen} == {1} and {s["course"] for s in seen if s["state"]} == {3}
        assert plc.local_start("b1", 1) is True and status(c, 100)["session_counter"] == 2
        assert plc.local_start("b1", 1) is False  # busy
        # Heartbeat: +1 a second; a frozen bay's stops while the others go on.
        plc.freeze("b0", True)
        frozen = status(c, 0)["heartbeat"]
        hb = status(c, 300)["heartbeat"]
        wait_for(lambda: status(c, 300)["heartbeat"], lambda v: v >= hb + 2)
        assert status(c, 0)["heartbeat"] == frozen
        plc.freeze("b0", False)
        wait_for(lambda: status(c, 0)["heartbeat"], lambda v: v > frozen)


def test_late_replies_arrive_after_the_timeout_in_order(line: Line) -> None:
    """A slow PLC scan: each reply D seconds after its request, strictly in order."""
    plc = line.plc
    with line.client() as c:
        plc.late(0.6)
        t_a = c.send(1, c.read(10, 8))
        with pytest.raises(NoReply):
            c.recv(0.2)  # the client's timeout passes: it moves on
        t_b = c.send(1, c.read(110, 2))
        first, second = c.recv(5), c.recv(5)
        assert first[1][:2] == b"\x03\x10" and second[1][:2] == b"\x03\x04"  # A's 8 registers, then B's 2
        if line.transport == "tcp":
            assert (first[2], second[2]) == (t_a, t_b)
        # Writes are late too and still in order with the reads around them.
        c.send(1, c.write(100, [1, 1, 30]))
        c.send(1, c.read(110, 3))
        assert c.recv(5)[1] == struct.pack(">BHH", 16, 100, 3)
        assert struct.unpack(">3H", c.recv(5)[1][2:])[2] == 30  # the read saw the write before it
        # Every second reply late: the first on time, the second after the client gave up on it,
        # and the third, asked meanwhile, behind it.
        plc.late(0.6, every=2)
        assert c.request(1, c.read(10, 1), timeout=1.0)[:2] == b"\x03\x02"
        c.send(1, c.read(10, 2))
        with pytest.raises(NoReply):
            c.recv(0.2)
        c.send(1, c.read(10, 3))
        assert [c.recv(5)[1][:2] for _ in range(2)] == [b"\x03\x04", b"\x03\x06"]
        plc.late(0)
        assert c.request(1, c.read(10, 1), timeout=1.0)[:2] == b"\x03\x02"


def test_mute_garbage_and_a_paused_process(line: Line) -> None:
    plc = line.plc
    with line.client() as c:
        plc.mute("b0", True)
        c.send(1, c.read(10, 8))
        with pytest.raises(NoReply):
            c.recv(0.4)
        plc.mute("b0", False)
        assert status(c, 0)["state"] == 0
        plc.garbage(True)
        tid = c.send(1, c.read(10, 8))
        junk = c.recv_bytes(2.0)
        assert junk, "garbage: the PLC answers with random bytes"
        if line.transport == "rtu":
            assert crc16(junk[:-2]) != junk[-2:] or junk[:2] != b"\x01\x03"
        else:
            assert junk[:4] != struct.pack(">HH", tid, 0)
        plc.garbage(False)
        assert status(c, 0)["state"] == 0
        # The process stops dead: no answer; on SIGCONT the pending request is answered.
        plc.pause()
        try:
            c.send(1, c.read(110, 2))
            with pytest.raises(NoReply):
                c.recv(0.4)
        finally:
            plc.resume()
        assert c.recv(5)[1][:2] == b"\x03\x04"
        assert status(c, 100)["state"] == 0


def test_independent_tcp_one_connection_at_a_time_and_unit_id_ignored(tmp_path: Path) -> None:
    addr = ("127.0.0.1", free_port())
    plc = make_plc("independent", tmp_path, bays=TCP_BAYS, tcp=addr, wash_time=WASH_TIME)
    assert isinstance(plc, ProcessPlc)
    plc.start_blocking()
    try:
        with RawClient(tcp=addr) as c1:
            c1.request(1, c1.write(100, [0, 2, 5]))
            assert {tuple(c1.registers(u, 100, 3)) for u in (0, 1, 7, 247)} == {(0, 2, 5)}
            with RawClient(tcp=addr) as c2:  # the kernel completes the connect; the PLC does not serve it
                c2.send(1, c2.read(100, 3))
                with pytest.raises(NoReply):
                    c2.recv(0.5)
                c1.__exit__(None, None, None)
                assert struct.unpack(">3H", c2.recv(5)[1][2:]) == (0, 2, 5)
    finally:
        plc.stop_blocking()


def test_independent_rtu_other_units_and_bad_frames_are_silence(tmp_path: Path) -> None:
    pair = SocatPair(tmp_path / "pty")
    pair.start()
    plc = make_plc("independent", tmp_path, bays=RTU_BAYS, rtu=pair.plc_path, wash_time=WASH_TIME)
    assert isinstance(plc, ProcessPlc)
    try:
        plc.start_blocking()
        with RawClient(rtu=pair.gateway_path) as c:
            c.send(9, c.read(10, 8))  # no PLC with unit id 9 on this line
            with pytest.raises(NoReply):
                c.recv(0.4)
            frame = bytes([1]) + c.read(10, 8)
            c.send_raw(frame + bytes([crc16(frame)[0] ^ 0xFF, crc16(frame)[1]]))
            with pytest.raises(NoReply):
                c.recv(0.4)
            assert status(c, 0, 1)["state"] == 0 and status(c, 0, 2)["state"] == 0
    finally:
        plc.stop_blocking()
        pair.stop()


def test_independent_plc_shares_no_code_with_the_gateway_and_the_product_never_imports_sim() -> None:
    """The umodbus PLC is a counterpart only while it imports neither pymodbus nor plc/ (nor
    gateway/). `sim` ships beside the product (the CLI's demo and simulate-* subcommands import it
    lazily), but importing the product's processes never imports it."""
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    code = ("import sys, sim.plc_umodbus, sim.control; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pymodbus', 'plc', 'gateway', 'web'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr
    code = ("import sys, gateway.cli, gateway.core.app, web.app, plc.bus; "
            "print(sorted(m for m in sys.modules if m == 'sim' or m.startswith('sim.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repo)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr
