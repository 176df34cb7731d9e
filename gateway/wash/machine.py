"""The state machine of one wash bay (wash-contract.md), pure: no I/O, no clock of its own.

Inputs are commands (`command()`), PLC poll results (`on_poll()`) and the passage of time
(`tick()`); each returns `Effects` that the service carries out: registers to write, sessions to
open or close, a status to publish, the bay row to persist. The state shown is always the PLC's
once it has answered; the gateway adds STARTING (a START written, not yet confirmed), OFFLINE
(no valid answer for `offline_after` polls, or a frozen heartbeat) and START_TIMEOUT.

A session is one PLC session, told apart by the PLC's session counter (docs/decisions.md,
"Fieldbus truth"): a reply whose counter contradicts what the bay knows (not the step of a START
the PLC just took) is held until the next reply confirms it, and so is a reply that would end a
running session without an outcome (IDLE under WASHING); a short OFFLINE spell ends a session only
when the PLC's counter or state says it ended.
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


@dataclass(frozen=True)
class ResetDone:
    """The outcome of a RESET: CLEARED (the PLC took it and left ERROR), STILL_IN_ERROR (it took
    it, the fault is still there), NO_ANSWER (not taken, sent twice), OFFLINE (the bay went
    offline first)."""

    request_id: str
    by: str
    error_code: str | None  # the code shown when the reset was asked for
    outcome: str
    requested_at: float
    at: float


@dataclass
class Effects:
    writes: list[Write] = field(default_factory=list)
    sessions: list[OpenSession | CloseSession] = field(default_factory=list)
    resets: list[ResetDone] = field(default_factory=list)
    publish: bool = False
    persist: bool = False

    def merge(self, other: Effects) -> Effects:
        self.writes += other.writes
        self.sessions += other.sessions
        self.resets += other.resets
        self.publish |= other.publish
        self.persist |= other.persist
        return self

    def __bool__(self) -> bool:
        return bool(self.writes or self.sessions or self.resets or self.publish or self.persist)


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
    plc_session: int | None = None  # the PLC's session counter of the open session, once known


@dataclass
class _Pending:
    action: str  # START | STOP | RESET
    seq: int
    deadline: float
    request_id: str | None
    retried: bool = False
    by: str = ""
    error_code: str | None = None
    at: float = 0.0


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
        self.held: PlcStatus | None = None  # a reply that contradicts the bay, awaiting confirmation
        self.held_count = 0
        self.start_seq: int | None = None  # the seq of the START of the open session
        self.last_progress_publish = -1.0
        self.stop_failed = 0

    # --- commands ---------------------------------------------------------------------------

    def command(self, action: str, course: str | None, request_id: str | None, now: float,
                new_request_id: str, by: str = "") -> tuple[Decision, Effects]:
        """Judge a START, STOP or RESET, whoever sent it (`by` names them for the reset record).
        `new_request_id` is used when none is given (and always for STOP and RESET)."""
        v = self.view
        if action == "START":
            if course not in self.courses:
                known = ", ".join(sorted(self.courses))
                return Decision(Verdict.REJECTED, 400, "VALIDATION_FAILED", f"course must be one of {known}"), Effects()
            if (request_id is not None and request_id == self.last_request_id
                    and (v.state in ACTIVE or v.request_id == request_id)):
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
            self.start_seq = self.seq
            self._set(now, state="STARTING", progress=0, course=course, error_code=None, request_id=rid,
                      plc_session=None)
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
        if action == "RESET":
            if v.state == "OFFLINE":
                return Decision(Verdict.REJECTED, 503, "PLC_OFFLINE", f"{self.bay_id} is offline"), Effects()
            if self.pending is not None and self.pending.action == "RESET":
                return Decision(Verdict.IDEMPOTENT, 200, request_id=self.pending.request_id), Effects()
            if v.state != "ERROR":
                return Decision(Verdict.REJECTED, 409, "CONFLICT",
                                f"{self.bay_id} is {v.state}: there is no error to reset"), Effects()
            rid = new_request_id
            self.seq = self.seq % 65535 + 1
            self.pending = _Pending("RESET", self.seq, now + self.start_timeout, rid, by=by or "unknown",
                                    error_code=v.error_code, at=now)
            return (Decision(Verdict.ACCEPTED, 200, request_id=rid),
                    Effects(writes=[Write("RESET_ERROR", None, self.seq)]))
        return Decision(Verdict.REJECTED, 400, "VALIDATION_FAILED", "action must be START, STOP or RESET"), Effects()

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
        if not self._plausible(r):
            return Effects()
        fx = Effects()
        counter_moved = self.session_counter is not None and r.session_counter != self.session_counter
        first_poll = self.session_counter is None
        self.session_counter = r.session_counter
        p = self.pending
        if p is not None and p.action == "STOP" and r.ack_seq == p.seq:
            self.pending = None  # the PLC took the STOP; CANCELED follows from its state
        if p is not None and p.action == "RESET" and r.ack_seq == p.seq:
            self.pending = None
            outcome = "STILL_IN_ERROR" if (r.error_code or r.state == "ERROR") else "CLEARED"
            fx.resets.append(ResetDone(p.request_id or "", p.by, p.error_code, outcome, p.at, now))
        if self.recovering:
            self.recovering = False
            fx.merge(self._recover(r, now))
            return fx
        plc_state = "ERROR" if r.error_code else r.state
        if p is not None and p.action == "START":
            if r.ack_seq != p.seq or plc_state == "IDLE":
                # The PLC has not taken the START yet: keep showing STARTING.
                return fx.merge(self._progress_only(now, 0))
            self.view.plc_session = r.session_counter
            if plc_state in ("WASHING", "DONE", "CANCELED", "ERROR"):
                self.pending = None
        elif self.view.state in ("IDLE", "DONE", "CANCELED") and not self.session_open and plc_state in (
                "STARTING", "WASHING", "DONE", "CANCELED") and (counter_moved or (first_poll and plc_state in ACTIVE)):
            # A session started on the PLC itself (coin box, local button).
            fx.merge(self._open_local(r, now))
        return fx.merge(self._follow(r, plc_state, now))

    def _plausible(self, r: PlcStatus) -> bool:
        """False for a reply to hold back: its session counter contradicts the bay's (and is not
        the step of a START the PLC just took), or it would end the running session without an
        outcome. The next reply that agrees with it confirms it."""
        known = self.session_counter
        p = self.pending
        started = (p is not None and p.action == "START" and r.ack_seq == p.seq and known is not None
                   and r.session_counter == (known + 1) & 0xFFFFFFFF)
        contradicts = known is not None and r.session_counter != known and not started
        ends_unknown = (self.session_open and not self.recovering and self.view.state in ACTIVE
                        and r.state == "IDLE" and not r.error_code and (p is None or p.action != "START"))
        if not (contradicts or ends_unknown):
            self.held = None
            return True
        h = self.held
        if h is not None and (h.session_counter, h.state) == (r.session_counter, r.state):
            self.held = None
            return True
        self.held = r
        self.held_count += 1
        return False

    def _open_local(self, r: PlcStatus, now: float) -> Effects:
        self.session_open = True
        self.last_request_id = None
        self.start_seq = None
        self._set(now, request_id=None, plc_session=r.session_counter)
        return Effects(sessions=[OpenSession(None, r.course, now)])

    def _error_name(self, r: PlcStatus) -> str:
        """The code shown for a PLC in ERROR. A PLC that latches its ERROR state may clear the
        code once the fault is gone: the code seen last stays shown until the state leaves ERROR."""
        if r.error_name:
            return r.error_name
        v = self.view
        if v.state == "ERROR" and v.error_code not in (None, START_TIMEOUT, PLC_OFFLINE):
            return v.error_code
        return "PLC_ERROR"

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
        write = "RESET_ERROR" if p.action == "RESET" else "STOP"
        if not p.retried:
            p.retried = True
            p.deadline = now + self.start_timeout
            return Effects(writes=[Write(write, None, p.seq)])
        self.pending = None
        if p.action == "RESET":
            return Effects(resets=[ResetDone(p.request_id or "", p.by, p.error_code, "NO_ANSWER", p.at, now)])
        self.stop_failed += 1
        return Effects()

    # --- internals ----------------------------------------------------------------------------

    def _follow(self, r: PlcStatus, plc_state: str, now: float) -> Effects:
        fx = Effects()
        v = self.view
        if plc_state == "ERROR":
            name = self._error_name(r)
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
                self._set(now, state="IDLE", progress=0, course=None, error_code=None, session_id=None, request_id=None,
                          plc_session=None)
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
        """First valid answer after start or after OFFLINE: the PLC's state wins. The open session
        goes on when the PLC is still in it (same session counter, or it shows our START taken),
        and ends with the PLC's outcome when it finished meanwhile; ERROR / PLC_OFFLINE only when
        its outcome cannot be known."""
        fx = Effects(publish=True, persist=True)
        # Number our next command after the last one the PLC took. A new core starts at seq 0, and
        # the PLC still shows the ack_seq of the previous core's last command: were our next START
        # to reuse it, a poll read before the write landed (DONE/CANCELED of the previous wash,
        # that ack_seq) would confirm it, close its session as DONE at once and record the real wash
        # as a second, PLC-local session (one wash, two wash.session facts).
        took_start = self.start_seq is not None and r.ack_seq == self.start_seq
        self.seq = r.ack_seq
        plc_state = "ERROR" if r.error_code else r.state
        v = self.view
        same = self.session_open and (
            (v.plc_session is not None and r.session_counter == v.plc_session)
            or (v.plc_session is None and (took_start or plc_state in ACTIVE)))
        if self.session_open and not same:
            # The PLC is in another session (or none we know of): ours ended while we could not see.
            fx.sessions += self._close("ERROR", PLC_OFFLINE, now)
        elif same and plc_state not in ACTIVE:
            if plc_state in ("DONE", "CANCELED"):
                fx.sessions += self._close(plc_state, None, now)
            elif plc_state == "ERROR":
                fx.sessions += self._close("ERROR", self._error_name(r), now)
            else:
                fx.sessions += self._close("ERROR", PLC_OFFLINE, now)
        if self.pending is not None and self.pending.action != "RESET":
            self.pending = None
        if plc_state == "ERROR":
            self._set(now, state="ERROR", error_code=self._error_name(r), progress=r.progress, course=r.course)
        elif plc_state == "IDLE":
            self._set(now, state="IDLE", progress=0, course=None, error_code=None, session_id=None, request_id=None,
                      plc_session=None)
        else:
            if plc_state in ACTIVE and not self.session_open:
                fx.merge(self._open_local(r, now))
            elif same:
                v.plc_session = r.session_counter
            self._set(now, state=plc_state, progress=r.progress, course=r.course or v.course, error_code=None)
        return fx

    def _go_offline(self, now: float) -> Effects:
        if self.view.state == "OFFLINE":
            return Effects()
        self.recovering = True
        fx = Effects(publish=True, persist=True)
        p = self.pending
        if p is not None and p.action == "RESET":
            fx.resets.append(ResetDone(p.request_id or "", p.by, p.error_code, "OFFLINE", p.at, now))
        self.pending = None
        self.held = None
        # last_heartbeat is kept: a frozen PLC comes back only when its heartbeat moves again.
        self.frozen_polls = 0
        # Progress and course stay as last known: a dashboard keeps showing where the wash was.
        self._set(now, state="OFFLINE", error_code=PLC_OFFLINE)
        return fx

    def _close(self, state: str, error_code: str | None, now: float) -> list[OpenSession | CloseSession]:
        if not self.session_open:
            return []
        self.session_open = False
        self.start_seq = None
        return [CloseSession(state, error_code, now)]

    def _set(self, now: float, **changes: object) -> None:
        for k, val in changes.items():
            setattr(self.view, k, val)
        self.view.changed_at = now
