"""web.writer.GroupWriter: a write's result only after its commit, a failing write rolls back
alone (in a batch of several, and alone in its batch), nested transactions, stop."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from peewee import IntegrityError, SqliteDatabase

from gateway.store import open_database, write_tx
from web.writer import GroupWriter, _Write


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteDatabase]:
    database = open_database(tmp_path / "w.db", bind_models=False)
    database.execute_sql('CREATE TABLE "t" ("x" INTEGER UNIQUE)')
    yield database
    database.close()


@pytest.fixture
def writer(db: SqliteDatabase) -> Iterator[GroupWriter]:
    w = GroupWriter(db)
    w.start()
    yield w
    w.stop()


def committed(db: SqliteDatabase) -> list[int]:
    """The rows another connection sees: what has been committed."""
    with sqlite3.connect(db.database) as other:
        return [x for (x,) in other.execute('SELECT "x" FROM "t" ORDER BY "x"')]


def insert(db: SqliteDatabase, *xs: int) -> int:
    for x in xs:
        db.execute_sql('INSERT INTO "t" ("x") VALUES (?)', (x,))
    return len(xs)


def test_the_result_comes_after_the_commit(db: SqliteDatabase, writer: GroupWriter) -> None:
    assert writer.run(lambda: insert(db, 1)) == 1
    assert committed(db) == [1]  # visible to another connection when run() returns
    assert (writer.batches, writer.writes) == (1, 1)


def test_a_failing_write_alone_in_its_batch_rolls_back_and_raises(db: SqliteDatabase, writer: GroupWriter) -> None:
    writer.run(lambda: insert(db, 1))
    with pytest.raises(IntegrityError):
        writer.run(lambda: insert(db, 2, 1))  # 2 is written, then 1 fails: 2 must go too
    assert committed(db) == [1]
    assert writer.run(lambda: insert(db, 3)) == 1  # the connection is not left in a transaction
    assert committed(db) == [1, 3]


def test_a_failing_write_in_a_batch_rolls_back_alone(db: SqliteDatabase) -> None:
    writer = GroupWriter(db)  # not started: the batch is handed to _commit as the thread would
    batch = [_Write(lambda: insert(db, 1)), _Write(lambda: insert(db, 2, 1)), _Write(lambda: insert(db, 3, 4))]
    writer._commit(batch)
    outcomes = [(w.ok, w.value if w.ok else type(w.value)) for w in batch]
    assert outcomes == [(True, 1), (False, IntegrityError), (True, 2)]
    assert all(w.done.acquire(blocking=False) for w in batch)  # every request was woken
    assert committed(db) == [1, 3, 4]  # the failing write's row 2 rolled back with it
    assert (writer.batches, writer.writes) == (1, 3)


def test_writes_that_open_their_own_transaction(db: SqliteDatabase, writer: GroupWriter) -> None:
    def nested(*xs: int) -> int:
        with write_tx(db):  # what the store's functions do: a savepoint inside the batch
            return insert(db, *xs)

    assert writer.run(lambda: nested(1, 2)) == 2
    with pytest.raises(IntegrityError):
        writer.run(lambda: nested(5, 1))
    batch = [_Write(lambda: nested(6)), _Write(lambda: nested(7, 6)), _Write(lambda: nested(8))]
    writer._commit(batch)
    assert [w.ok for w in batch] == [True, False, True]
    assert committed(db) == [1, 2, 6, 8]


def test_concurrent_writes_each_get_their_own_outcome(db: SqliteDatabase, writer: GroupWriter) -> None:
    results: dict[int, object] = {}

    def request(n: int) -> None:
        try:
            results[n] = writer.run(lambda: insert(db, n % 20))  # 20..39 repeat 0..19: they fail
        except IntegrityError:
            results[n] = "refused"

    threads = [threading.Thread(target=request, args=(n,)) for n in range(40)]
    for t in threads[:20]:
        t.start()
    for t in threads[:20]:
        t.join(10)
    for t in threads[20:]:
        t.start()
    for t in threads[20:]:
        t.join(10)
    assert results == {**{n: 1 for n in range(20)}, **{n: "refused" for n in range(20, 40)}}
    assert committed(db) == list(range(20))
    assert writer.writes == 40 and writer.batches <= 40


def test_a_failed_commit_fails_every_write_of_the_batch(db: SqliteDatabase, tmp_path: Path) -> None:
    writer = GroupWriter(db)
    other = sqlite3.connect(db.database, timeout=0)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the busy timeout
    db.execute_sql("PRAGMA busy_timeout = 0")
    batch = [_Write(lambda: insert(db, 1)), _Write(lambda: insert(db, 2))]
    writer._commit(batch)
    other.rollback()
    other.close()
    assert [w.ok for w in batch] == [False, False]
    assert all(isinstance(w.value, Exception) for w in batch)
    assert committed(db) == []


def test_a_write_not_committed_in_time_raises_timeout(db: SqliteDatabase) -> None:
    writer = GroupWriter(db)  # never started: nothing commits
    with pytest.raises(TimeoutError):
        writer.run(lambda: insert(db, 1), timeout=0.01)


def test_after_stop_writes_are_refused(db: SqliteDatabase) -> None:
    writer = GroupWriter(db)
    writer.start()
    assert writer.run(lambda: insert(db, 1)) == 1
    writer.stop()
    with pytest.raises(RuntimeError):
        writer.run(lambda: insert(db, 2))
    assert committed(db) == [1]
