"""Opening the SQLite database with the pragmas every process must use.

Contract: `open_database(path)` returns a connected Peewee database in WAL mode with
synchronous=FULL (money and sessions must survive a power cut), a busy timeout and foreign keys.
Every write goes through `write_tx(db)`, an IMMEDIATE transaction: a deferred one that reads and
then writes fails at once when another process committed in between, whatever the busy timeout.
Open the database after fork (gunicorn) and never at import time.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any

from peewee import SqliteDatabase

from gateway.store.models import database_proxy

BUSY_TIMEOUT_MS = 5000
# SD-card wear: every commit writes each page it changed to the WAL (and later to the database),
# and the gateway's commits change a few rows each. With 1 KiB pages a commit writes about half
# the bytes of 4 KiB pages (bench/soak.py). Only a new database takes it; an existing one keeps
# its page size (changing it needs a VACUUM with both services stopped).
PAGE_SIZE = 1024

# In this order: page_size is set before WAL mode, which fixes it.
PRAGMAS: dict[str, Any] = {
    "page_size": PAGE_SIZE,
    "journal_mode": "wal",
    # Checkpoint at about 4 MiB of WAL (the default 1000 pages is 1 MiB at this page size): a page
    # changed many times between checkpoints is copied into the database once.
    "wal_autocheckpoint": 4096,
    "synchronous": 2,  # FULL
    "busy_timeout": BUSY_TIMEOUT_MS,
    "foreign_keys": 1,
}


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:  # pragma: no cover - closing is best effort once the thread is gone
        pass


class GatewayDatabase(SqliteDatabase):
    """Peewee keeps one connection per thread. A connection opened by a worker thread (an
    executor's database thread) is closed once that thread's object is gone, instead of being left
    unclosed to the garbage collector when the thread ends (Python 3.13 warns about that:
    `ResourceWarning: unclosed database`). Closing from another thread is allowed
    (check_same_thread=False); closing twice is harmless."""

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection = super()._connect()  # type: ignore[misc]  # Peewee's own hook, not in its stubs
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            weakref.finalize(thread, _close_quietly, conn)
        return conn


def open_database(path: str | os.PathLike[str], *, bind_models: bool = True) -> GatewayDatabase:
    """Open (creating the parent directory if needed) and bind the models to it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: the web's worker threads share one connection per thread
    # (Peewee keeps connections thread-local), and the core runs one thread.
    db = GatewayDatabase(
        str(p), pragmas=PRAGMAS, lock_type="IMMEDIATE", check_same_thread=False, autoconnect=True
    )
    db.connect(reuse_if_open=True)
    if bind_models:
        database_proxy.initialize(db)
    return db


def write_tx(db: SqliteDatabase) -> Any:
    """An IMMEDIATE write transaction (context manager)."""
    return db.atomic(lock_type="IMMEDIATE")
