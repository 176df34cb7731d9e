"""The power-cut filesystem (bench/powerfs.py) itself: what survives a cut and what does not.

Real FUSE mounts (root and /dev/fuse needed, as CI has); every mount is unmounted by the fixture.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.powerfs import SECTOR, PowerFs, fuse_available

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.fixture
def pfs(tmp_path: Path) -> Iterator[PowerFs]:
    fs = PowerFs(tmp_path / "medium", tmp_path / "mnt", tmp_path / "ctl.sock", tmp_path / "powerfs.log")
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


def power_cut(fs: PowerFs, *, torn: bool = False, seed: int = 0) -> dict[str, int]:
    """Cut, unmount, mount again: the medium as the next boot sees it."""
    try:
        return fs.cut(torn=torn, seed=seed)
    finally:
        fs.unmount()
        fs.mount()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_path(path.parent)


def test_unsynced_data_vanishes_synced_data_survives(pfs: PowerFs) -> None:
    m = pfs.mountpoint
    write_synced(m / "kept", b"durable")
    write_synced(m / "grown", b"first")
    with open(m / "grown", "ab") as f:
        f.write(b" and more, never fsynced")
    with open(m / "kept", "r+b") as f:  # an overwrite, flushed and closed but not fsynced
        f.write(b"CHANGED")
    assert (m / "kept").read_bytes() == b"CHANGED"  # the page cache shows it until the cut
    dropped = power_cut(pfs)
    assert dropped["dropped_writes"] >= 2
    assert (m / "kept").read_bytes() == b"durable"
    assert (m / "grown").read_bytes() == b"first"


def test_fdatasync_and_truncation(pfs: PowerFs) -> None:
    m = pfs.mountpoint
    write_synced(m / "f", b"x" * 5000)
    fd = os.open(m / "f", os.O_RDWR)
    try:
        os.ftruncate(fd, 1000)
        os.fdatasync(fd)  # the shrink is durable
        os.ftruncate(fd, 10)  # this one is not
    finally:
        os.close(fd)
    power_cut(pfs)
    assert (m / "f").read_bytes() == b"x" * 1000


def test_names_need_a_directory_fsync(pfs: PowerFs) -> None:
    m = pfs.mountpoint
    write_synced(m / "old", b"data")
    (m / "sub").mkdir()
    fd = os.open(m / "sub" / "unnamed", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"fsynced, its name never")
    os.fsync(fd)
    os.close(fd)
    os.rename(m / "old", m / "new")
    power_cut(pfs)
    assert sorted(os.listdir(m)) == ["old"]  # neither the rename nor the new directory survived
    assert (m / "old").read_bytes() == b"data"

    os.rename(m / "old", m / "new")
    fsync_path(m)
    (m / "new").unlink()  # not made durable: the file comes back
    power_cut(pfs)
    assert sorted(os.listdir(m)) == ["new"]
    assert (m / "new").read_bytes() == b"data"


def test_a_durable_name_shows_the_last_fsynced_data(pfs: PowerFs) -> None:
    m = pfs.mountpoint
    fd = os.open(m / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"synced before the name")
        os.fsync(fd)
        fsync_path(m)
        os.write(fd, b"; unsynced tail")
    finally:
        os.close(fd)
    (m / "g").write_bytes(b"named, never fsynced")
    fsync_path(m)
    power_cut(pfs)
    assert (m / "f").read_bytes() == b"synced before the name"
    assert (m / "g").read_bytes() == b""


def test_torn_mode_keeps_a_sector_prefix_of_the_last_write(pfs: PowerFs) -> None:
    m = pfs.mountpoint
    size = 8 * SECTOR
    torn_lengths = set()
    for seed in range(12):
        write_synced(m / "f", b"o" * size)
        with open(m / "f", "r+b") as f:
            f.seek(100)  # not sector-aligned: the tear falls on the medium's sector boundaries
            f.write(b"n" * (size - 100))
        torn = power_cut(pfs, torn=True, seed=seed)["torn_bytes"]
        data = (m / "f").read_bytes()
        assert data == b"o" * 100 + b"n" * torn + b"o" * (size - 100 - torn)
        assert torn == size - 100 or (100 + torn) % SECTOR == 0  # whole, or cut at a sector boundary
        assert torn > 0  # the first (partial) sector always lands
        torn_lengths.add(torn)
    assert len(torn_lengths) > 2  # the seed moves the tear; some cuts tear mid-write


def test_without_torn_mode_the_last_write_is_dropped_whole(pfs: PowerFs) -> None:
    m = pfs.mountpoint
    write_synced(m / "f", b"o" * 4096)
    with open(m / "f", "r+b") as f:
        f.write(b"n" * 4096)
    assert power_cut(pfs, seed=1)["torn_bytes"] == 0
    assert (m / "f").read_bytes() == b"o" * 4096


def _count(db: Path) -> int:
    """Rows of `t` after the cut (a database whose table never reached the medium has none);
    fails unless the file passes `PRAGMA integrity_check`."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 't'").fetchone():
            return 0
        return int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])
    finally:
        conn.close()


