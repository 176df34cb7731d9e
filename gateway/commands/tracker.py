"""Pending device commands and their outcomes, pure (no I/O, no clock of its own).

A `Tracked` command targets one or many devices with one `command_id` (a bulk operation adds a
`setup_id`). Each device goes PENDING → (SENT | PROGRESS* → SUCCESS | FAILED | ERROR | TIMEOUT).
`Tracker` holds the unfinished commands and one heap of deadlines (one entry per command, not per
device: every device of a command shares the deadline set when its publishing ended), and turns
ACKs, sends and expiries into `Update`s that carry the SSE events of device-api.md §5 in order.
ACKs that do not match a pending (command, device) are ignored and counted by reason.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gateway.commands.catalogue import ACK_STATUSES, FINAL_FAILURES
from gateway.devices.validate import DEVICE_ID_RE, Invalid

FINAL = ("SENT", "SUCCESS", "FAILED", "ERROR", "TIMEOUT")
TIMEOUT_ERROR = "Device did not respond"
FINISHED_MEMORY = 512  # finished commands remembered to tell duplicate from late from unknown ACKs

Event = tuple[str, dict[str, Any]]


@dataclass
class DeviceResult:
    status: str = "PENDING"
    error: str | None = None
    at_ms: int | None = None
    progress: dict[str, Any] | None = None
    new_version: str | None = None


@dataclass
class Tracked:
    command_id: str
    command: str
    require_ack: bool
    payload: dict[str, Any]
    timeout_sec: float
    setup_id: str | None = None
    results: dict[str, DeviceResult] = field(default_factory=dict)
    deadline: float | None = None  # monotonic seconds; None until published
    completed: int = 0  # SUCCESS or SENT
    failed: int = 0  # FAILED or ERROR
    timeout: int = 0

    @property
    def total(self) -> int:
        return len(self.results)

    @property
    def pending(self) -> int:
        return self.total - self.completed - self.failed - self.timeout

    @property
    def done(self) -> bool:
        return self.pending == 0

    def _base(self) -> dict[str, Any]:
        d: dict[str, Any] = {"command_id": self.command_id, "command": self.command}
        if self.setup_id is not None:
            d["setup_id"] = self.setup_id
        return d

    def counts(self) -> dict[str, Any]:
        return {"total": self.total, "completed": self.completed, "failed": self.failed, "timeout": self.timeout}

    def progress_event(self) -> Event:
        ratio = (self.completed + self.failed + self.timeout) / self.total * 100 if self.total else 100.0
        pct: float | int = round(ratio, 2)
        if pct == int(pct):
            pct = int(pct)  # the seed writes 0 and 100, not 0.0 and 100.0
        return "progress", {**self._base(), **self.counts(), "pending": self.pending, "progress": pct}

    def device_event(self, device_id: str) -> Event:
        r = self.results[device_id]
        d: dict[str, Any] = {"device_id": device_id, **self._base(), "status": r.status}
        if r.error is not None:
            d["error"] = r.error
        if r.new_version is not None:
            d["new_version"] = r.new_version
        if r.status == "PROGRESS" and r.progress:
            d.update(r.progress)
        d["timestamp"] = r.at_ms
        name = {"SUCCESS": "device-success", "FAILED": "device-failed", "ERROR": "device-failed",
                "TIMEOUT": "device-timeout", "SENT": "command-sent", "PROGRESS": "device-progress"}[r.status]
        return name, d

    def result_rows(self) -> list[dict[str, Any]]:
        rows = []
        for dev, r in self.results.items():
            row: dict[str, Any] = {"device_id": dev, "status": r.status}
            if r.error is not None:
                row["error"] = r.error
            if r.new_version is not None:
                row["new_version"] = r.new_version
            row["timestamp"] = r.at_ms
            rows.append(row)
        return rows

    def final_events(self, now_ms: int) -> list[Event]:
        return [("complete", {**self._base(), **self.counts(), "status": "COMPLETED", "timestamp": now_ms}),
                ("results", {**self._base(), "results": self.result_rows()})]


@dataclass
class Update:
    """What changed for one command: device rows to store, events to store and publish in order."""

    tracked: Tracked
    devices: list[str]
    events: list[Event]
    completed: bool = False


@dataclass(frozen=True)
class Ack:
    command_id: str
    device_id: str
    command: str
    status: str
    error: str | None = None
    new_version: str | None = None
    progress: dict[str, Any] | None = None


def parse_ack(topic_device: str, msg: dict[str, Any]) -> Ack:
    """Check an ACK body (signature already verified); `Invalid` names the field."""
    cid, dev, cmd, status = msg.get("command_id"), msg.get("device_id"), msg.get("command"), msg.get("status")
    if not isinstance(cid, str) or not 1 <= len(cid) <= 128:
        raise Invalid("command_id", "must be a string")
    if dev is not None and dev != topic_device:
        raise Invalid("device_id", "differs from the topic's device id")
    if not DEVICE_ID_RE.match(topic_device):
        raise Invalid("device_id", "not a device id")
    if not isinstance(cmd, str):
        raise Invalid("command", "must be a string")
    if status not in ACK_STATUSES:
        raise Invalid("status", f"must be one of {', '.join(ACK_STATUSES)}")
    error, new_version = msg.get("error"), msg.get("new_version")
    if error is not None and not isinstance(error, str):
        raise Invalid("error", "must be a string")
    if new_version is not None and not isinstance(new_version, str):
        raise Invalid("new_version", "must be a string")
    progress: dict[str, Any] = {}
    pct, nbytes = msg.get("progress"), msg.get("bytes")
    if pct is not None:
        if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100:
            raise Invalid("progress", "must be a percentage 0..100")
        progress["progress"] = pct
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise Invalid("bytes", "must be a non-negative integer")
        progress["bytes"] = nbytes
    return Ack(cid, topic_device, cmd, status, (error or "")[:500] or None, (new_version or "")[:64] or None,
               progress or None)


class Tracker:
    def __init__(self) -> None:
        self.pending: dict[str, Tracked] = {}
        self._heap: list[tuple[float, str]] = []
        self._finished: OrderedDict[str, dict[str, str]] = OrderedDict()
        self.ignored: Counter[str] = Counter()
        self.accepted = 0
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (command, final device status) (metrics)

    def add(self, t: Tracked) -> None:
        self.pending[t.command_id] = t

    def arm(self, command_id: str, deadline: float) -> None:
        """Start the ACK wait of a published command (all its devices share `deadline`)."""
        t = self.pending[command_id]
        t.deadline = deadline
        heapq.heappush(self._heap, (deadline, command_id))

    def next_deadline(self) -> float | None:
        while self._heap and (self._heap[0][1] not in self.pending
                              or self.pending[self._heap[0][1]].deadline != self._heap[0][0]):
            heapq.heappop(self._heap)  # finished or re-armed
        return self._heap[0][0] if self._heap else None

    def _finish(self, t: Tracked) -> None:
        del self.pending[t.command_id]
        self._finished[t.command_id] = {d: r.status for d, r in t.results.items()}
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _outcome(self, t: Tracked, device_id: str) -> Update:
        r = t.results[device_id]
        self.outcomes[(t.command, r.status)] += 1
        if r.status in ("SUCCESS", "SENT"):
            t.completed += 1
        elif r.status in FINAL_FAILURES:
            t.failed += 1
        elif r.status == "TIMEOUT":
            t.timeout += 1
        return Update(t, [device_id], [t.device_event(device_id), t.progress_event()])

    def _close_if_done(self, t: Tracked, u: Update, now_ms: int) -> Update:
        if t.done:
            u.events += t.final_events(now_ms)
            u.completed = True
            self._finish(t)
        return u

    def ack(self, a: Ack, now_ms: int) -> Update | None:
        """Apply an ACK; None when it is ignored (then `ignored[reason]` is counted)."""
        t = self.pending.get(a.command_id)
        if t is None:
            final = self._finished.get(a.command_id, {}).get(a.device_id)
            self.ignored["late" if final == "TIMEOUT" else "duplicate" if final else "unknown"] += 1
            return None
        r = t.results.get(a.device_id)
        if r is None:
            self.ignored["not_targeted"] += 1
            return None
        if r.status in FINAL:
            self.ignored["late" if r.status == "TIMEOUT" else "duplicate"] += 1
            return None
        if r.status == "PENDING" and t.deadline is None:
            self.ignored["not_sent"] += 1  # an ACK for a command we have not published yet
            return None
        if a.command != t.command:
            self.ignored["wrong_command"] += 1
            return None
        if a.status == "PROGRESS":
            if t.command != "UPDATE_FIRMWARE":
                self.ignored["progress_not_allowed"] += 1
                return None
            r.status, r.progress, r.at_ms = "PROGRESS", a.progress, now_ms
            self.accepted += 1
            return Update(t, [a.device_id], [t.device_event(a.device_id)])
        r.status, r.at_ms = a.status, now_ms
        r.error = a.error if a.status in FINAL_FAILURES else None
        if a.status in FINAL_FAILURES and r.error is None:
            r.error = "Device reported failure"
        if a.status == "SUCCESS" and t.command == "UPDATE_FIRMWARE":
            r.new_version = a.new_version or str(t.payload.get("version"))
        self.accepted += 1
        return self._close_if_done(t, self._outcome(t, a.device_id), now_ms)

    def sent(self, command_id: str, now_ms: int) -> Update:
        """A fire-and-forget command was published: every device is SENT and the command is done."""
        t = self.pending[command_id]
        u = Update(t, [], [])
        for dev, r in t.results.items():
            if r.status == "PENDING":
                r.status, r.at_ms = "SENT", now_ms
                self.outcomes[(t.command, "SENT")] += 1
                t.completed += 1
                u.devices.append(dev)
                u.events.append(t.device_event(dev))
        u.events.append(t.progress_event())
        return self._close_if_done(t, u, now_ms)

    def expire(self, now: float, now_ms: int) -> list[Update]:
        """Every command whose deadline is at or before `now`: its unanswered devices become TIMEOUT."""
        out = []
        while (deadline := self.next_deadline()) is not None and deadline <= now:
            _, command_id = heapq.heappop(self._heap)
            out.append(self.time_out(self.pending[command_id], now_ms))
        return out

    def time_out(self, t: Tracked, now_ms: int) -> Update:
        u = Update(t, [], [])
        for dev, r in t.results.items():
            if r.status not in FINAL:
                r.status, r.error, r.at_ms = "TIMEOUT", TIMEOUT_ERROR, now_ms
                part = self._outcome(t, dev)
                u.devices += part.devices
                u.events += part.events
        return self._close_if_done(t, u, now_ms)
