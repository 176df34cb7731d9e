"""One Modbus transaction at a time on one link, and a reply only ever credited to the request it
answers (docs/decisions.md, "Fieldbus truth").

A PLC that answers after the timeout (a slow scan, a busy Pi, a paused process) leaves its reply
on the line. Modbus RTU replies carry no transaction id, and a poll of one bay and a poll of another
bay behind the same unit id have replies of the same size, so such a late reply would be read as
the answer to the next request. Here:

- every reply is parsed whole and checked (unit, function, byte count or write echo, CRC / MBAP)
  before a register is decoded; one that does not answer the request in flight is dropped as
  stale and the wait goes on until the timeout;
- after a timeout or a bad frame the line is drained: whatever arrives is dropped until the line
  has been silent for `guard` seconds;
- RTU: a unit that left a request unanswered is *suspect*: before its next request the gateway
  sends a fence, a read whose reply has a size no unanswered request of that unit can have. A PLC
  answers in order, so once the fence's reply is in, every earlier reply of that unit has arrived
  (and was dropped) or never will. Only then is the real request sent;
- TCP: the transaction id of the reply must be the request's; others are stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from plc.frames import READ_HOLDING, FrameError, Reply, Request, RtuReader, TcpReader, answers, rtu_frame, tcp_frame
from plc.link import Link, LinkDown

log = logging.getLogger(__name__)

MAX_DRAIN = 2.0  # a line that never falls silent is not waited on longer than this before sending
# The loop's timer may wake this much after a whole millisecond: a sleep that would end past the
# silence is one millisecond shorter, the rest waited in place.
WAKE_UP_MARGIN = 0.0002


class NoReply(Exception):
    """No valid reply to the request: "timeout" or "bad frame: ..."; the link itself is fine."""


@dataclass
class TransactStats:
    transactions: int = 0
    timeouts: int = 0
    bad_frames: int = 0
    stale_dropped: int = 0
    fences: int = 0
    drained_bytes: int = 0
    guard_seconds: float = 0.0


class Transactor:
    """Runs requests on `link` one at a time. `kind` is "rtu" or "tcp"; `gap` is the RTU silence
    kept after every frame; `clock` is monotonic seconds (tests may pass their own)."""

    def __init__(self, link: Link, kind: str, *, timeout: float, gap: float, guard: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if kind not in ("rtu", "tcp"):
            raise ValueError("kind must be rtu or tcp")
        self.link = link
        self.kind = kind
        self.timeout = timeout
        self.gap = gap
        self.guard = guard
        self.clock = clock
        self.stats = TransactStats()
        self._reader: RtuReader | TcpReader = RtuReader() if kind == "rtu" else TcpReader()
        self._quiet_until = 0.0
        self._dirty = False
        self._suspect: dict[int, set[tuple[int, int]]] = {}  # unit -> shapes of its unanswered requests
        self._tid = 0

    async def execute(self, request: Request) -> Reply:
        """The reply to `request` (possibly an exception reply); NoReply, or LinkDown from the link."""
        if self._dirty and self.kind == "rtu":
            await self._drain()
        if self.kind == "rtu" and request.unit in self._suspect:
            await self._fence(request)
        return await self._exchange(request, fence=False)

    # --- internals ------------------------------------------------------------------------------

    async def _fence(self, request: Request) -> None:
        shapes = self._suspect[request.unit]
        used = {count for fc, count in shapes if fc == READ_HOLDING}
        # Sizes inside the block the request itself reads or writes: registers the PLC has (a
        # read across a hole in its map would be refused with exception 2).
        count = next((k for k in range(1, request.count) if k not in used), None)
        if count is None:
            # No size left (a one-register request, or every size tried): the replies owed are
            # long lost or never coming. Start over after a long silence.
            await self._drain(self.guard * 4)
            self._suspect.pop(request.unit, None)
            return
        self.stats.fences += 1
        await self._exchange(Request.read(request.unit, request.address, count), fence=True)
        self._suspect.pop(request.unit, None)
        log.debug("unit %d: fence answered; the line is in step again", request.unit)

    async def _keep_silence(self) -> None:
        """Wait exactly what remains of the inter-frame silence. The event loop's timer wakes on
        whole milliseconds, late (epoll rounds 1.75 ms up to 2 ms, plus the wake-up): the whole
        milliseconds are slept on the loop, the rest (under 1 ms, `time.sleep`, no CPU spent) in
        place, which holds the loop that long at most: the price of not losing a quarter of the
        line's time to rounding at 115200 baud."""
        remaining = self._quiet_until - self.clock()
        whole_ms = int(remaining * 1000 - WAKE_UP_MARGIN * 1000)
        if whole_ms >= 1:
            await asyncio.sleep(whole_ms / 1000)
            remaining = self._quiet_until - self.clock()
        if remaining > 0:
            time.sleep(remaining)

    async def _exchange(self, request: Request, *, fence: bool) -> Reply:
        await self._keep_silence()
        self.stats.transactions += 1
        if self.kind == "rtu":
            # Bytes before our request can only be noise or stale (a TCP stream keeps its framing,
            # and its stale replies are told apart by transaction id).
            self.stats.drained_bytes += self.link.discard() + self._reader.clear()
        if self.kind == "tcp":
            self._tid = self._tid % 0xFFFF + 1
            tid: int | None = self._tid
            frame = tcp_frame(request, self._tid)
        else:
            tid = None
            frame = rtu_frame(request)
        self.link.send(frame)
        deadline = self.clock() + self.timeout
        last_byte: float | None = None  # when the last received bytes were taken: the frame's end, or later
        try:
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise NoReply("timeout")
                data = await self.link.receive(remaining)
                if not data:
                    continue
                last_byte = self.clock()
                self._reader.feed(data)
                for reply in self._reader.frames():
                    if self._is_answer(reply, request, tid, fence=fence):
                        self._reader.clear()
                        return reply
                    self.stats.stale_dropped += 1
                    log.debug("dropped a reply that does not answer the request in flight: %s", reply)
        except NoReply:
            self.stats.timeouts += 1
            log.debug("unit %d: no reply to function %d at %d within %.3f s", request.unit, request.function,
                      request.address, self.timeout)
            self._unanswered(request)
            raise
        except FrameError as exc:
            self.stats.bad_frames += 1
            self._unanswered(request)
            if self.kind == "tcp":
                raise LinkDown(f"bad frame: {exc}") from None  # a TCP stream that lost its framing
            raise NoReply(f"bad frame: {exc}") from None
        finally:
            # The silence runs from the end of the last frame on the line (the reply's last byte;
            # without one, from now): decoding and scheduling the next request overlap it.
            self._quiet_until = (last_byte if last_byte is not None else self.clock()) + self.gap

    def _is_answer(self, reply: Reply, request: Request, tid: int | None, *, fence: bool) -> bool:
        if tid is not None and reply.tid != tid:
            return False
        if not answers(reply, request):
            return False
        # An exception reply has no size: during a fence it may be owed by an earlier request.
        return not (fence and reply.exception is not None)

    def _unanswered(self, request: Request) -> None:
        self._dirty = True
        if self.kind == "rtu":
            self._suspect.setdefault(request.unit, set()).add(request.shape())

    async def _drain(self, silence: float | None = None) -> None:
        """Drop what arrives until the line has been silent for `silence` (default `guard`)."""
        silence = self.guard if silence is None else silence
        start = self.clock()
        dropped = self.link.discard() + self._reader.clear()
        while self.clock() - start < MAX_DRAIN:
            data = await self.link.receive(silence)
            if not data:
                break
            dropped += len(data)
        self._dirty = False
        self.stats.drained_bytes += dropped
        self.stats.guard_seconds += self.clock() - start
        if dropped:
            log.debug("drained %d bytes after a failed transaction", dropped)
