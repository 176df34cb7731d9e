"""The state machine of one wash bay (wash-contract.md), pure: no I/O, no clock of its own.

Inputs are commands (`command()`), PLC poll results (`on_poll()`) and the passage of time
(`tick()`); each returns `Effects` that the service carries out: registers to write, sessions to
open or close, a status to publish, the bay row to persist. The state shown is always the PLC's
once it has answered; the gateway adds STARTING (a START written, not yet confirmed), OFFLINE
(no valid answer for `offline_after` polls, or a frozen heartbeat) and START_TIMEOUT.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from plc.profile import PlcStatus

ACTIVE = frozenset({"STARTING", "WASHING"})
START_TIMEOUT = "START_TIMEOUT"
PLC_OFFLINE = "PLC_OFFLINE"
# The PLC increments its heartbeat every second (plc-register-map.md).
HEARTBEAT_PERIOD = 1.0


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    IDEMPOTENT = "idempotent"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    status: int = 200
    code: str | None = None
    message: str = ""
    request_id: str | None = None


@dataclass(frozen=True)
class Write:
    action: str  # START | STOP | RESET_ERROR
    course: str | None
    seq: int


@dataclass(frozen=True)
class OpenSession:
    request_id: str | None
    course: str | None
    at: float


@dataclass(frozen=True)
class CloseSession:
    state: str
    error_code: str | None
    at: float


@dataclass
class Effects:
    writes: list[Write] = field(default_factory=list)
    sessions: list[OpenSession | CloseSession] = field(default_factory=list)
    publish: bool = False
    persist: bool = False

    def merge(self, other: Effects) -> Effects:
        self.writes += other.writes
        self.sessions += other.sessions
        self.publish |= other.publish
        self.persist |= other.persist
        return self


@dataclass
class View:
    """What `wash/{bayId}/status` shows."""

    state: str = "OFFLINE"
    progress: int = 0
    course: str | None = None
    error_code: str | None = PLC_OFFLINE
    session_id: str | None = None
    request_id: str | None = None
    changed_at: float = 0.0


@dataclass
class _Pending:
    action: str
    seq: int
    deadline: float
    request_id: str | None
    retried: bool = False


class BayMachine:
    def __init__(self, bay_id: str, courses: frozenset[str], *, start_timeout: float, offline_after: int,
                 view: View | None = None, session_open: bool = False) -> None:
        self.bay_id = bay_id
        self.courses = courses
        self.start_timeout = start_timeout
        self.offline_after = offline_after
        self.view = view or View()
        # Until the first valid poll the shown state is the last one stored: treat it as a recovery.
        self.recovering = True
        self.session_open = session_open
        self.last_request_id: str | None = self.view.request_id
        self.pending: _Pending | None = None
        self.seq = 0
        self.failures = 0
        self.frozen_polls = 0
        self.last_heartbeat: int | None = None
        self.heartbeat_moved_at = 0.0
        self.session_counter: int | None = None
        self.last_progress_publish = -1.0
        self.stop_failed = 0

    # --- commands ---------------------------------------------------------------------------

    def command(self, action: str, course: str | None, request_id: str | None, now: float,
                new_request_id: str) -> tuple[Decision, Effects]:
        """Judge a START or STOP, whoever sent it. `new_request_id` is used when none is given."""
        v = self.view
        if action == "START":
            if course not in self.courses:
                known = ", ".join(sorted(self.courses))
                return Decision(Verdict.REJECTED, 400, "VALIDATION_FAILED", f"course must be one of {known}"), Effects()
            if request_id is not None and request_id == self.last_request_id and (v.state in ACTIVE or v.request_id == request_id):
                return Decision(Verdict.IDEMPOTENT, 200, request_id=request_id), Effects()
            if v.state == "OFFLINE":
                return Decision(Verdict.REJECTED, 503, "PLC_OFFLINE", f"{self.bay_id} is offline"), Effects()
            if v.state in ACTIVE:
                return Decision(Verdict.REJECTED, 409, "BAY_BUSY", f"{self.bay_id} is {v.state}"), Effects()
            if v.state == "ERROR":
                return Decision(Verdict.REJECTED, 409, "CONFLICT",
                                f"{self.bay_id} is in ERROR ({v.error_code}) until the error is cleared"), Effects()
            rid = request_id or new_request_id
            self.seq = self.seq % 65535 + 1
            self.pending = _Pending("START", self.seq, now + self.start_timeout, rid)
            self.last_request_id = rid
            self.session_open = True
            self._set(now, state="STARTING", progress=0, course=course, error_code=None, request_id=rid)
            fx = Effects(writes=[Write("START", course, self.seq)], sessions=[OpenSession(rid, course, now)],
                         publish=True, persist=True)
            return Decision(Verdict.ACCEPTED, 200, request_id=rid), fx
        if action == "STOP":
            if v.state not in ACTIVE:
                return Decision(Verdict.REJECTED, 409, "BAY_NOT_ACTIVE", f"{self.bay_id} is {v.state}"), Effects()
            rid = new_request_id
            self.seq = self.seq % 65535 + 1
            self.pending = _Pending("STOP", self.seq, now + self.start_timeout, rid)
            return Decision(Verdict.ACCEPTED, 200, request_id=rid), Effects(writes=[Write("STOP", None, self.seq)])
        return Decision(Verdict.REJECTED, 400, "VALIDATION_FAILED", "action must be START or STOP"), Effects()

    # --- PLC ----------------------------------------------------------------------------------

    def on_poll_failed(self, now: float) -> Effects:
        self.failures += 1
        if self.failures >= self.offline_after:
            return self._go_offline(now)
        return Effects()

    def on_poll(self, r: PlcStatus, now: float) -> Effects:
        self.failures = 0
        if self.last_heartbeat is not None and r.heartbeat == self.last_heartbeat:
            # Polls are faster than the 1 Hz heartbeat: frozen means unchanged for
            # `offline_after` polls *and* `offline_after` heartbeat periods.
            self.frozen_polls += 1
            if (self.frozen_polls >= self.offline_after
                    and now - self.heartbeat_moved_at > self.offline_after * HEARTBEAT_PERIOD):
                return self._go_offline(now)
            if self.view.state == "OFFLINE":
                return Effects()
        else:
            self.frozen_polls = 0
            self.heartbeat_moved_at = now
        self.last_heartbeat = r.heartbeat
        fx = Effects()
        counter_moved = self.session_counter is not None and r.session_counter != self.session_counter
        first_poll = self.session_counter is None
        self.session_counter = r.session_counter
        p = self.pending
        if p is not None and p.action == "STOP" and r.ack_seq == p.seq:
            self.pending = None  # the PLC took the STOP; CANCELED follows from its state
        if self.recovering:
            self.recovering = False
            fx.merge(self._recover(r, now))
            return fx
        plc_state = "ERROR" if r.error_code else r.state
        if p is not None and p.action == "START":
            if r.ack_seq != p.seq or plc_state == "IDLE":
                # The PLC has not taken the START yet: keep showing STARTING.
                return fx.merge(self._progress_only(now, 0))
            if plc_state in ("WASHING", "DONE", "CANCELED", "ERROR"):
                self.pending = None
        elif self.view.state in ("IDLE", "DONE", "CANCELED") and not self.session_open and plc_state in (
                "STARTING", "WASHING", "DONE", "CANCELED") and (counter_moved or (first_poll and plc_state in ACTIVE)):
            # A session started on the PLC itself (coin box, local button).
            self.session_open = True
            self.last_request_id = None
            fx.sessions.append(OpenSession(None, r.course, now))
            self._set(now, request_id=None)
        return fx.merge(self._follow(r, plc_state, now))

    def tick(self, now: float) -> Effects:
        p = self.pending
        if p is None or now < p.deadline:
            return Effects()
        if p.action == "START":
            self.pending = None
            fx = Effects(publish=True, persist=True)
            self._set(now, state="ERROR", error_code=START_TIMEOUT, progress=0)
            fx.sessions += self._close("ERROR", START_TIMEOUT, now)
            return fx
        if not p.retried:
            p.retried = True
            p.deadline = now + self.start_timeout
            return Effects(writes=[Write("STOP", None, p.seq)])
        self.pending = None
        self.stop_failed += 1
        return Effects()

    # --- internals ----------------------------------------------------------------------------

    def _follow(self, r: PlcStatus, plc_state: str, now: float) -> Effects:
        fx = Effects()
        v = self.view
        if plc_state == "ERROR":
            name = r.error_name or "PLC_ERROR"
            if v.state != "ERROR" or v.error_code != name:
                self._set(now, state="ERROR", error_code=name, progress=r.progress)
                fx.publish = fx.persist = True
                fx.sessions += self._close("ERROR", name, now)
            return fx
        if plc_state == "IDLE":
            if v.state != "IDLE":
                if v.state in ACTIVE:
                    # The PLC went idle under a running session without DONE: outcome unknown.
                    fx.sessions += self._close("ERROR", PLC_OFFLINE, now)
                self._set(now, state="IDLE", progress=0, course=None, error_code=None, session_id=None, request_id=None)
                fx.publish = fx.persist = True
            return fx
        if plc_state in ACTIVE:
            course = r.course or v.course
            if v.state != plc_state or v.course != course or v.error_code is not None:
                self._set(now, state=plc_state, course=course, error_code=None, progress=r.progress)
                fx.publish = fx.persist = True
            else:
                fx.merge(self._progress_only(now, r.progress))
            return fx
        # DONE or CANCELED
        if v.state != plc_state:
            progress = 100 if plc_state == "DONE" else r.progress
            self._set(now, state=plc_state, progress=progress, course=r.course or v.course, error_code=None)
            fx.publish = fx.persist = True
            fx.sessions += self._close(plc_state, None, now)
        return fx

    def _progress_only(self, now: float, progress: int) -> Effects:
        v = self.view
        if progress == v.progress:
            return Effects()
        v.progress = progress
        # At most once a second, but always at 0 and 100.
        if progress in (0, 100) or now - self.last_progress_publish >= 1.0:
            self.last_progress_publish = now
            v.changed_at = now
            return Effects(publish=True)
        return Effects()

    def _recover(self, r: PlcStatus, now: float) -> Effects:
        """First valid answer after start or after OFFLINE: the PLC's state wins."""
        fx = Effects(publish=True, persist=True)
        # Number our next command after the last one the PLC took. A new core starts at seq 0, and
        # the PLC still shows the ack_seq of the previous core's last command: were our next START
        # to reuse it, a poll read before the write landed (DONE/CANCELED of the previous wash,
        # that ack_seq) would confirm it, close its session as DONE at once and record the real wash
        # as a second, PLC-local session (one wash, two wash.session facts).
        self.seq = r.ack_seq
        plc_state = "ERROR" if r.error_code else r.state
        if self.session_open and plc_state not in ACTIVE:
            if plc_state in ("DONE", "CANCELED"):
                fx.sessions += self._close(plc_state, None, now)
            elif plc_state == "ERROR":
                fx.sessions += self._close("ERROR", r.error_name, now)
            else:
                fx.sessions += self._close("ERROR", PLC_OFFLINE, now)
        self.pending = None
        if plc_state == "ERROR":
            self._set(now, state="ERROR", error_code=r.error_name, progress=r.progress, course=r.course)
        elif plc_state == "IDLE":
            self._set(now, state="IDLE", progress=0, course=None, error_code=None, session_id=None, request_id=None)
        else:
            if plc_state in ACTIVE and not self.session_open:
                self.session_open = True
                fx.sessions.append(OpenSession(None, r.course, now))
                self.view.request_id = None
            self._set(now, state=plc_state, progress=r.progress, course=r.course, error_code=None)
        return fx

    def _go_offline(self, now: float) -> Effects:
        if self.view.state == "OFFLINE":
            return Effects()
        self.recovering = True
        self.pending = None
        # last_heartbeat is kept: a frozen PLC comes back only when its heartbeat moves again.
        self.frozen_polls = 0
        self._set(now, state="OFFLINE", error_code=PLC_OFFLINE, progress=0)
        return Effects(publish=True, persist=True)

    def _close(self, state: str, error_code: str | None, now: float) -> list[OpenSession | CloseSession]:
        if not self.session_open:
            return []
        self.session_open = False
        return [CloseSession(state, error_code, now)]

    def _set(self, now: float, **changes: object) -> None:
        for k, val in changes.items():
            setattr(self.view, k, val)
        self.view.changed_at = now
