"""Opening the SQLite database with the pragmas every process must use.

Contract: `open_database(path)` returns a connected Peewee database in WAL mode with
synchronous=FULL (money and sessions must survive a power cut), a busy timeout and foreign keys.
Every write goes through `write_tx(db)`, an IMMEDIATE transaction: a deferred one that reads and
then writes fails at once when another process committed in between, whatever the busy timeout.
Open the database after fork (gunicorn) and never at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peewee import SqliteDatabase

from gateway.store.models import database_proxy

BUSY_TIMEOUT_MS = 5000

PRAGMAS: dict[str, Any] = {
    "journal_mode": "wal",
    "synchronous": 2,  # FULL
    "busy_timeout": BUSY_TIMEOUT_MS,
    "foreign_keys": 1,
}


def open_database(path: str | os.PathLike[str], *, bind_models: bool = True) -> SqliteDatabase:
    """Open (creating the parent directory if needed) and bind the models to it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False: the web's worker threads share one connection per thread
    # (Peewee keeps connections thread-local), and the core runs one thread.
    db = SqliteDatabase(
        str(p), pragmas=PRAGMAS, lock_type="IMMEDIATE", check_same_thread=False, autoconnect=True
    )
    db.connect(reuse_if_open=True)
    if bind_models:
        database_proxy.initialize(db)
    return db


def write_tx(db: SqliteDatabase) -> Any:
    """An IMMEDIATE write transaction (context manager)."""
    return db.atomic(lock_type="IMMEDIATE")
