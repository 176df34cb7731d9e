"""What one small commit costs in disk writes, by how often commits come.

Why the soak's MB/h follow the number of commits more than their size. Each series is a thread
of this process with a database of its own (under $TMPDIR, which must be a disk) opened with the
gateway's pragmas (`gateway.store.db.PRAGMAS`: WAL, synchronous=FULL, 1 KiB pages), committing
one 100-byte row at a fixed spacing; its cost is the thread's own `/proc/self/task/<tid>/io`
write_bytes per commit (the series run at the same time without charging each other). The WAL
grows by one 1 KiB page (1,048 bytes with its frame header) per commit in every series.

- spacing 1 s, 10 s and 40 s: what the gateway's commits cost as they come (an upload burst, the
  demo's uploads, a lone presence save). The kernel writes dirty file pages back about 30 s after
  they were first dirtied (`vm.dirty_expire_centisecs`; the figure is in the notes): commits closer
  than that share the -shm pages already dirty, a lone commit dirties them again.
- spacing 40 s with `locking_mode=EXCLUSIVE` (no -shm file: the WAL index lives in the process's
  heap; the gateway cannot, as two processes share the database): the WAL index's share.
Full: 30, 12, 5 and 5 commits (~3.5 min, the series overlap); quick: 10, 6, 3 and 3 (~2 min).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import Result, log, temp_dir
from gateway.store.db import PRAGMAS

NAME = "commit_cost"
ROW = "x" * 100


@dataclass
class Series:
    label: str
    spacing: float
    commits: int
    exclusive: bool = False
    costs: list[float] = field(default_factory=list)  # KiB per commit
    wal_growth: int = 0
    error: str | None = None


def task_write_bytes() -> int:
    with open(f"/proc/self/task/{threading.get_native_id()}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/task/<tid>/io")


def _run_series(s: Series, path: Path) -> None:
    try:
        con = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        for k, v in PRAGMAS.items():
            con.execute(f"PRAGMA {k} = {v}")
        if s.exclusive:
            con.execute("PRAGMA locking_mode = EXCLUSIVE")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        wal = path.with_name(path.name + "-wal")
        time.sleep(s.spacing)  # the set-up's pages written back (or not) as a steady site's would be
        size0 = wal.stat().st_size
        for _ in range(s.commits):
            w0 = task_write_bytes()
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO t (v) VALUES (?)", (ROW,))
            con.execute("COMMIT")
            s.costs.append((task_write_bytes() - w0) / 1024)
            time.sleep(s.spacing)
        s.wal_growth = wal.stat().st_size - size0
        con.close()
    except Exception as exc:  # reported by run(); a thread must not die silently
        s.error = repr(exc)


def _dirty_expire_s() -> float:
    try:
        return int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100
    except (OSError, ValueError):
        return float("nan")


def run(quick: bool) -> list[Result]:
    n1, n10, n40 = (10, 6, 3) if quick else (30, 12, 5)
    series = [Series("1 s", 1.0, n1), Series("10 s", 10.0, n10), Series("40 s", 40.0, n40),
              Series("40 s, no -shm (locking_mode=EXCLUSIVE)", 40.0, n40, exclusive=True)]
    expire = _dirty_expire_s()
    with temp_dir("bench-commit-cost-") as tmp:
        threads = [threading.Thread(target=_run_series, args=(s, tmp / f"s{i}.db"), name=f"commit-cost-{i}")
                   for i, s in enumerate(series)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        if any(t.is_alive() for t in threads):
            raise TimeoutError("a commit series did not finish in 600 s")
    results = []
    for s in series:
        if s.error:
            raise RuntimeError(f"{s.label}: {s.error}")
        wal_kib = s.wal_growth / s.commits / 1024
        log(f"{NAME}: {s.label}: {sum(s.costs) / len(s.costs):.1f} KiB/commit, WAL {wal_kib:.2f} KiB/commit")
        results.append(Result(NAME, f"one-row commit every {s.label}", "KiB", s.costs,
                              notes=f"mean {sum(s.costs) / len(s.costs):.1f} KiB written per commit; the WAL grew "
                                    f"{wal_kib:.2f} KiB per commit; dirty_expire {expire:g} s",
                              extra={"spacing_s": s.spacing, "exclusive": s.exclusive,
                                     "wal_bytes_per_commit": s.wal_growth / s.commits}))
    return results
