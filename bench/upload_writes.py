"""Disk writes per device event-log upload, through the real upload path.

What the soak's per-hour figure is mostly made of, taken apart. In this process, on a fresh
migrated database opened as the gateway opens it (WAL, synchronous=FULL; a file under $TMPDIR,
which must be a disk): 20 claimed devices upload 10 items each in turn, one upload every 15 s of a
simulated clock (the soak load watch, 240 uploads an hour), the items spread over the 300 s since the
device's previous upload (what a device that buffered them sends), through
`gateway.devices.registry.upload_logs` (one IMMEDIATE transaction: items, outbox event, payload).

Per upload: `/proc/self/io` write_bytes (what the kernel charges this process: each commit's WAL
frames, rounded up to whole 4 KiB OS pages since the fsync leaves the last one clean, plus the
checkpoints its commits run at about 4 MiB of WAL) and the WAL frames written, by the table or
index owning each page (dbstat, read between uploads, outside the measured window). Not counted
here, counted by the soak: the -shm file's pages the kernel writes back every ~30 s.

Both page sizes: 1 KiB (what the gateway creates) and 4 KiB (an existing database made before
it, which keeps its page size). 600 uploads after 100 of warm-up (quick: 240 after 40).
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

from bench.common import Result, log, temp_dir
from bench.soak import WalWatch
from gateway.clock import utc_now
from gateway.devices.registry import upload_logs
from gateway.devices.validate import LogItem
from gateway.store import migrate, open_database, write_tx
from gateway.store.models import Device

NAME = "upload_writes"
DEVICES = 20
ITEMS = 10
EVERY_MS = 15_000  # site-wide: 240 uploads an hour, the soak load watch (demo --log-every 300)
PAGE_SIZES = (1024, 4096)
OS_PAGE = 4096


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


class Fleet:
    """Items as devices upload them: each device's items fall between its previous upload and now."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 1_760_000_000_000
        self.devices = [f"device-{0xe5018600 + i:08x}" for i in range(DEVICES)]
        self.last = {d: self.now - DEVICES * EVERY_MS for d in self.devices}
        self.turn = 0

    def next_upload(self) -> tuple[str, list[LogItem]]:
        self.now += EVERY_MS
        dev = self.devices[self.turn % DEVICES]
        self.turn += 1
        times = sorted(self.rng.sample(range(self.last[dev] + 1, self.now), ITEMS))
        self.last[dev] = self.now
        items = []
        for t in times:
            notes = self.rng.choice((1, 1, 2, 5))
            items.append(LogItem(type="PAYMENT", status="SUCCEEDED", timestamp_ms=t, total_amount=20 * notes,
                                 qr_charge_id=None, qr_net_amount=0,
                                 bank={"20": notes, "50": 0, "100": 0, "500": 0, "1000": 0},
                                 coin={"1": 0, "2": 0, "5": 0, "10": 0}))
        return dev, items


def _one_size(tmp: Path, page_size: int, warmup: int, n: int) -> list[Result]:
    path = tmp / f"g{page_size}.db"
    if page_size != 1024:  # an older gateway's database: made before 1 KiB pages, it keeps its size
        con = sqlite3.connect(path)
        con.execute(f"PRAGMA page_size = {page_size}")
        con.execute("PRAGMA journal_mode = wal")
        con.close()
    db = open_database(path)
    try:
        assert db.execute_sql("PRAGMA page_size").fetchone()[0] == page_size
        migrate(db)
        fleet = Fleet(seed=page_size)
        now = utc_now()
        with write_tx(db):
            Device.insert_many([{"device_id": d, "chip_id": f"{i:08X}", "mac_address": f"24:6F:28:00:00:{i:02X}",
                                 "device_type": "CAR_WASH", "firmware_version": "car_wash_v1.00", "name": f"box {i}",
                                 "claimed": True, "registered_at": now, "claimed_at": now, "last_seen_at": now,
                                 "online": True, "status": "NORMAL"} for i, d in enumerate(fleet.devices)]).execute()
        for _ in range(warmup):
            dev, items = fleet.next_upload()
            upload_logs(db, dev, items, site_id="bench-site")
        db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")  # measured uploads start on an empty WAL
        wal = WalWatch(path, new_page_lookup=0)
        per_upload: list[float] = []
        cpu_us: list[float] = []
        stored = 0
        for _ in range(n):
            dev, items = fleet.next_upload()
            w0, c0 = write_bytes(), time.process_time()
            r = upload_logs(db, dev, items, site_id="bench-site")
            cpu_us.append((time.process_time() - c0) * 1e6)
            per_upload.append((write_bytes() - w0) / 1024)
            stored += r.stored
            wal.poll()  # reads dbstat: outside the measured window (a reader writes to -shm)
        frames, commits = wal.snapshot()
        if stored != n * ITEMS or commits < n:
            raise AssertionError(f"stored {stored} of {n * ITEMS} items in {commits} commits")
        db_kib = path.stat().st_size / 1024
    finally:
        db.close()
    mean_kib = sum(per_upload) / n
    total_frames = sum(frames.values())
    by_tree = {k: round(v / n, 2) for k, v in sorted(frames.items(), key=lambda kv: -kv[1])}
    label = f"{page_size // 1024} KiB pages"
    log(f"{NAME}: {label}: {mean_kib:.1f} KiB/upload, {total_frames / n:.1f} frames/upload, "
        f"{wal.generations} WAL generations; by b-tree {by_tree}")
    per_h = mean_kib * 1024 * (3_600_000 / EVERY_MS) / 1e6
    return [
        Result(NAME, f"write_bytes per upload, {label}", "KiB", per_upload,
               notes=f"mean {mean_kib:.1f} KiB = {per_h:.2f} MB/h at 240 uploads/h; "
                     f"{total_frames / n:.1f} WAL frames/upload "
                     f"({total_frames / n * (page_size + 24) / 1024:.1f} KiB), "
                     f"checkpoints included ({max(wal.generations - 1, 0)} in {n} uploads)",
               extra={"mean_kib": mean_kib, "mb_per_h_at_240": per_h, "frames_per_upload_by_btree": by_tree,
                      "commits": commits, "db_kib_at_end": db_kib}),
        Result(NAME, f"WAL frames per upload, {label}", "frames", [total_frames / n],
               notes=", ".join(f"{k} {v}" for k, v in list(by_tree.items())[:6])),
        Result(NAME, f"CPU per upload (store, commit), {label}", "us", cpu_us,
               notes=f"{ITEMS} items: keys, rows, outbox event, the transaction and its fsync'd commit"),
    ]


def run(quick: bool) -> list[Result]:
    warmup, n = (40, 240) if quick else (100, 600)
    results: list[Result] = []
    with temp_dir("bench-upload-writes-") as tmp:
        for size in PAGE_SIZES:
            results += _one_size(tmp, size, warmup, n)
    return results
