"""One scheduler per Modbus bus: the only code that talks to PLCs.

A bus is one half-duplex line: one transaction in flight, writes ahead of polls, polls of every
bay round-robin at each bay's period, the RTU inter-frame silence after every frame, retries of
command writes and offline backoff owned here, and reconnects of a vanished serial device or TCP
link. Bytes move through `plc.link`, transactions through `plc.transact` (a reply is only ever
credited to the request it answers). Results go to `on_poll` as plain `PollResult`s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from plc.frames import Reply, Request
from plc.link import Link, LinkDown, SerialLink, TcpLink
from plc.profile import DecodeError, PlcStatus, Profile, decode_status
from plc.transact import NoReply, Transactor

log = logging.getLogger(__name__)

RECONNECT_MIN = 0.5
# A PLC that comes back (a reboot) is polled again within this, plus one connect.
RECONNECT_MAX = 1.5
LATENCY_WINDOW = 200
RATE_WINDOW = 200  # polls kept for the rate and error rate (the last minute at 5 Hz or less)
# Reply timeout allowances (default_timeout): a PLC's scan cycle before it answers, and the
# scheduling delay of a Pi that is busy with everything else on site.
PLC_TURNAROUND = 0.050
LOADED_PI_MARGIN = 0.050
TCP_TIMEOUT = 0.250


@dataclass(frozen=True)
class BusSettings:
    """One line, as plc/ needs it (the gateway maps its configuration onto this)."""

    name: str
    type: str  # "rtu" | "tcp"
    device: str = ""
    baudrate: int = 19200
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    rts_direction: bool = False
    direction_gpio: int | None = None
    host: str = ""
    port: int = 502
    timeout: float | None = None  # seconds; None: default_timeout()
    retries: int = 1  # a command write that got no valid reply is sent again this many times


def char_time(s: BusSettings) -> float:
    bits = 1 + s.bytesize + (0 if s.parity == "N" else 1) + s.stopbits
    return bits / s.baudrate


def inter_frame_gap(s: BusSettings) -> float:
    """max(3.5 characters, 1.75 ms) for RTU; nothing for TCP."""
    if s.type != "rtu":
        return 0.0
    return max(3.5 * char_time(s), 0.00175)


def default_timeout(s: BusSettings) -> float:
    """The reply timeout when the configuration gives none: on RTU the longest exchange the
    gateway makes on the wire (a poll of 8 registers: 8 + 21 characters, with its gaps), the PLC's
    turnaround and the margin of a loaded Pi, rounded up to 10 ms; on TCP a fixed 250 ms."""
    if s.type != "rtu":
        return TCP_TIMEOUT
    wire = 29 * char_time(s) + 2 * inter_frame_gap(s)
    return -(-round((wire + PLC_TURNAROUND + LOADED_PI_MARGIN) * 1000) // 10) * 10 / 1000


def guard_time(s: BusSettings) -> float:
    """The silence waited for after a failed transaction before the next request: three of the
    longest replies with their gaps, at least 20 ms (a late reply caught in flight is drained)."""
    if s.type != "rtu":
        return 0.0
    return max(0.020, 3 * (21 * char_time(s) + inter_frame_gap(s)))


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


def error_kind(error: str) -> str:
    """A poll error's bounded kind: timeout, exception (the PLC's exception reply), bad_frame
    (CRC or framing), decode (registers the profile refuses), disconnected (the bus itself is down),
    other."""
    for prefix, kind in (("timeout", "timeout"), ("exception", "exception"), ("bad frame", "bad_frame"),
                         ("decode", "decode"), ("disconnected", "disconnected")):
        if error.startswith(prefix):
            return kind
    return "other"


class PlcError(Exception):
    """A request (write or out-of-poll read) got no valid answer; the message says why
    ("timeout", "exception 2", "bad frame: ...", "bus disconnected")."""


class _BusDown(Exception):
    """The line itself failed (device gone, connection lost): every bay is affected."""


@dataclass
class _BayState:
    addr: BayAddress
    due: float = 0.0
    failures: int = 0
    backoff: float = 0.0
    polls: int = 0
    errors: int = 0
    last_error: str | None = None
    error_kinds: Counter[str] = field(default_factory=Counter)  # error_kind() -> count (metrics)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    recent: deque[tuple[float, bool]] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))  # (time, ok)


@dataclass
class _Job:
    request: Request
    done: asyncio.Future[Reply]
    retries: int = 0


class BusScheduler:
    """Construct without I/O; `run()` owns the connection until cancelled."""

    def __init__(self, settings: BusSettings, bays: Sequence[BayAddress], on_poll: Callable[[PollResult], None], *,
                 offline_after: int = 3, backoff_max: float = 5.0) -> None:
        self.settings = settings
        self.on_poll = on_poll
        self.offline_after = offline_after
        self.backoff_max = backoff_max
        self.gap = inter_frame_gap(settings)
        self.timeout = settings.timeout if settings.timeout is not None else default_timeout(settings)
        self.guard = guard_time(settings)
        self._bays = {b.bay_id: _BayState(b) for b in bays}
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._link: Link | None = None
        self._tx: Transactor | None = None
        self._tx_totals: dict[str, float] = {}
        self.connected = False
        self.reconnects = 0
        self._down_reason: str | None = None

    # --- public -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def transactions(self) -> int:
        return int(self.line_stats()["transactions"])

    async def write(self, bay_id: str, offset: int, values: list[int]) -> None:
        """Write registers at the bay's base + offset, ahead of polls; raises PlcError. A write
        that got no valid reply is sent again `settings.retries` times."""
        bay = self._bays[bay_id].addr
        await self._submit(Request.write(bay.unit, bay.base + offset, values), self.settings.retries)

    async def read(self, unit: int, address: int, count: int) -> list[int]:
        """Read holding registers of any unit id, between polls (a bus scan); raises PlcError
        with the reason (timeout, exception N, connection lost)."""
        reply = await self._submit(Request.read(unit, address, count), 0)
        return list(reply.registers)

    def line_stats(self) -> dict[str, float]:
        """Totals of the line since start: transactions, timeouts, bad frames, stale replies
        dropped, fences, bytes drained, seconds spent in guard silences."""
        out = dict(self._tx_totals)
        if self._tx is not None:
            for k, v in vars(self._tx.stats).items():
                out[k] = out.get(k, 0) + v
        for k in ("transactions", "timeouts", "bad_frames", "stale_dropped", "fences", "drained_bytes",
                  "guard_seconds"):
            out.setdefault(k, 0)
        return out

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
                        "offline_backoff": b.backoff, "errors_by_kind": dict(b.error_kinds)}
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
                except Exception as exc:  # noqa: BLE001 - a bug must not silently end every bay's polling
                    log.exception("bus %s: unexpected error; reconnecting", self.name, extra={"bus": self.name})
                    self._mark_down(f"unexpected error: {exc!r}")
                link = self._link
                self._close()
                self._fail_jobs("bus disconnected")
                if link is not None:
                    await link.wait_closed()
                await self._wait_reconnect(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                self.reconnects += 1
        finally:
            link = self._link
            self._close()
            self._fail_jobs("bus stopped")
            if link is not None:
                await link.wait_closed()

    # --- connection -----------------------------------------------------------------------------

    def _make_link(self) -> Link:
        s = self.settings
        if s.type == "rtu":
            url = s.device if s.direction_gpio is None else f"rs485gpio://{s.device}?pin={s.direction_gpio}"
            return SerialLink(url, baudrate=s.baudrate, bytesize=s.bytesize, parity=s.parity, stopbits=s.stopbits,
                              rts_direction=s.rts_direction)
        return TcpLink(s.host, s.port)

    async def _connect(self) -> None:
        if self.settings.type == "rtu" and not os.path.exists(self.settings.device):
            raise _BusDown(f"serial device {self.settings.device} not present")
        link = self._make_link()
        try:
            await link.open()
        except LinkDown as exc:
            raise _BusDown(str(exc)) from None
        self._link = link
        self._tx = Transactor(link, self.settings.type, timeout=self.timeout, gap=self.gap, guard=self.guard)
        self.connected = True
        if self._down_reason is not None:
            log.warning("bus %s: connected again", self.name, extra={"bus": self.name})
        self._down_reason = None
        # The line is back: every bay is polled at once, not after its offline backoff.
        now = time.monotonic()
        for b in self._bays.values():
            b.due, b.backoff = now, 0.0

    def _close(self) -> None:
        self.connected = False
        if self._tx is not None:
            for k, v in vars(self._tx.stats).items():
                self._tx_totals[k] = self._tx_totals.get(k, 0) + v
            self._tx = None
        if self._link is not None:
            self._link.close()
            self._link = None

    def _mark_down(self, reason: str) -> None:
        if self._down_reason is None:
            log.error("bus %s: down: %s; every bay on it is offline until it comes back", self.name, reason,
                      extra={"bus": self.name})
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

    def _fail_jobs(self, reason: str) -> None:
        while self._jobs:
            _settle(self._jobs.popleft().done, PlcError(reason))

    # --- the loop -------------------------------------------------------------------------------

    async def _submit(self, request: Request, retries: int) -> Reply:
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(request, fut, retries))
        self._wake.set()
        return await fut

    async def _serve(self) -> None:
        while True:
            if self._jobs:
                await self._do_job(self._jobs.popleft())
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
                    async with asyncio.timeout(bay.due - now):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            await self._do_poll(bay)

    async def _transaction(self, request: Request) -> Reply:
        if self._tx is None:
            raise _BusDown("connection lost")
        try:
            return await self._tx.execute(request)
        except LinkDown as exc:
            raise _BusDown(str(exc)) from None

    async def _do_poll(self, b: _BayState) -> None:
        p = b.addr.profile
        t0 = time.monotonic()
        error: str | None = None
        status: PlcStatus | None = None
        try:
            reply = await self._transaction(Request.read(b.addr.unit, b.addr.base + p.poll_offset, p.poll_count))
            if reply.exception is not None:
                error = f"exception {reply.exception}"
            else:
                status = decode_status(p, reply.registers)
        except NoReply as exc:
            error = str(exc)
        except DecodeError as exc:
            error = f"decode: {exc}"
        now = time.monotonic()
        self._report(b, status, error, now - t0, now)
        if error == "timeout" and self.settings.type == "rtu" and not os.path.exists(self.settings.device):
            raise _BusDown(f"serial device {self.settings.device} disappeared")

    def _report(self, b: _BayState, status: PlcStatus | None, error: str | None, latency: float, now: float) -> None:
        b.polls += 1
        b.recent.append((now, error is None))
        if error is None:
            if b.failures >= self.offline_after:
                log.warning("bus %s: %s answers again", self.name, b.addr.bay_id,
                            extra={"bus": self.name, "bay_id": b.addr.bay_id})
            b.failures, b.backoff = 0, 0.0
            b.latencies.append(latency)
            b.due = max(b.due + b.addr.poll_period, now)
        else:
            b.errors += 1
            b.error_kinds[error_kind(error)] += 1
            b.failures += 1
            if b.failures == 1 or error != b.last_error:
                log.log(logging.WARNING if b.failures == 1 else logging.DEBUG,
                        "bus %s: %s: %s", self.name, b.addr.bay_id, error,
                        extra={"bus": self.name, "bay_id": b.addr.bay_id})
            if b.failures >= self.offline_after:
                # A dead PLC costs one timeout per backoff period, not one per poll period.
                b.backoff = min(max(b.backoff * 2, b.addr.poll_period * 2), self.backoff_max)
                b.due = now + b.backoff
            else:
                b.due = max(b.due + b.addr.poll_period, now)
        b.last_error = error
        self.on_poll(PollResult(b.addr.bay_id, status, error, latency, time.time()))

    async def _do_job(self, job: _Job) -> None:
        """A write or an out-of-poll read: its outcome goes to `job.done`; a lost bus also ends
        the serving loop."""
        attempts = 1 + job.retries
        for attempt in range(attempts):
            try:
                reply = await self._transaction(job.request)
            except NoReply as exc:
                if attempt + 1 < attempts:
                    log.info("bus %s: unit %d: %s; sending again", self.name, job.request.unit, exc)
                    continue
                _settle(job.done, PlcError(str(exc)))
                return
            except _BusDown as exc:
                _settle(job.done, PlcError(str(exc)))
                raise
            _settle(job.done, PlcError(f"exception {reply.exception}") if reply.exception is not None else reply)
            return


def _settle(fut: asyncio.Future[Reply], outcome: Reply | Exception) -> None:
    """Give a job its outcome unless its caller gave up meanwhile (a cancelled RPC)."""
    if fut.done():
        return
    if isinstance(outcome, Exception):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)
