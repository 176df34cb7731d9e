"""One dedicated database thread per core service: the one copy of that mechanism.

Contract
- `DbThread(name, db)` does no I/O and starts no thread (the thread starts with the first job).
- `await run(fn, *args)` runs `fn(*args)` in the thread and returns its result (or raises its
  exception). Jobs run one at a time in submission order, so a service's writes stay in order
  and its event loop never blocks on SQLite. Cancelling the awaiting task does not stop a job
  that started: it runs to its end (a transaction is never cut in half).
- `await close()` waits for the queued jobs, closes the thread's own database connection (Peewee
  keeps one per thread) and joins the thread. `run()` after `close()` raises RuntimeError.
  Closing twice is harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from peewee import Database

T = TypeVar("T")


class DbThread:
    """A one-thread executor for a service's database work (see the module docstring)."""

    def __init__(self, name: str, db: Database | None = None) -> None:
        self.name = name
        self._db = db
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the database thread, after every job submitted before it."""
        if self._closed:
            raise RuntimeError(f"database thread {self.name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        """Finish the queued jobs, close the thread's connection, join the thread."""
        if self._closed:
            return
        try:
            if self._db is not None:
                await self.run(self._db.close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)  # idle by now: the join is immediate
