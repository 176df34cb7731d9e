"""The outbox drainer: delivers pending `OutboxEvent` rows to the cloud (uplink.md).

Contract
- `OutboxDrainer(config, key, db)` does no I/O. `await run()` drains until cancelled; cancelling
  it aborts an HTTP request in flight and returns once the worker thread is idle and closed.
- Delivery: `POST {cloud.url}/api/v1/gateways/{site.id}/events` with `{"events": [...]}` (each
  element is the stored event JSON, sent byte for byte), signed `x-signature` =
  sha256(raw body || key). Batches hold at most `outbox.batch_max_events` events and
  `outbox.batch_max_bytes` bytes of body (an event larger than that travels alone). Ids the cloud
  lists in `data.accepted` are delivered: this drainer never sends them again, and marks them
  `sent` (with `sent_at`, epoch seconds) in one write per `outbox.mark_sent_delay_sec` (at once
  when it is 0 or when `batch_max_events` wait, before housekeeping, and when it stops): on an SD
  card one write for many deliveries instead of one each. The others stay pending and are
  retried after a backoff (a cloud that accepts only part of a batch has chosen its own order
  for them). A batch may be delivered twice (a crash or kill after the cloud's commit, before
  our mark): delivery is at-least-once and the cloud deduplicates by id.
- Order: batches are taken strictly in `seq` order and sent one at a time, so an event never
  reaches the cloud before an earlier *pending* event of its partition (or of any partition).
- Failures (no connection, timeout, 5xx, 408, 429, an unreadable answer): exponential backoff
  with full jitter, uniform in [backoff_min, min(backoff_max, backoff_min * 2^failures)], at least
  a Retry-After the cloud sent (capped at backoff_max). `wake()` does not cut a backoff short.
- Poison: a 4xx other than 408/429 rejects the whole request. The batch is split in halves, sent
  in order (left first), recursively, until the rejected single event is found; it is marked
  `dead` with `last_error` (visible on the technician page) and the others go on. Exceptions:
  401, 403, 404 and 405 (and 3xx) are about the channel (key, site id, URL), not an event: they are
  retried with backoff and reported as `degraded`, never parked (a wrong key must not kill the
  whole outbox).
- A partition whose event died: its later events are delivered normally. The dead event leaves
  the ordered stream (it is no longer pending); holding the partition back instead would stop,
  for example, every later money record of that device behind one malformed event until a
  technician acts. The cloud can still place a dead event if it is requeued: it keeps its id and
  `occurred_at`. Dead rows are never pruned automatically.
- Retention (housekeeping, at start and every `housekeeping_interval_sec`): delivered events
  older than `delivered_retention_days` are deleted; when the pending events' total `size`
  exceeds `outbox.max_bytes`, the oldest pending coalescible events (`wash.status`,
  `device.status`) are deleted first, then the oldest of the other non-protected types
  (registrations, lifecycle, configs). `device.event_logs`, `wash.session`, `payment.updated` and
  `command.result` are never dropped: if they alone exceed the cap the drainer is `degraded`.
- Threads: HTTP (http.client, one keep-alive connection, `cloud.timeout_sec` per connect and
  read) and every database statement run in one dedicated worker thread (`DbThread`), so
  the asyncio loop never blocks; writes are IMMEDIATE transactions. Cancelling shuts the socket
  down under a blocked request (a TCP connect still in progress runs out its timeout). With an
  empty `cloud.url` only housekeeping runs.
- `state()` is a snapshot of the counters for the health report; `degraded` says whether the
  site needs attention (over the cap with protected events, or the cloud refusing the site).

Parts: the HTTP client is `gateway.uplink.http`, the outbox SQL `gateway.uplink.outbox_sql`, the
backoff `gateway.backoff`; this module is the loop and its bookkeeping.

`python -m gateway.uplink.drainer --database PATH --url URL --site-id ID` runs a drainer alone
(key in $CARWASH_UPLINK_KEY) until SIGTERM/SIGINT (`gateway.uplink.cli`): for tests, benchmarks
and diagnostics; the core runs `OutboxDrainer` in its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import logging
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from peewee import SqliteDatabase

from gateway.backoff import Backoff
from gateway.clock import epoch_s, iso_z, utc_now
from gateway.config import CloudConfig, Config, OutboxConfig
from gateway.store.dbthread import DbThread
from gateway.uplink import outbox_sql
from gateway.uplink.http import BODY_OVERHEAD, EventsClient
from gateway.uplink.outbox_sql import COALESCIBLE_TYPES, PROTECTED_TYPES, Row

log = logging.getLogger(__name__)

KEY_ENV = "CARWASH_UPLINK_KEY"

class _Kind(enum.Enum):
    IDLE = "idle"  # nothing pending
    PROGRESS = "progress"  # the batch was settled (sent or dead): go on at once
    RETRY = "retry"  # back off, then try the head of the queue again


@dataclass
class _Step:
    kind: _Kind
    retry_after: float | None = None


@dataclass
class _Counters:
    sent: int = 0
    dead: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    backlog: int = 0
    pending_bytes: int = 0
    dead_total: int = 0
    last_error: str | None = None
    last_error_at: str | None = None
    last_success_at: str | None = None
    consecutive_failures: int = 0
    next_attempt_at: str | None = None
    over_cap: bool = False
    channel_error: str | None = None
    phase: str = "stopped"  # stopped | housekeeping | sending | backoff | idle
    polls: int = 0  # reads of the queue
    dropped_by_type: dict[str, int] = field(default_factory=dict)


class OutboxDrainer:
    """Drains the outbox to the cloud; see the module docstring for the whole contract."""

    def __init__(self, config: Config, key: str, db: SqliteDatabase, *, poll_interval_sec: float = 5.0,
                 housekeeping_interval_sec: float = 60.0, rng: random.Random | None = None) -> None:
        self._cloud: CloudConfig = config.cloud
        self._outbox: OutboxConfig = config.outbox
        self._site_id = config.site.id
        self._key = key
        self._db = db
        self._poll_interval = poll_interval_sec
        self._housekeeping_interval = housekeeping_interval_sec
        self._rng = rng or random.Random()
        url = urllib.parse.urlsplit(self._cloud.url) if self._cloud.url else None
        self._http = EventsClient(url, self._site_id, key, self._cloud.timeout_sec) if url is not None else None
        self._backoff = Backoff(self._outbox.backoff_min_sec, self._outbox.backoff_max_sec, self._rng)
        self._lock = threading.Lock()  # counters: written by the worker, read by state()
        self._c = _Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_event: asyncio.Event | None = None
        self._running = False
        # Delivered but not yet marked sent in the database (event id -> seq), and the monotonic
        # time by which they must be written; both under _lock (housekeeping may run in any thread).
        self._unmarked: dict[str, int] = {}
        self._marks_due: float | None = None

    # --- public surface ----------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False when no cloud URL is configured (only housekeeping runs)."""
        return self._http is not None

    @property
    def degraded(self) -> bool:
        with self._lock:
            return self._c.over_cap or self._c.channel_error is not None

    def wake(self) -> None:
        """Start a drain at once (after new events); safe from any thread, a no-op when not
        running or while backing off (the backoff is kept)."""
        loop, event = self._loop, self._wake_event
        if loop is None or event is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: the drainer is gone
                loop.call_soon_threadsafe(event.set)

    def state(self) -> dict[str, Any]:
        """Snapshot for the health page (no I/O: figures as of the last step/housekeeping)."""
        with self._lock:
            c = self._c
            reasons = []
            if c.over_cap:
                reasons.append("outbox over its size cap with events that are never dropped")
            if c.channel_error:
                reasons.append(f"cloud refuses the site: {c.channel_error}")
            return {
                "enabled": self.enabled,
                "running": self._running,
                "degraded": bool(reasons),
                "degraded_reasons": reasons,
                "sent": c.sent,
                "dead": c.dead,
                "dead_total": c.dead_total,
                "dropped": c.dropped,
                "dropped_bytes": c.dropped_bytes,
                "dropped_by_type": dict(c.dropped_by_type),
                "backlog": c.backlog,
                "pending_bytes": c.pending_bytes,
                "max_bytes": self._outbox.max_bytes,
                "last_error": c.last_error,
                "last_error_at": c.last_error_at,
                "last_success_at": c.last_success_at,
                "consecutive_failures": c.consecutive_failures,
                "next_attempt_at": c.next_attempt_at,
                "phase": c.phase,
                "polls": c.polls,
            }

    async def run(self) -> None:
        """Drain until cancelled (see the module docstring)."""
        if self._running:
            raise RuntimeError("OutboxDrainer.run() is already running")
        loop = asyncio.get_running_loop()
        self._loop, self._wake_event, self._running = loop, asyncio.Event(), True
        if self._http is not None:
            self._http.resume()
        worker = DbThread("uplink-drainer", self._db)  # HTTP and SQL, one at a time, off the loop
        self._backoff.reset()
        next_housekeeping = loop.time()
        try:
            while True:
                if loop.time() >= next_housekeeping:
                    self._phase("housekeeping")
                    try:
                        await worker.run(self.housekeeping)
                    except Exception:
                        log.exception("uplink: outbox housekeeping failed")
                    next_housekeeping = loop.time() + self._housekeeping_interval
                if not self.enabled:
                    self._phase("idle")
                    await asyncio.sleep(max(0.0, next_housekeeping - loop.time()))
                    continue
                # Cleared before the fetch: a wake() during the step makes the next wait return.
                self._wake_event.clear()
                self._phase("sending")
                try:
                    step = await worker.run(self._step)
                except Exception as exc:  # a database error: keep the loop alive, retry later
                    log.exception("uplink: drain step failed")
                    self._note_failure(f"{type(exc).__name__}: {exc}")
                    step = _Step(_Kind.RETRY)
                due_in = self._marks_due_in()
                if due_in <= 0 or (step.kind is _Kind.RETRY and due_in < float("inf")):  # a backoff may be long
                    await self._write_marks_in(worker)
                if step.kind is _Kind.PROGRESS:
                    self._backoff.reset()
                    continue
                if step.kind is _Kind.RETRY:
                    delay = self._backoff.failure(step.retry_after)
                    with self._lock:
                        self._c.next_attempt_at = iso_z(utc_now() + dt.timedelta(seconds=delay))
                        self._c.phase = "backoff"
                    await asyncio.sleep(delay)  # wake() does not shorten a backoff
                    with self._lock:
                        self._c.next_attempt_at = None
                    continue
                self._backoff.reset()
                timeout = max(0.0, min(self._poll_interval, next_housekeeping - loop.time(), self._marks_due_in()))
                self._phase("idle")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_event.wait(), timeout)
        finally:
            if self._http is not None:
                self._http.abort()
            try:
                # Queued behind a step still running (its HTTP request was just aborted).
                await worker.run(self._close_worker)
            finally:
                await worker.close()  # closes the worker's database connection too
                self._phase("stopped")
                self._running = False
                self._loop = self._wake_event = None

    # --- housekeeping (any thread; the drainer runs it in its worker) --------------------------

    def housekeeping(self) -> None:
        """Write waiting marks, prune delivered events, enforce the size cap, refresh the backlog
        figures."""
        self.write_marks()
        self.prune_delivered()
        self.enforce_retention()
        # Each through its partial index: housekeeping never reads the whole table.
        pending, pending_bytes, dead = outbox_sql.queue_figures(self._db)
        with self._lock:
            self._c.backlog, self._c.pending_bytes, self._c.dead_total = pending, pending_bytes, dead

    def prune_delivered(self) -> int:
        """Delete sent events older than delivered_retention_days; returns how many."""
        cutoff = epoch_s(utc_now() - dt.timedelta(days=self._outbox.delivered_retention_days))
        n = outbox_sql.prune_sent_before(self._db, cutoff)
        if n:
            log.info("uplink: pruned %d delivered outbox events older than %d days", n,
                     self._outbox.delivered_retention_days)
        return n

    def enforce_retention(self) -> int:
        """Drop the oldest droppable pending events while the pending total exceeds max_bytes;
        returns how many were dropped. Sets `degraded` when protected events alone exceed it."""
        cap = self._outbox.max_bytes
        result = outbox_sql.drop_over_cap(self._db, cap)
        dropped, freed_total, excess = result.by_type, result.bytes, result.excess
        count = sum(dropped.values())
        over = excess > 0
        with self._lock:
            was_over = self._c.over_cap
            self._c.over_cap = over
            self._c.dropped += count
            self._c.dropped_bytes += freed_total
            for typ, n in dropped.items():
                self._c.dropped_by_type[typ] = self._c.dropped_by_type.get(typ, 0) + n
        if count:
            log.warning("uplink: outbox over its cap of %d bytes: dropped %d oldest events (%s)", cap, count,
                        ", ".join(f"{n} {t}" for t, n in sorted(dropped.items())))
        if over and not was_over:
            log.error("uplink: outbox still %d bytes over its cap with events that are never dropped: degraded",
                      excess)
        elif was_over and not over:
            log.info("uplink: outbox back under its cap")
        return count

    # --- the worker's drain step -------------------------------------------------------------

    def _step(self) -> _Step:
        rows, reached_end = self._fetch()
        if not rows:
            with self._lock:
                self._c.backlog = 0
            return _Step(_Kind.IDLE)
        with self._lock:
            settled_before = self._c.sent + self._c.dead
        step = self._deliver(rows)
        with self._lock:
            settled = self._c.sent + self._c.dead - settled_before
            if reached_end:  # we saw the whole queue: what is left of it is exact
                self._c.backlog = len(rows) - settled
            else:
                self._c.backlog = max(self._c.backlog - settled, len(rows) - settled)
        return step

    def _fetch(self) -> tuple[list[Row], bool]:
        """The head of the queue within the batch limits; and whether it is the whole queue."""
        # Delivered rows not yet marked are still pending in the database: read past them.
        with self._lock:
            skip = set(self._unmarked)
            self._c.polls += 1
        fetched, whole = outbox_sql.pending_head(self._db, self._outbox.batch_max_events + len(skip), skip)
        rows: list[Row] = []
        size = BODY_OVERHEAD
        for row in fetched:
            if len(rows) == self._outbox.batch_max_events:
                return rows, False
            add = len(row.data) + (1 if rows else 0)
            if rows and size + add > self._outbox.batch_max_bytes:
                return rows, False
            rows.append(row)
            size += add
        return rows, whole

    def _deliver(self, rows: list[Row]) -> _Step:
        assert self._http is not None
        answer = self._http.post([r.data for r in rows])
        if answer.kind == "stopped":
            return _Step(_Kind.RETRY)
        if answer.kind == "ok":
            done = [r for r in rows if r.event_id in answer.accepted]
            rest = [r for r in rows if r.event_id not in answer.accepted]
            self._mark_sent(done)
            self._note_success()
            if rest:
                self._mark_attempt(rest, "not accepted by the cloud")
                self._note_failure(f"cloud accepted {len(done)} of {len(rows)} events")
                return _Step(_Kind.RETRY)
            return _Step(_Kind.PROGRESS)
        if answer.kind == "reject":
            if len(rows) == 1:
                self._mark_dead(rows[0], answer.error)
                return _Step(_Kind.PROGRESS)
            # Left half first: nothing overtakes an earlier pending event.
            mid = len(rows) // 2
            left = self._deliver(rows[:mid])
            if left.kind is not _Kind.PROGRESS:
                return left
            return self._deliver(rows[mid:])
        self._mark_attempt(rows, answer.error)
        self._note_failure(answer.error, channel=answer.kind == "channel")
        return _Step(_Kind.RETRY, answer.retry_after)

    def _close_worker(self) -> None:
        """In the worker thread at the end: the delivered events' marks and the HTTP connection."""
        if self._http is not None:
            self._http.close()
        try:
            self.write_marks()
        except Exception:  # as after a crash: they stay pending, are sent again and deduplicated
            log.exception("uplink: marking %d delivered events sent failed", len(self._unmarked))

    # --- database writes (worker thread) -----------------------------------------------------

    def _mark_sent(self, rows: list[Row]) -> None:
        """Delivered: never sent again by this drainer; marked in the database by write_marks()."""
        if not rows:
            return
        with self._lock:
            if not self._unmarked:
                self._marks_due = time.monotonic() + self._outbox.mark_sent_delay_sec
            self._unmarked.update((r.event_id, r.seq) for r in rows)
            self._c.sent += len(rows)
            waiting = len(self._unmarked)
        if self._outbox.mark_sent_delay_sec <= 0 or waiting >= self._outbox.batch_max_events:
            self.write_marks()

    def write_marks(self) -> int:
        """Mark every delivered event sent, in one transaction; returns how many."""
        with self._lock:
            marks = dict(self._unmarked)
        if not marks:
            return 0
        try:
            outbox_sql.mark_sent(self._db, marks, epoch_s())
        except Exception:
            with self._lock:  # try again later, not in a tight loop
                self._marks_due = time.monotonic() + self._outbox.backoff_min_sec
            raise
        with self._lock:
            for event_id in marks:
                del self._unmarked[event_id]
            if not self._unmarked:
                self._marks_due = None
        return len(marks)

    async def _write_marks_in(self, worker: DbThread) -> None:
        try:
            await worker.run(self.write_marks)
        except Exception:
            log.exception("uplink: marking %d delivered events sent failed; retrying", len(self._unmarked))

    def _marks_due_in(self) -> float:
        """Seconds until delivered events must be marked (inf when none wait)."""
        with self._lock:
            due = self._marks_due
        return float("inf") if due is None else max(0.0, due - time.monotonic())

    def _mark_attempt(self, rows: list[Row], error: str) -> None:
        outbox_sql.mark_attempt(self._db, rows, error)

    def _mark_dead(self, row: Row, error: str) -> None:
        outbox_sql.mark_dead(self._db, row, error)
        with self._lock:
            self._c.dead += 1
            self._c.dead_total += 1
        log.warning("uplink: event %s (%s, seq %d) refused by the cloud, parked as dead: %s",
                    row.event_id, row.type, row.seq, error)

    # --- bookkeeping -------------------------------------------------------------------------

    def _phase(self, phase: str) -> None:
        with self._lock:
            self._c.phase = phase

    def _note_success(self) -> None:
        with self._lock:
            failures = self._c.consecutive_failures
            self._c.consecutive_failures = 0
            self._c.channel_error = None
            self._c.last_success_at = iso_z()
        if failures:
            log.info("uplink: cloud reachable again after %d failed attempt(s)", failures)

    def _note_failure(self, error: str, *, channel: bool = False) -> None:
        with self._lock:
            self._c.consecutive_failures += 1
            first = self._c.consecutive_failures == 1
            self._c.last_error, self._c.last_error_at = error, iso_z()
            if channel:
                self._c.channel_error = error
        # Log the start of an outage, not every retry of it.
        log.log(logging.WARNING if first or channel else logging.DEBUG, "uplink: delivery failed: %s", error)


__all__ = ["COALESCIBLE_TYPES", "KEY_ENV", "PROTECTED_TYPES", "OutboxDrainer"]

if __name__ == "__main__":  # `python -m gateway.uplink.drainer`: the command tests and bench run
    from gateway.uplink.cli import main

    raise SystemExit(main())
