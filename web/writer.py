"""Group commit for the web's writes: one writer thread, one IMMEDIATE transaction per batch.

With synchronous=FULL every commit costs an fsync, and request threads racing for SQLite's write
lock wait in its busy handler with growing sleeps. Instead, request threads hand their write to
`GroupWriter.run(fn)`; the writer thread runs every queued write in one transaction, each inside
its own savepoint (one failing write rolls back alone and raises in its own request), commits
once, and only then wakes the requests: a 2xx still means "on disk".

Cost per write matters (every signed upload comes through here; bench/README.md, devices): a write
alone in its batch runs without a savepoint (if it fails, the whole transaction, which holds
nothing else, rolls back: the same outcome), savepoints are plain SQL on the connection rather
than Peewee's (which made a uuid and two queries through its machinery per write), and a
request waits on a lock of its own that the writer releases, not a Future and a Queue (two
Conditions each way).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from peewee import SqliteDatabase

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 200
SAVEPOINT = '"gw_write"'  # one name is enough: a write's savepoint is released before the next


class _Write:
    """One queued write: `done` is held until the writer has its outcome."""

    __slots__ = ("fn", "done", "ok", "value")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Lock()
        self.done.acquire()
        self.ok = False
        self.value: Any = None

    def finish(self, ok: bool, value: Any) -> None:
        self.ok, self.value = ok, value
        self.done.release()


class GroupWriter:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._queue: list[_Write] = []
        # Held while the writer has work or is busy; released (once) to wake it when it waits.
        self._wake = threading.Lock()
        self._wake.acquire()
        self._waiting = False
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="web-writer", daemon=True)
        self.batches = 0
        self.writes = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Run what is queued, then end the thread (waits up to 10 s)."""
        with self._lock:
            self._stopping = True
            self._wake_writer()
        self._thread.join(10)

    def run(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run `fn` (which may open its own transaction: it becomes a savepoint) and return its
        result once the batch holding it has committed; its exception (or the commit's) is raised
        here. TimeoutError after `timeout` seconds (the write may still be committed later)."""
        w = _Write(fn)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the writer is stopped")
            self._queue.append(w)
            self._wake_writer()
        if not w.done.acquire(timeout=timeout):
            raise TimeoutError(f"the write was not committed within {timeout:g} s")
        if not w.ok:
            raise w.value
        result: T = w.value
        return result

    def _wake_writer(self) -> None:
        # Under self._lock. Released once per wait of the writer, so never twice.
        if self._waiting:
            self._waiting = False
            self._wake.release()

    def _loop(self) -> None:
        while True:
            with self._lock:
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                if not batch:
                    if self._stopping:
                        return
                    self._waiting = True
            if batch:
                self._commit(batch)
            else:
                self._wake.acquire()

    def _commit(self, batch: list[_Write]) -> None:
        outcomes: list[tuple[_Write, bool, Any]] = []
        failed: Exception | None = None
        try:
            with self.db.atomic(lock_type="IMMEDIATE"):
                if len(batch) == 1:
                    w = batch[0]
                    try:
                        outcomes.append((w, True, w.fn()))
                    except Exception as exc:  # alone in its transaction: roll all of it back
                        failed = exc
                        raise _RolledBack from None
                else:
                    conn = self.db.connection()
                    for w in batch:
                        conn.execute(f"SAVEPOINT {SAVEPOINT}")
                        try:
                            outcomes.append((w, True, w.fn()))
                        except Exception as exc:  # that request's error, raised in that request
                            conn.execute(f"ROLLBACK TO {SAVEPOINT}")
                            outcomes.append((w, False, exc))
                        conn.execute(f"RELEASE {SAVEPOINT}")
        except _RolledBack:
            self.batches += 1
            self.writes += 1
            batch[0].finish(False, failed)
            return
        except Exception as exc:
            log.exception("group commit of %d writes failed", len(batch))
            for w in batch:
                w.finish(False, exc)
            return
        self.batches += 1
        self.writes += len(batch)
        for w, ok, value in outcomes:
            w.finish(ok, value)


class _RolledBack(Exception):
    """The single write of a batch failed: the transaction is rolled back, the error goes to its request."""