def _cut_with_open(fs: PowerFs, conn: sqlite3.Connection, *, torn: bool, seed: int) -> dict[str, int]:
    """A cut while `conn` is open, as a running process's connection is; it is closed after the
    cut (nothing it does then reaches the medium) and before the unmount."""
    try:
        return fs.cut(torn=torn, seed=seed)
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.close()
        fs.unmount()
        fs.mount()


@pytest.mark.parametrize("torn", [False, True])
def test_sqlite_wal_full_keeps_every_commit(pfs: PowerFs, torn: bool) -> None:
    """SQLite in WAL mode with synchronous=FULL, as the gateway runs it: every committed row
    survives a cut in the middle of a large uncommitted transaction (its frames spilled to the WAL
    unsynced, the last one torn in the harsh mode), with checkpoints and WAL resets on the way."""
    db = pfs.mountpoint / "full.db"
    for seed in range(3):
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA wal_autocheckpoint = 50")
        conn.execute("PRAGMA cache_size = 20")  # the open transaction spills pages into the WAL
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER, pad BLOB)")
        committed = int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]) + 150
        for n in range(150):
            conn.execute("INSERT INTO t VALUES (?, randomblob(700))", (n,))
        conn.execute("BEGIN")
        for n in range(300):
            conn.execute("INSERT INTO t VALUES (?, randomblob(700))", (-n,))
        dropped = _cut_with_open(pfs, conn, torn=torn, seed=seed)
        assert dropped["dropped_bytes"] > 0  # the cut really took the spilled frames
        assert _count(db) == committed


def test_sqlite_without_fsync_loses_commits(pfs: PowerFs) -> None:
    """The control: with synchronous=OFF SQLite never fsyncs, and committed rows are gone after a
    cut (so the test above would see a database that skipped its fsyncs)."""
    db = pfs.mountpoint / "off.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (n INTEGER, pad BLOB)")  # synchronous FULL (default) so far
    conn.execute("PRAGMA synchronous = OFF")
    for n in range(100):
        conn.execute("INSERT INTO t VALUES (?, randomblob(700))", (n,))
    _cut_with_open(pfs, conn, torn=False, seed=0)
    assert _count(db) < 100


def test_an_armed_cut_happens_inside_the_nth_write(pfs: PowerFs) -> None:
    m = pfs.mountpoint
    write_synced(m / "f", b"o" * 2048)
    pfs.arm(3, torn=True, seed=5)
    fd = os.open(m / "f", os.O_WRONLY)
    try:
        os.pwrite(fd, b"a" * 512, 0)
        os.pwrite(fd, b"b" * 512, 512)
        with pytest.raises(OSError):  # the third write is where the power fails
            os.pwrite(fd, b"c" * 1024, 1024)
        with pytest.raises(OSError):  # and nothing works afterwards
            os.fsync(fd)
    finally:
        os.close(fd)
    info = pfs.wait_cut(10)
    assert info is not None and info["dropped_writes"] == 3
    pfs.unmount()
    pfs.mount()
    torn = info["torn_bytes"]
    assert torn in (512, 1024)  # a sector of it, or all of it
    assert (m / "f").read_bytes() == b"o" * 1024 + b"c" * torn + b"o" * (1024 - torn)


@pytest.mark.parametrize("torn", [False, True])
def test_sqlite_wal_full_keeps_acknowledged_commits_when_a_write_fails(pfs: PowerFs, torn: bool) -> None:
    """The power fails inside the k-th write of a stream of commits (a WAL frame, a WAL header
    after a reset, a checkpoint's page, the database header): every commit that returned survives,
    the one in flight may or may not, and the file is sound."""
    db = pfs.mountpoint / "k.db"
    rng = random.Random(42)
    for round_ in range(6):
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA wal_autocheckpoint = 40")
        conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER, pad BLOB)")
        committed = int(conn.execute("SELECT COUNT(*) FROM t").fetchone()[0])
        pfs.arm(rng.randint(1, 400), torn=torn, seed=round_)
        with pytest.raises(sqlite3.Error):
            for n in range(10_000):  # far more writes than armed: the cut comes first
                conn.execute("INSERT INTO t VALUES (?, randomblob(?))", (n, rng.randint(10, 3000)))
                committed += 1
        assert pfs.wait_cut(10) is not None
        _cut_with_open(pfs, conn, torn=torn, seed=round_)  # already cut: closes, remounts
        assert committed <= _count(db) <= committed + 1


def test_a_new_directory_needs_its_parent_synced(pfs: PowerFs) -> None:
    """mkdir, a file written and fsynced in it, the new directory fsynced: all lost unless the
    parent is fsynced too; then all there (the fsynced data included)."""
    m = pfs.mountpoint
    for sync_parent in (False, True):
        (m / "d").mkdir()
        write_synced(m / "d" / "f", b"image")  # fsyncs the file and d
        if sync_parent:
            fsync_path(m)
        power_cut(pfs)
        assert os.listdir(m) == (["d"] if sync_parent else [])
    assert (m / "d" / "f").read_bytes() == b"image"
