"""One scheduler per Modbus bus: the only code that talks to PLCs.

A bus is one half-duplex line: one transaction in flight, writes ahead of polls, polls of every
bay round-robin at each bay's period, the RTU inter-frame silence after every response, and
retries/backoff owned here (pymodbus runs with retries=0 and a short timeout, and never
reconnects by itself). Results go to `on_poll` as plain `PollResult`s; pymodbus stays inside.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import serial
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from gateway.config import BusConfig
from plc.profile import DecodeError, PlcStatus, Profile, decode_status

log = logging.getLogger(__name__)

RECONNECT_MIN = 0.5
RECONNECT_MAX = 5.0
LATENCY_WINDOW = 200
RATE_WINDOW = 200  # polls kept for the rate and error rate (the last minute at 5 Hz or less)


@dataclass(frozen=True)
class BayAddress:
    bay_id: str
    unit: int
    base: int
    profile: Profile
    poll_period: float


@dataclass(frozen=True)
class PollResult:
    bay_id: str
    status: PlcStatus | None
    error: str | None
    latency: float
    at: float


class PlcWriteError(Exception):
    """A write was not confirmed by the PLC (reason in the message)."""


class _BusDown(Exception):
    """The line itself failed (device gone, connection lost): every bay is affected."""


def inter_frame_gap(cfg: BusConfig) -> float:
    """max(3.5 characters, 1.75 ms) for RTU; nothing for TCP."""
    if cfg.type != "rtu":
        return 0.0
    bits = 1 + cfg.bytesize + (0 if cfg.parity == "N" else 1) + cfg.stopbits
    return max(3.5 * bits / cfg.baudrate, 0.00175)


@dataclass
class _BayState:
    addr: BayAddress
    due: float = 0.0
    failures: int = 0
    backoff: float = 0.0
    polls: int = 0
    errors: int = 0
    last_error: str | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    recent: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))  # (time, ok)


@dataclass
class _Write:
    bay: _BayState
    offset: int
    values: list[int]
    done: asyncio.Future[None]


@dataclass
class _Read:
    unit: int
    address: int
    count: int
    done: asyncio.Future[list[int]]


class BusScheduler:
    """Construct without I/O; `run()` owns the connection until cancelled."""

    def __init__(self, config: BusConfig, bays: Sequence[BayAddress], on_poll: Callable[[PollResult], None], *,
                 offline_after: int = 3, backoff_max: float = 5.0) -> None:
        self.config = config
        self.on_poll = on_poll
        self.offline_after = offline_after
        self.backoff_max = backoff_max
        self.gap = inter_frame_gap(config)
        self.timeout = config.timeout_ms / 1000
        self._bays = {b.bay_id: _BayState(b) for b in bays}
        self._writes: deque[_Write | _Read] = deque()
        self._wake = asyncio.Event()
        self._client: Any = None
        self.connected = False
        self.transactions = 0
        self.reconnects = 0
        self._down_reason: str | None = None
        self._quiet_until = 0.0

    # --- public -------------------------------------------------------------------------------

    async def write(self, bay_id: str, offset: int, values: list[int]) -> None:
        """Write registers at the bay's base + offset, ahead of polls; raises PlcWriteError."""
        bay = self._bays[bay_id]
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.append(_Write(bay, offset, list(values), fut))
        self._wake.set()
        await fut

    async def read(self, unit: int, address: int, count: int) -> list[int]:
        """Read holding registers of any unit id, between polls (a bus scan); raises PlcWriteError
        with the reason (timeout, exception N, connection lost)."""
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._writes.append(_Read(unit, address, count, fut))
        self._wake.set()
        return await fut

    def stats(self) -> dict[str, dict[str, Any]]:
        out = {}
        for bid, b in self._bays.items():
            lat = list(b.latencies)
            span = b.recent[-1][0] - b.recent[0][0] if len(b.recent) > 1 else 0.0
            out[bid] = {"polls": b.polls, "errors": b.errors, "last_error": b.last_error,
                        "polls_per_s": round((len(b.recent) - 1) / span, 2) if span > 0 else None,
                        "error_rate": round(sum(1 for _, ok in b.recent if not ok) / len(b.recent), 3)
                        if b.recent else None,
                        "latency_ms_median": round(statistics.median(lat) * 1000, 3) if lat else None,
                        "latency_ms_last": round(lat[-1] * 1000, 3) if lat else None,
                        "offline_backoff": b.backoff}
        return out

    async def run(self) -> None:
        delay = RECONNECT_MIN
        try:
            while True:
                try:
                    await self._connect()
                    delay = RECONNECT_MIN
                    await self._serve()
                except _BusDown as exc:
                    self._mark_down(str(exc))
                self._close()
                self._fail_writes("bus disconnected")
                await self._wait_reconnect(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                self.reconnects += 1
        finally:
            self._close()
            self._fail_writes("bus stopped")

    # --- connection -----------------------------------------------------------------------------

    def _make_client(self) -> Any:
        c = self.config
        if c.type == "rtu":
            port = c.device
            if c.direction_gpio is not None:
                if "plc.urlhandler" not in serial.protocol_handler_packages:
                    serial.protocol_handler_packages.append("plc.urlhandler")
                port = f"rs485gpio://{c.device}?pin={c.direction_gpio}"
            return AsyncModbusSerialClient(port, framer=FramerType.RTU, baudrate=c.baudrate, bytesize=c.bytesize,
                                           parity=c.parity, stopbits=c.stopbits, timeout=self.timeout, retries=0,
                                           reconnect_delay=0, name=f"bus-{c.name}")
        return AsyncModbusTcpClient(c.host, port=c.port, framer=FramerType.SOCKET, timeout=self.timeout, retries=0,
                                    reconnect_delay=0, name=f"bus-{c.name}")

    async def _connect(self) -> None:
        if self.config.type == "rtu" and not os.path.exists(self.config.device):
            raise _BusDown(f"serial device {self.config.device} not present")
        self._client = self._make_client()
        ok = await self._client.connect()
        if not ok or not self._client.connected:
            raise _BusDown("cannot open the connection")
        self.connected = True
        if self._down_reason is not None:
            log.warning("bus %s: connected again", self.config.name)
        self._down_reason = None

    def _close(self) -> None:
        self.connected = False
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a broken port may raise anything
                pass
            self._client = None

    def _mark_down(self, reason: str) -> None:
        if self._down_reason is None:
            log.error("bus %s: down: %s; every bay on it is offline until it comes back", self.config.name, reason)
        self._down_reason = reason

    async def _wait_reconnect(self, delay: float) -> None:
        """While the bus is down, each bay still gets a 'disconnected' result per poll period."""
        until = time.monotonic() + delay
        while True:
            now = time.monotonic()
            for b in self._bays.values():
                if b.due <= now:
                    self._report(b, None, "disconnected", 0.0, now)
            nxt = min([until] + [b.due for b in self._bays.values()])
            if nxt >= until and now >= until:
                return
            await asyncio.sleep(max(0.0, min(nxt, until) - time.monotonic()))
            if time.monotonic() >= until:
                return

    def _fail_writes(self, reason: str) -> None:
        while self._writes:
            w = self._writes.popleft()
            if not w.done.done():
                w.done.set_exception(PlcWriteError(reason))

    # --- the loop -------------------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            if self._writes:
                job = self._writes.popleft()
                if isinstance(job, _Read):
                    await self._do_read(job)
                else:
                    await self._do_write(job)
                continue
            now = time.monotonic()
            bay = min(self._bays.values(), key=lambda b: b.due, default=None)
            if bay is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            if bay.due > now:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), bay.due - now)
                except TimeoutError:
                    pass
                continue
            await self._do_poll(bay)

    async def _transaction(self, request: Callable[[], Any]) -> Any:
        if self._client is None or not self._client.connected:
            raise _BusDown("connection lost")
        # The line must stay silent for `gap` after the last frame; decoding and reporting the
        # previous answer happened meanwhile, so only what is left of the gap is waited here.
        quiet = self._quiet_until - time.monotonic()
        if quiet > 0:
            await asyncio.sleep(quiet)
        try:
            return await request()
        except ConnectionException as exc:
            raise _BusDown(f"connection lost: {exc}") from None
        except OSError as exc:
            raise _BusDown(f"io: {exc}") from None
        finally:
            self.transactions += 1
            self._quiet_until = time.monotonic() + self.gap

    async def _do_poll(self, b: _BayState) -> None:
        p = b.addr.profile
        t0 = time.monotonic()
        error: str | None = None
        status: PlcStatus | None = None
        try:
            rr = await self._transaction(lambda: self._client.read_holding_registers(
                b.addr.base + p.poll_offset, count=p.poll_count, device_id=b.addr.unit))
            if rr.isError():
                error = f"exception {getattr(rr, 'exception_code', '?')}"
            else:
                status = decode_status(p, rr.registers)
        except ModbusIOException:
            error = "timeout"
        except DecodeError as exc:
            error = f"decode: {exc}"
        except ModbusException as exc:
            error = f"modbus: {exc}"
        now = time.monotonic()
        self._report(b, status, error, now - t0, now)
        if error == "timeout" and self.config.type == "rtu" and not os.path.exists(self.config.device):
            raise _BusDown(f"serial device {self.config.device} disappeared")

    def _report(self, b: _BayState, status: PlcStatus | None, error: str | None, latency: float, now: float) -> None:
        b.polls += 1
        b.recent.append((now, error is None))
        if error is None:
            if b.failures >= self.offline_after:
                log.warning("bus %s: %s answers again", self.config.name, b.addr.bay_id)
            b.failures, b.backoff = 0, 0.0
            b.latencies.append(latency)
            b.due = max(b.due + b.addr.poll_period, now)
        else:
            b.errors += 1
            b.failures += 1
            if b.failures == 1 or error != b.last_error:
                log.log(logging.WARNING if b.failures == 1 else logging.DEBUG,
                        "bus %s: %s: %s", self.config.name, b.addr.bay_id, error)
            if b.failures >= self.offline_after:
                # A dead PLC costs one timeout per backoff period, not one per poll period.
                b.backoff = min(max(b.backoff * 2, b.addr.poll_period * 2), self.backoff_max)
                b.due = now + b.backoff
            else:
                b.due = max(b.due + b.addr.poll_period, now)
        b.last_error = error
        self.on_poll(PollResult(b.addr.bay_id, status, error, latency, time.time()))

    async def _do_job(self, request: Callable[[], Any], done: asyncio.Future[Any],
                      result: Callable[[Any], Any]) -> None:
        """A write or an out-of-poll read: its outcome goes to `done` (PlcWriteError with the
        reason); a lost bus also ends the serving loop."""
        try:
            rr = await self._transaction(request)
        except ModbusIOException:
            done.set_exception(PlcWriteError("timeout"))
            return
        except _BusDown as exc:
            done.set_exception(PlcWriteError(str(exc)))
            raise
        except ModbusException as exc:
            done.set_exception(PlcWriteError(f"modbus: {exc}"))
            return
        if rr.isError():
            done.set_exception(PlcWriteError(f"exception {getattr(rr, 'exception_code', '?')}"))
        else:
            done.set_result(result(rr))

    async def _do_read(self, r: _Read) -> None:
        await self._do_job(lambda: self._client.read_holding_registers(r.address, count=r.count, device_id=r.unit),
                           r.done, lambda rr: list(rr.registers))

    async def _do_write(self, w: _Write) -> None:
        await self._do_job(lambda: self._client.write_registers(w.bay.addr.base + w.offset, w.values,
                                                                device_id=w.bay.addr.unit),
                           w.done, lambda _rr: None)


