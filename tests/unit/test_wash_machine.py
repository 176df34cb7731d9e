"""The bay state machine on its own: commands, PLC readings and time, as wash-contract.md says."""

from __future__ import annotations

from dataclasses import dataclass, replace

from gateway.wash.machine import BayMachine, CloseSession, OpenSession, Verdict, View

COURSES = frozenset({"BASIC", "STANDARD", "PREMIUM"})


@dataclass(frozen=True)
class R:
    state: str = "IDLE"
    progress: int = 0
    ack_seq: int = 0
    error_code: int = 0
    error_name: str | None = None
    course: str | None = None
    heartbeat: int = 0
    session_counter: int = 0


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0
        self.hb = 0

    def next(self, dt: float = 1.0) -> float:
        self.t += dt
        self.hb += 1
        return self.t


def idle_bay() -> tuple[BayMachine, Clock]:
    m = BayMachine("bay1", COURSES, start_timeout=10, offline_after=3)
    c = Clock()
    m.on_poll(R(heartbeat=c.hb), c.next())
    assert m.view.state == "IDLE"
    return m, c


def poll(m: BayMachine, c: Clock, r: R, dt: float = 1.0):
    return m.on_poll(replace(r, heartbeat=c.hb + 1), c.next(dt))


def test_full_wash_with_sessions_and_progress_throttle() -> None:
    m, c = idle_bay()
    d, fx = m.command("START", "BASIC", "req-1", c.t, "gen")
    assert d.verdict is Verdict.ACCEPTED and d.request_id == "req-1"
    assert [w.action for w in fx.writes] == ["START"] and isinstance(fx.sessions[0], OpenSession)
    assert m.view.state == "STARTING"
    seq = fx.writes[0].seq
    # The PLC has not taken the command yet: STARTING stays.
    fx = poll(m, c, R(state="IDLE"))
    assert m.view.state == "STARTING" and not fx.sessions
    poll(m, c, R(state="STARTING", ack_seq=seq, course="BASIC", session_counter=1))
    assert m.view.state == "STARTING"
    fx = poll(m, c, R(state="WASHING", ack_seq=seq, course="BASIC", progress=10, session_counter=1))
    assert m.view.state == "WASHING" and fx.publish
    # Progress changes within a second are not all published; 100 always is.
    fx = poll(m, c, R(state="WASHING", ack_seq=seq, course="BASIC", progress=20, session_counter=1), dt=0.2)
    fx2 = poll(m, c, R(state="WASHING", ack_seq=seq, course="BASIC", progress=30, session_counter=1), dt=0.2)
    assert (fx.publish, fx2.publish) == (True, False)
    fx = poll(m, c, R(state="DONE", ack_seq=seq, course="BASIC", progress=100, session_counter=1))
    assert m.view.state == "DONE" and m.view.progress == 100
    assert fx.sessions == [CloseSession("DONE", None, c.t)]
    fx = poll(m, c, R(state="IDLE", ack_seq=seq, session_counter=1))
    assert m.view.state == "IDLE" and m.view.session_id is None and fx.publish and not fx.sessions


def test_idempotent_retry_and_conflicts() -> None:
    m, c = idle_bay()
    m.command("START", "BASIC", "req-1", c.t, "gen")
    d, fx = m.command("START", "BASIC", "req-1", c.t, "gen")
    assert d.verdict is Verdict.IDEMPOTENT and not fx.writes
    d, _ = m.command("START", "BASIC", "req-2", c.t, "gen")
    assert (d.verdict, d.status, d.code) == (Verdict.REJECTED, 409, "BAY_BUSY")
    d, _ = m.command("START", "DELUXE", "req-3", c.t, "gen")
    assert (d.status, d.code) == (400, "VALIDATION_FAILED")


def test_start_without_request_id_gets_one_and_stop_needs_active_bay() -> None:
    m, c = idle_bay()
    d, _ = m.command("STOP", None, None, c.t, "gen-stop")
    assert (d.status, d.code) == (409, "BAY_NOT_ACTIVE")
    d, _ = m.command("START", "PREMIUM", None, c.t, "gen-start")
    assert d.request_id == "gen-start"
    d, fx = m.command("STOP", None, None, c.t, "gen-stop")
    assert d.verdict is Verdict.ACCEPTED and d.request_id == "gen-stop" and fx.writes[0].action == "STOP"


def test_stop_confirmed_by_plc_cancels_session() -> None:
    m, c = idle_bay()
    _, fx = m.command("START", "BASIC", "r", c.t, "g")
    seq = fx.writes[0].seq
    poll(m, c, R(state="WASHING", ack_seq=seq, course="BASIC", progress=40, session_counter=1))
    _, fx = m.command("STOP", None, None, c.t, "g2")
    stop_seq = fx.writes[0].seq
    assert m.view.state == "WASHING"  # until the PLC confirms
    fx = poll(m, c, R(state="CANCELED", ack_seq=stop_seq, course="BASIC", progress=40, session_counter=1))
    assert m.view.state == "CANCELED" and fx.sessions == [CloseSession("CANCELED", None, c.t)]


