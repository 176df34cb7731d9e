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
  read) and every database statement run in one dedicated worker thread (`run_in_executor`), so
  the asyncio loop never blocks; writes are IMMEDIATE transactions. Cancelling shuts the socket
  down under a blocked request (a TCP connect still in progress runs out its timeout). With an
  empty `cloud.url` only housekeeping runs.
- `state()` is a snapshot of the counters for the health report; `degraded` says whether the
  site needs attention (over the cap with protected events, or the cloud refusing the site).

`python -m gateway.uplink.drainer --database PATH --url URL --site-id ID` runs a drainer alone
(key in $CARWASH_UPLINK_KEY) until SIGTERM/SIGINT: for tests, benchmarks and diagnostics; the
core runs `OutboxDrainer` in its own event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import enum
import http.client
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from peewee import SqliteDatabase

from gateway.access.signing import http_signature
from gateway.clock import epoch_s, iso_z, utc_now
from gateway.config import CloudConfig, Config, OutboxConfig, SiteConfig
from gateway.store.db import write_tx
from gateway.store.outbox import payload_bytes

log = logging.getLogger(__name__)

COALESCIBLE_TYPES: tuple[str, ...] = ("wash.status", "device.status")
PROTECTED_TYPES: tuple[str, ...] = ("device.event_logs", "wash.session", "payment.updated", "command.result")
RETRYABLE_4XX = frozenset({408, 429})
CHANNEL_4XX = frozenset({401, 403, 404, 405})  # the site/key/URL is wrong, not the event
KEY_ENV = "CARWASH_UPLINK_KEY"

# A pending row by seq (its primary key), checked against its event id: a coalesced event deleted
# meanwhile may have left its seq to a new, never sent row (seq has no AUTOINCREMENT).
_BY_ROW = 'UPDATE "outbox_event" SET {set} WHERE "seq" = ? AND "event_id" = ? AND "state" = \'pending\''
_BODY_HEAD = b'{"events":['
_BODY_TAIL = b"]}"
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class _Kind(enum.Enum):
    IDLE = "idle"  # nothing pending
    PROGRESS = "progress"  # the batch was settled (sent or dead): go on at once
    RETRY = "retry"  # back off, then try the head of the queue again


@dataclass(frozen=True)
class _Row:
    seq: int
    event_id: str
    type: str
    data: bytes


