"""gateway.store.dbthread: the one database thread of a core service."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from gateway.store import open_database, write_tx
from gateway.store.dbthread import DbThread


async def test_jobs_run_in_order_in_one_thread_off_the_loop(tmp_path: Path) -> None:
    db = open_database(tmp_path / "t.db", bind_models=False)
    db.execute_sql("CREATE TABLE t (n INTEGER)")
    worker = DbThread("test-db", db)
    threads: list[str] = []

    def insert(n: int) -> int:
        threads.append(threading.current_thread().name)
        with write_tx(db):
            db.execute_sql("INSERT INTO t (n) VALUES (?)", (n,))
        return n

    # Submitted at once: the single thread keeps them in submission order.
    results = await asyncio.gather(*(worker.run(insert, n) for n in range(20)))
    assert results == list(range(20))
    rows = await worker.run(lambda: [r[0] for r in db.execute_sql("SELECT n FROM t ORDER BY rowid")])
    assert rows == list(range(20))
    assert len(set(threads)) == 1 and threads[0].startswith("test-db")
    assert threads[0] != threading.current_thread().name
    await worker.close()
    db.close()


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    worker = DbThread("test-db")

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await worker.run(fail)
    assert await worker.run(lambda: 42) == 42
    await worker.close()


async def test_close_closes_the_threads_connection_and_joins(tmp_path: Path) -> None:
    db = open_database(tmp_path / "t.db", bind_models=False)
    worker = DbThread("test-db", db)
    conn: sqlite3.Connection = await worker.run(db.connection)
    assert conn is not db.connection()  # Peewee: one connection per thread
    await worker.close()
    with pytest.raises(sqlite3.ProgrammingError):  # closed by close(), not left to the collector
        conn.execute("SELECT 1")
    assert not [t for t in threading.enumerate() if t.name.startswith("test-db")]
    with pytest.raises(RuntimeError):
        await worker.run(lambda: None)
    await worker.close()  # twice: harmless
    db.close()