def test_start_timeout() -> None:
    m, c = idle_bay()
    m.command("START", "BASIC", "r", c.t, "g")
    assert not m.tick(c.t + 9.9).sessions
    fx = m.tick(c.t + 10.1)
    assert m.view.state == "ERROR" and m.view.error_code == "START_TIMEOUT"
    assert fx.sessions == [CloseSession("ERROR", "START_TIMEOUT", c.t + 10.1)] and fx.publish
    # The PLC still reports IDLE without an error: the gateway's error is cleared.
    poll(m, c, R(state="IDLE"), dt=11)
    assert m.view.state == "IDLE"


def test_plc_error_code_and_clear() -> None:
    m, c = idle_bay()
    d, _ = m.command("START", "BASIC", "r", c.t, "g")
    poll(m, c, R(state="WASHING", ack_seq=1, course="BASIC", session_counter=1))
    fx = poll(m, c, R(state="ERROR", error_code=4, error_name="DOOR_OPEN", ack_seq=1, session_counter=1))
    assert (m.view.state, m.view.error_code) == ("ERROR", "DOOR_OPEN")
    assert fx.sessions == [CloseSession("ERROR", "DOOR_OPEN", c.t)]
    d, _ = m.command("START", "BASIC", "r2", c.t, "g")
    assert (d.status, d.code) == (409, "CONFLICT")
    poll(m, c, R(state="IDLE", ack_seq=1, session_counter=1))
    assert (m.view.state, m.view.error_code) == ("IDLE", None)


def test_offline_after_failures_and_recovery_closes_unknown_session() -> None:
    m, c = idle_bay()
    m.command("START", "BASIC", "r", c.t, "g")
    poll(m, c, R(state="WASHING", ack_seq=1, course="BASIC", session_counter=1))
    assert not m.on_poll_failed(c.next()).publish
    m.on_poll_failed(c.next())
    fx = m.on_poll_failed(c.next())
    assert (m.view.state, m.view.error_code) == ("OFFLINE", "PLC_OFFLINE") and fx.publish
    d, _ = m.command("START", "BASIC", "r9", c.t, "g")
    assert (d.status, d.code) == (503, "PLC_OFFLINE")
    # Back: the PLC is idle and cannot tell how the session ended.
    fx = poll(m, c, R(state="IDLE", ack_seq=1, session_counter=1))
    assert m.view.state == "IDLE" and fx.sessions == [CloseSession("ERROR", "PLC_OFFLINE", c.t)]


def test_recovery_finishes_session_with_plc_outcome() -> None:
    m, c = idle_bay()
    m.command("START", "BASIC", "r", c.t, "g")
    poll(m, c, R(state="WASHING", ack_seq=1, course="BASIC", session_counter=1))
    for _ in range(3):
        m.on_poll_failed(c.next())
    fx = poll(m, c, R(state="DONE", ack_seq=1, course="BASIC", progress=100, session_counter=1))
    assert m.view.state == "DONE" and fx.sessions == [CloseSession("DONE", None, c.t)]


def test_frozen_heartbeat_counts_as_offline_and_recovers_when_it_moves() -> None:
    m, c = idle_bay()
    frozen = R(state="IDLE", heartbeat=500)
    m.on_poll(frozen, c.next(0.2))
    for _ in range(30):
        m.on_poll(frozen, c.next(0.2))
    assert m.view.state == "OFFLINE"
    m.on_poll(frozen, c.next(0.2))
    assert m.view.state == "OFFLINE"
    m.on_poll(replace(frozen, heartbeat=501), c.next(0.2))
    assert m.view.state == "IDLE"