@dataclass
class _Answer:
    kind: str  # ok | retry | channel | reject | stopped
    error: str = ""
    accepted: frozenset[str] = frozenset()
    retry_after: float | None = None


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
        self._url = url
        prefix = url.path.rstrip("/") if url else ""
        self._path = f"{prefix}/api/v1/gateways/{urllib.parse.quote(self._site_id, safe='')}/events"
        self._conn: http.client.HTTPConnection | None = None
        self._conn_lock = threading.Lock()  # the loop thread aborts the worker's connection
        self._stopping = threading.Event()
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
        return self._url is not None

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
        self._stopping.clear()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uplink-drainer")
        failures = 0
        next_housekeeping = loop.time()
        try:
            while True:
                if loop.time() >= next_housekeeping:
                    self._phase("housekeeping")
                    try:
                        await loop.run_in_executor(executor, self.housekeeping)
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
                    step = await loop.run_in_executor(executor, self._step)
                except Exception as exc:  # a database error: keep the loop alive, retry later
                    log.exception("uplink: drain step failed")
                    self._note_failure(f"{type(exc).__name__}: {exc}")
                    step = _Step(_Kind.RETRY)
                due_in = self._marks_due_in()
                if due_in <= 0 or (step.kind is _Kind.RETRY and due_in < float("inf")):  # a backoff may be long
                    await self._write_marks_in(loop, executor)
                if step.kind is _Kind.PROGRESS:
                    failures = 0
                    continue
                if step.kind is _Kind.RETRY:
                    failures += 1
                    delay = self.backoff_delay(failures, step.retry_after)
                    with self._lock:
                        self._c.next_attempt_at = iso_z(utc_now() + dt.timedelta(seconds=delay))
                        self._c.phase = "backoff"
                    await asyncio.sleep(delay)  # wake() does not shorten a backoff
                    with self._lock:
                        self._c.next_attempt_at = None
                    continue
                failures = 0
                timeout = max(0.0, min(self._poll_interval, next_housekeeping - loop.time(), self._marks_due_in()))
                self._phase("idle")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake_event.wait(), timeout)
        finally:
            self._stopping.set()
            self._abort_inflight()
            try:
                # Queued behind a step still running (its HTTP request was just aborted).
                await loop.run_in_executor(executor, self._close_worker)
            finally:
                executor.shutdown(wait=True)
                self._phase("stopped")
                self._running = False
                self._loop = self._wake_event = None

    def backoff_delay(self, failures: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform in [min, min(max, min * 2^failures)], at least Retry-After."""
        lo, hi = self._outbox.backoff_min_sec, self._outbox.backoff_max_sec
        cap = min(hi, lo * 2.0 ** min(failures, 40))
        delay = self._rng.uniform(lo, max(lo, cap))
        if retry_after is not None:
            delay = max(delay, min(retry_after, hi))
        return delay

    # --- housekeeping (any thread; the drainer runs it in its worker) --------------------------

    def housekeeping(self) -> None:
        """Write waiting marks, prune delivered events, enforce the size cap, refresh the backlog
        figures."""
        self.write_marks()
        self.prune_delivered()
        self.enforce_retention()
        # Each through its partial index: housekeeping never reads the whole table.
        (pending, pending_bytes), = self._db.execute_sql(
            'SELECT COUNT(*), COALESCE(SUM("size"), 0) FROM "outbox_event" WHERE "state" = \'pending\'').fetchall()
        (dead,), = self._db.execute_sql(
            'SELECT COUNT(*) FROM "outbox_event" WHERE "state" = \'dead\'').fetchall()
        with self._lock:
            self._c.backlog, self._c.pending_bytes = int(pending), int(pending_bytes)
            self._c.dead_total = int(dead)

    def prune_delivered(self) -> int:
        """Delete sent events older than delivered_retention_days; returns how many."""
        cutoff = epoch_s(utc_now() - dt.timedelta(days=self._outbox.delivered_retention_days))
        with write_tx(self._db):
            cur = self._db.execute_sql(
                'DELETE FROM "outbox_event" WHERE "state" = \'sent\' AND "sent_at" < ?', (cutoff,))
        n = max(int(cur.rowcount), 0)
        if n:
            log.info("uplink: pruned %d delivered outbox events older than %d days", n,
                     self._outbox.delivered_retention_days)
        return n

    def enforce_retention(self) -> int:
        """Drop the oldest droppable pending events while the pending total exceeds max_bytes;
        returns how many were dropped. Sets `degraded` when protected events alone exceed it."""
        cap = self._outbox.max_bytes
        dropped: dict[str, int] = {}
        freed_total = 0
        with write_tx(self._db):
            (total,) = self._db.execute_sql(
                'SELECT COALESCE(SUM("size"), 0) FROM "outbox_event" WHERE "state" = \'pending\'').fetchone()
            excess = int(total) - cap
            protected = ",".join("?" * len(PROTECTED_TYPES))
            coalescible = ",".join("?" * len(COALESCIBLE_TYPES))
            tiers: list[tuple[str, tuple[str, ...]]] = [
                (f'"type" IN ({coalescible})', COALESCIBLE_TYPES),
                (f'"type" NOT IN ({coalescible}) AND "type" NOT IN ({protected})', COALESCIBLE_TYPES + PROTECTED_TYPES),
            ]
            for where, params in tiers:
                if excess <= 0:
                    break
                cur = self._db.execute_sql(
                    f'SELECT "seq", "type", "size" FROM "outbox_event" WHERE "state" = \'pending\' AND {where} '
                    'ORDER BY "seq"', params)
                cutoff = None
                freed = 0
                for seq, typ, size in cur:
                    freed += int(size)
                    dropped[typ] = dropped.get(typ, 0) + 1
                    cutoff = seq
                    if freed >= excess:
                        break
                cur.close()
                if cutoff is not None:
                    self._db.execute_sql(
                        f'DELETE FROM "outbox_event" WHERE "state" = \'pending\' AND {where} AND "seq" <= ?',
                        (*params, cutoff))
                    excess -= freed
                    freed_total += freed
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

    def _fetch(self) -> tuple[list[_Row], bool]:
        """The head of the queue within the batch limits; and whether it is the whole queue."""
        # Delivered rows not yet marked are still pending in the database: read past them.
        with self._lock:
            skip = set(self._unmarked)
            self._c.polls += 1
        limit = self._outbox.batch_max_events + len(skip)
        cur = self._db.execute_sql(
            'SELECT e."seq", e."event_id", e."type", p."payload" FROM "outbox_event" e '
            'JOIN "outbox_payload" p ON p."seq" = e."seq" WHERE e."state" = \'pending\' ORDER BY e."seq" LIMIT ?',
            (limit,))
        fetched = cur.fetchall()  # fetch everything: the read snapshot ends here
        rows: list[_Row] = []
        size = len(_BODY_HEAD) + len(_BODY_TAIL)
        for seq, event_id, typ, payload in fetched:
            if event_id in skip:
                continue
            if len(rows) == self._outbox.batch_max_events:
                return rows, False
            data = payload_bytes(payload)
            add = len(data) + (1 if rows else 0)
            if rows and size + add > self._outbox.batch_max_bytes:
                return rows, False
            rows.append(_Row(int(seq), str(event_id), str(typ), data))
            size += add
        return rows, len(fetched) < limit

    def _deliver(self, rows: list[_Row]) -> _Step:
        answer = self._post(rows)
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

    # --- HTTP (worker thread) ----------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        with self._conn_lock:
            if self._conn is None:
                assert self._url is not None
                host, port = self._url.hostname or "", self._url.port
                timeout = self._cloud.timeout_sec
                if self._url.scheme == "https":
                    self._conn = http.client.HTTPSConnection(host, port, timeout=timeout)
                else:
                    self._conn = http.client.HTTPConnection(host, port, timeout=timeout)
            return self._conn

    def _close_conn(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _abort_inflight(self) -> None:
        """From the loop thread: make a blocked send/receive of the worker return at once."""
        with self._conn_lock:
            sock = self._conn.sock if self._conn is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _close_worker(self) -> None:
        """In the worker thread at the end: the delivered events' marks, its HTTP connection and its
        database connection."""
        self._close_conn()
        try:
            self.write_marks()
        except Exception:  # as after a crash: they stay pending, are sent again and deduplicated
            log.exception("uplink: marking %d delivered events sent failed", len(self._unmarked))
        self._db.close()  # Peewee connections are per thread: this closes the worker's only

    def _post(self, rows: list[_Row]) -> _Answer:
        if self._stopping.is_set():
            return _Answer("stopped")
        body = _BODY_HEAD + b",".join(r.data for r in rows) + _BODY_TAIL
        headers = {"Content-Type": "application/json", "x-signature": http_signature(body, self._key)}
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                if conn.sock is None:
                    conn.connect()
                    # http.client writes headers and body separately: without this, Nagle and the
                    # peer's delayed ACK add ~40 ms to every request.
                    sock: socket.socket = conn.sock  # type: ignore[assignment]  # set by connect()
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request("POST", self._path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self._close_conn()
                if self._stopping.is_set():  # aborted by run()'s end: not a cloud failure
                    return _Answer("stopped")
                # A kept-alive connection the server closed meanwhile: one immediate retry.
                if reused and attempt == 1 and isinstance(exc, _STALE_CONNECTION) and not self._stopping.is_set():
                    continue
                return _Answer("retry", f"cannot reach the cloud: {type(exc).__name__}: {exc}".rstrip(": "))
            if resp.will_close:
                self._close_conn()
            return self._classify(resp.status, resp.getheader("Retry-After"), data)
        raise AssertionError("unreachable")

    @staticmethod
    def _classify(status: int, retry_after_header: str | None, data: bytes) -> _Answer:
        if 200 <= status < 300:
            try:
                doc = json.loads(data)
                accepted = doc["data"]["accepted"]
                if doc.get("success") is not True or not isinstance(accepted, list):
                    raise ValueError("no accepted list")
                return _Answer("ok", accepted=frozenset(a for a in accepted if isinstance(a, str)))
            except (ValueError, KeyError, TypeError) as exc:
                return _Answer("retry", f"HTTP {status} with an unreadable answer: {exc}")
        error = f"HTTP {status}"
        try:
            doc = json.loads(data)
            if isinstance(doc, dict):
                error += f" {doc.get('errorCode', '')}: {doc.get('message', '')}".rstrip(": ")
        except ValueError:
            if data:
                error += f": {data[:200].decode(errors='replace')}"
        retry_after: float | None = None
        if retry_after_header:
            try:
                retry_after = max(0.0, float(retry_after_header))
            except ValueError:
                retry_after = None  # an HTTP date: our own backoff will do
        if status >= 500 or status in RETRYABLE_4XX:
            return _Answer("retry", error, retry_after=retry_after)
        if 400 <= status < 500 and status not in CHANNEL_4XX:
            return _Answer("reject", error)
        return _Answer("channel", error, retry_after=retry_after)

    # --- database writes (worker thread) -----------------------------------------------------

    def _mark_sent(self, rows: list[_Row]) -> None:
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
        now = epoch_s()
        # A delivered row deleted meanwhile (coalesced, or dropped over the cap) matches nothing.
        try:
            with write_tx(self._db):
                self._db.cursor().executemany(
                    _BY_ROW.format(set='"state" = \'sent\', "sent_at" = ?, "attempts" = "attempts" + 1'),
                    [(now, seq, event_id) for event_id, seq in marks.items()])
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

    async def _write_marks_in(self, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor) -> None:
        try:
            await loop.run_in_executor(executor, self.write_marks)
        except Exception:
            log.exception("uplink: marking %d delivered events sent failed; retrying", len(self._unmarked))

    def _marks_due_in(self) -> float:
        """Seconds until delivered events must be marked (inf when none wait)."""
        with self._lock:
            due = self._marks_due
        return float("inf") if due is None else max(0.0, due - time.monotonic())

    def _mark_attempt(self, rows: list[_Row], error: str) -> None:
        with write_tx(self._db):
            self._db.cursor().executemany(_BY_ROW.format(set='"attempts" = "attempts" + 1, "last_error" = ?'),
                                          [(error[:500], r.seq, r.event_id) for r in rows])

    def _mark_dead(self, row: _Row, error: str) -> None:
        with write_tx(self._db):
            self._db.execute_sql(
                _BY_ROW.format(set='"state" = \'dead\', "attempts" = "attempts" + 1, "last_error" = ?'),
                (error[:500], row.seq, row.event_id))
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


# --- stand-alone runner ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from gateway.store import open_database, schema_status

    defaults = OutboxConfig()
    ap = argparse.ArgumentParser(prog="python -m gateway.uplink.drainer",
                                 description=f"Drain an outbox to a cloud until SIGTERM (key in ${KEY_ENV}).")
    ap.add_argument("--database", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--site-id", required=True)
    ap.add_argument("--timeout", type=float, default=CloudConfig().timeout_sec)
    ap.add_argument("--batch-max-events", type=int, default=defaults.batch_max_events)
    ap.add_argument("--batch-max-bytes", type=int, default=defaults.batch_max_bytes)
    ap.add_argument("--max-bytes", type=int, default=defaults.max_bytes)
    ap.add_argument("--backoff-min", type=float, default=defaults.backoff_min_sec)
    ap.add_argument("--backoff-max", type=float, default=defaults.backoff_max_sec)
    ap.add_argument("--mark-sent-delay", type=float, default=defaults.mark_sent_delay_sec)
    ap.add_argument("--poll-interval", type=float, default=5.0)
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s drainer %(levelname)s %(message)s")
    key = os.environ.get(KEY_ENV)
    if not key:
        ap.error(f"${KEY_ENV} must hold the site key")
    config = Config(
        site=SiteConfig(id=args.site_id),
        cloud=CloudConfig(url=args.url, timeout_sec=args.timeout),
        outbox=OutboxConfig(batch_max_events=args.batch_max_events, batch_max_bytes=args.batch_max_bytes,
                            max_bytes=args.max_bytes, backoff_min_sec=args.backoff_min,
                            backoff_max_sec=args.backoff_max, mark_sent_delay_sec=args.mark_sent_delay),
    )
    db = open_database(args.database)
    current, version = schema_status(db)
    if not current:
        print(f"database schema version {version} is not current: start the core once to migrate", flush=True)
        return 2

    async def amain() -> None:
        drainer = OutboxDrainer(config, key, db, poll_interval_sec=args.poll_interval)
        task = asyncio.create_task(drainer.run(), name="uplink-drainer")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    asyncio.run(amain())
    db.close()
    log.info("drainer stopped after %.1f s", time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
