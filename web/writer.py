"""Group commit for the web's writes: one writer thread, one IMMEDIATE transaction per batch.

With synchronous=FULL every commit costs an fsync, and request threads racing for SQLite's write
lock wait in its busy handler with growing sleeps. Instead, request threads hand their write to
`GroupWriter.run(fn)`; the writer thread runs every queued write in one transaction, each inside
its own savepoint (one failing write rolls back alone and raises in its own request), commits
once, and only then wakes the requests: a 2xx still means "on disk".
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from peewee import SqliteDatabase

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 200
_STOP = object()


class GroupWriter:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        self._q: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="web-writer", daemon=True)
        self.batches = 0
        self.writes = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._q.put(_STOP)
        self._thread.join(10)

    def run(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run `fn` (which may open its own transaction: it becomes a savepoint) and return its
        result once the batch holding it has committed."""
        fut: Future[T] = Future()
        self._q.put((fn, fut))
        return fut.result(timeout)

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Callable[[], Any], Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            with self.db.atomic(lock_type="IMMEDIATE"):
                for fn, fut in batch:
                    try:
                        with self.db.atomic():  # a savepoint inside the batch
                            outcomes.append((fut, True, fn()))
                    except Exception as exc:  # that request's error, raised in that request
                        outcomes.append((fut, False, exc))
        except Exception as exc:
            log.exception("group commit of %d writes failed", len(batch))
            for _fn, fut in batch:
                fut.set_exception(exc)
            return
        self.batches += 1
        self.writes += len(batch)
        for fut, ok, value in outcomes:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