def test_polls_faster_than_heartbeat_are_not_frozen() -> None:
    m, c = idle_bay()
    for i in range(50):  # 5 polls per heartbeat tick
        m.on_poll(R(state="IDLE", heartbeat=1000 + i // 5), c.next(0.2))
    assert m.view.state == "IDLE"


def test_session_started_on_the_plc_is_recorded() -> None:
    m, c = idle_bay()
    # A new session counter is believed once a second reply agrees (a lone reply could be
    # another bay's, misread): one poll later the session is open.
    fx = poll(m, c, R(state="WASHING", course="STANDARD", progress=5, session_counter=1))
    assert not fx and m.view.state == "IDLE"
    fx = poll(m, c, R(state="WASHING", course="STANDARD", progress=6, session_counter=1))
    assert fx.sessions == [OpenSession(None, "STANDARD", c.t)]
    assert (m.view.state, m.view.request_id, m.view.course) == ("WASHING", None, "STANDARD")
    fx = poll(m, c, R(state="DONE", course="STANDARD", progress=100, session_counter=1))
    assert fx.sessions == [CloseSession("DONE", None, c.t)]


def test_missed_transitions_are_honoured() -> None:
    m, c = idle_bay()
    # A whole local session happened between two polls: IDLE -> DONE.
    poll(m, c, R(state="DONE", course="BASIC", progress=100, session_counter=1))
    fx = poll(m, c, R(state="DONE", course="BASIC", progress=100, session_counter=1))
    assert m.view.state == "DONE"
    assert [type(s) for s in fx.sessions] == [OpenSession, CloseSession]


def test_restart_mid_wash_resumes_session_from_plc() -> None:
    stored = View(state="WASHING", progress=40, course="BASIC", error_code=None, session_id="s1", request_id="r")
    m = BayMachine("bay1", COURSES, start_timeout=10, offline_after=3, view=stored, session_open=True)
    fx = m.on_poll(R(state="WASHING", progress=55, ack_seq=7, course="BASIC", heartbeat=3, session_counter=4), 2000.0)
    assert m.view.state == "WASHING" and m.view.session_id == "s1" and not fx.sessions
    d, _ = m.command("START", "BASIC", "r", 2000.0, "g")
    assert d.verdict is Verdict.IDEMPOTENT
    fx = m.on_poll(R(state="DONE", progress=100, ack_seq=7, course="BASIC", heartbeat=4, session_counter=4), 2001.0)
    assert fx.sessions == [CloseSession("DONE", None, 2001.0)]


def test_after_a_restart_commands_are_numbered_after_the_plcs_last_ack() -> None:
    # A new core (seq 0) meets a PLC still showing DONE of the wash the previous core started with
    # seq 1. The poll already on the wire when the next START is judged reads that DONE again: it
    # must not confirm the new START (same seq) and close its session as DONE.
    m, c = BayMachine("bay1", COURSES, start_timeout=10, offline_after=3), Clock()
    m.on_poll(R(state="DONE", ack_seq=1, course="BASIC", progress=100, session_counter=5, heartbeat=c.hb), c.next())
    d, fx = m.command("START", "BASIC", "after-restart", c.t, "g")
    assert d.verdict is Verdict.ACCEPTED and fx.writes[0].seq != 1
    fx = poll(m, c, R(state="DONE", ack_seq=1, course="BASIC", progress=100, session_counter=5), dt=0.02)
    assert m.view.state == "STARTING" and not fx.sessions
    seq = m.pending.seq if m.pending else -1
    fx = poll(m, c, R(state="STARTING", ack_seq=seq, course="BASIC", session_counter=6), dt=0.2)
    assert m.view.state == "STARTING" and not fx.sessions  # the accepted session goes on: no second one
    poll(m, c, R(state="WASHING", ack_seq=seq, course="BASIC", progress=5, session_counter=6))
    assert m.view.state == "WASHING" and m.view.request_id == "after-restart"


# --- fieldbus truth: sessions by the PLC's counter, one implausible frame, resets (#16) ----------

def washing_bay() -> tuple[BayMachine, Clock, int]:
    m, c = idle_bay()
    _, fx = m.command("START", "BASIC", "paid-1", c.t, "gen")
    seq = fx.writes[0].seq
    poll(m, c, R(state="WASHING", ack_seq=seq, course="BASIC", progress=10, session_counter=1))
    assert m.view.state == "WASHING" and m.view.plc_session == 1
    return m, c, seq


def test_one_reply_that_contradicts_the_counter_neither_opens_nor_closes_a_session() -> None:
    m, c, seq = washing_bay()
    # Another bay's registers, misread once: IDLE with another counter. Held, nothing happens.
    fx = poll(m, c, R(state="IDLE", ack_seq=3, session_counter=7))
    assert not fx and m.view.state == "WASHING" and m.held_count == 1
    # A lone IDLE with our counter (the wash cannot end without DONE) is held too.
    fx = poll(m, c, R(state="IDLE", ack_seq=seq, session_counter=1))
    assert not fx and m.view.state == "WASHING"
    fx = poll(m, c, R(state="DONE", ack_seq=seq, course="BASIC", progress=100, session_counter=1))
    assert fx.sessions == [CloseSession("DONE", None, c.t)]
    # An idle bay does not open a session on one reply showing another bay's wash.
    poll(m, c, R(state="IDLE", ack_seq=seq, session_counter=1))
    fx = poll(m, c, R(state="WASHING", ack_seq=9, course="PREMIUM", progress=40, session_counter=12))
    assert not fx.sessions and m.view.state == "IDLE"
    fx = poll(m, c, R(state="IDLE", ack_seq=seq, session_counter=1))
    assert not fx.sessions and m.view.state == "IDLE"


def test_a_wash_is_one_session_across_a_short_offline_spell() -> None:
    m, c, seq = washing_bay()
    for _ in range(3):
        m.on_poll_failed(c.next())
    assert (m.view.state, m.view.progress, m.view.course) == ("OFFLINE", 10, "BASIC")  # last known kept
    fx = poll(m, c, R(state="WASHING", ack_seq=seq, course="BASIC", progress=60, session_counter=1))
    assert not fx.sessions and m.view.state == "WASHING" and m.view.request_id == "paid-1"
    for _ in range(3):
        m.on_poll_failed(c.next())
    # It finished while we could not see: closed with the PLC's outcome, not as PLC_OFFLINE.
    fx = poll(m, c, R(state="DONE", ack_seq=seq, course="BASIC", progress=100, session_counter=1))
    assert fx.sessions == [CloseSession("DONE", None, c.t)]


def test_offline_spell_with_another_plc_session_closes_ours_and_opens_the_new_one() -> None:
    m, c, seq = washing_bay()
    for _ in range(3):
        m.on_poll_failed(c.next())
    fx = poll(m, c, R(state="WASHING", ack_seq=seq, course="PREMIUM", progress=5, session_counter=2))
    assert not fx  # a new counter after OFFLINE: confirmed by the next reply first
    fx = poll(m, c, R(state="WASHING", ack_seq=seq, course="PREMIUM", progress=6, session_counter=2))
    assert fx.sessions == [CloseSession("ERROR", "PLC_OFFLINE", c.t), OpenSession(None, "PREMIUM", c.t)]
    assert m.view.plc_session == 2 and m.view.request_id is None


def test_latched_error_statuses_are_consistent_and_reset_is_recorded() -> None:
    m, c = idle_bay()
    poll(m, c, R(state="ERROR", error_code=4, error_name="DOOR_OPEN"))
    assert (m.view.state, m.view.error_code) == ("ERROR", "DOOR_OPEN")
    # The fault is gone, the PLC latches state 5 with code 0: the code seen stays shown.
    fx = poll(m, c, R(state="ERROR"))
    assert (m.view.state, m.view.error_code) == ("ERROR", "DOOR_OPEN") and not fx.publish
    d, _ = m.command("START", "BASIC", None, c.t, "g")
    assert (d.status, d.code) == (409, "CONFLICT")
    d, fx = m.command("RESET", None, None, c.t, "reset-1", by="technician:somchai")
    assert d.verdict is Verdict.ACCEPTED and [w.action for w in fx.writes] == ["RESET_ERROR"]
    seq = fx.writes[0].seq
    d2, fx2 = m.command("RESET", None, None, c.t, "reset-2", by="technician:somchai")
    assert d2.verdict is Verdict.IDEMPOTENT and d2.request_id == "reset-1" and not fx2.writes
    fx = poll(m, c, R(state="IDLE", ack_seq=seq))
    assert [(r.request_id, r.by, r.error_code, r.outcome) for r in fx.resets] == [
        ("reset-1", "technician:somchai", "DOOR_OPEN", "CLEARED")]
    assert (m.view.state, m.view.error_code) == ("IDLE", None)
    d, _ = m.command("RESET", None, None, c.t, "reset-3")
    assert (d.status, d.code) == (409, "CONFLICT")


def test_recovery_into_a_latched_error_shows_one_consistent_status() -> None:
    m, c = idle_bay()
    for _ in range(3):
        m.on_poll_failed(c.next())
    fx = poll(m, c, R(state="ERROR"))  # back from OFFLINE into a latched error whose code was cleared
    assert fx.publish and (m.view.state, m.view.error_code) == ("ERROR", "PLC_ERROR")
    fx = poll(m, c, R(state="ERROR"))
    assert not fx.publish


def test_unanswered_reset_is_sent_twice_then_recorded_as_no_answer() -> None:
    m, c = idle_bay()
    poll(m, c, R(state="ERROR", error_code=5, error_name="MOTOR_FAULT"))
    _, fx = m.command("RESET", None, None, c.t, "r1", by="mqtt:backend")
    fx = m.tick(c.t + 11)
    assert [w.action for w in fx.writes] == ["RESET_ERROR"] and not fx.resets
    fx = m.tick(c.t + 22)
    assert [(r.outcome, r.error_code) for r in fx.resets] == [("NO_ANSWER", "MOTOR_FAULT")]
    # Taken, but the fault is still there.
    _, fx = m.command("RESET", None, None, c.t, "r2", by="cli:root")
    fx = poll(m, c, R(state="ERROR", error_code=5, error_name="MOTOR_FAULT", ack_seq=fx.writes[0].seq))
    assert [r.outcome for r in fx.resets] == ["STILL_IN_ERROR"]
