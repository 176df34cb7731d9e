"""The outbox drainer against the real cloud simulator over HTTP, on real SQLite files.

Every wait is on a condition with a timeout (the simulator's counters, the database, the
drainer's state), never a fixed sleep. Backoffs are shortened to tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peewee import SqliteDatabase

from gateway.clock import utc_now
from gateway.config import CloudConfig, Config, OutboxConfig, SiteConfig
from gateway.store import migrate, open_database, write_tx
from gateway.store.models import OutboxEvent, OutboxPayload
from gateway.store.outbox import add_event
from gateway.uplink import OutboxDrainer
from gateway.uplink.drainer import KEY_ENV
from sim.cloud import CloudSim
from sim.procs import child_env, stop_process

KEY = "uplink-test-key"
SITE = "site-7"
# Marks deferred a little: every test goes through the deferred path (write_marks) and still sees
# "sent" rows soon after delivery.
FAST = {"backoff_min_sec": 0.05, "backoff_max_sec": 0.2, "mark_sent_delay_sec": 0.2}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteDatabase]:
    d = open_database(tmp_path / "gateway.db")
    migrate(d)
    yield d
    d.close()


@pytest.fixture
def sim() -> Iterator[CloudSim]:
    s = CloudSim(KEY, site_id=SITE).start()
    yield s
    s.stop()


def make_config(url: str, **outbox: Any) -> Config:
    return Config(site=SiteConfig(id=SITE), cloud=CloudConfig(url=url, timeout_sec=3.0),
                  outbox=OutboxConfig(**{**FAST, **outbox}))


def add_events(db: SqliteDatabase, n: int, partitions: int, *, start: int = 0,
               event_type: str = "device.event_logs") -> list[tuple[str, str]]:
    """n events round-robin over `partitions` devices (device id in the payload, as the
    simulator files them); returns (event id, partition) in seq order."""
    out = []
    with write_tx(db):
        for i in range(start, start + n):
            part = f"dev-{i % partitions}"
            eid = add_event(event_type, {"device_id": part, "n": i}, site_id=SITE, partition=part)
            out.append((eid, part))
    return out


def stored_row(*, payload: str, **fields: Any) -> OutboxEvent:
    """An outbox event with chosen fields (inside the caller's transaction)."""
    row = OutboxEvent.create(**fields)
    OutboxPayload.create(seq=row.seq, payload=payload)
    return row


def expected_by_partition(events: list[tuple[str, str]]) -> dict[str | None, list[str]]:
    parts: dict[str | None, list[str]] = {}
    for eid, part in events:
        parts.setdefault(part, []).append(eid)
    return parts


def states(db: SqliteDatabase) -> dict[str, int]:
    return dict(db.execute_sql('SELECT "state", COUNT(*) FROM "outbox_event" GROUP BY "state"').fetchall())


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition every 10 ms until true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.01)


async def sim_until(sim: CloudSim, predicate: Callable[[CloudSim], bool], timeout: float = 10) -> None:
    await asyncio.to_thread(sim.wait_for, predicate, timeout)


@contextlib.asynccontextmanager
async def running(drainer: OutboxDrainer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(drainer.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def assert_delivered_once_in_order(sim: CloudSim, events: list[tuple[str, str]]) -> None:
    ids = sim.event_ids()
    assert len(ids) == len(set(ids)) == len(events)
    assert set(ids) == {eid for eid, _ in events}, "events missing or unknown at the cloud"
    assert sim.partitions() == expected_by_partition(events), "per-partition order broken"
    stats = sim.stats()
    assert stats["received"] == stats["unique"] + stats["duplicates"]


async def test_outage_everything_arrives_once_in_partition_order(db: SqliteDatabase, sim: CloudSim) -> None:
    events = add_events(db, 300, partitions=3)
    drainer = OutboxDrainer(make_config(sim.url, batch_max_events=20), KEY, db, poll_interval_sec=30)
    async with running(drainer):
        await sim_until(sim, lambda s: s.unique >= 60)
        sim.stall()  # hold the next request (unrecorded) so the outage cuts the queue in the middle
        await sim_until(sim, lambda s: s.stats()["held"] == 1)
        sim.go_away()
        sim.clear()
        events += add_events(db, 150, partitions=3, start=300)
        drainer.wake()
        await until(lambda: drainer.state()["consecutive_failures"] >= 3, 10, "failed attempts during the outage")
        st = drainer.state()
        assert "cannot reach the cloud" in (st["last_error"] or "")
        assert states(db)["pending"] > 150
        sim.come_back()
        await sim_until(sim, lambda s: s.unique == len(events))
        await until(lambda: states(db) == {"sent": len(events)}, 10, "every event marked sent")
        await until(lambda: drainer.state()["backlog"] == 0, 10, "backlog 0")
        st = drainer.state()
    assert_delivered_once_in_order(sim, events)
    assert st["consecutive_failures"] == 0 and not st["degraded"] and st["last_success_at"]
    assert st["sent"] == len(events)  # every row marked once
    retried = OutboxEvent.select().where(OutboxEvent.attempts >= 2).count()
    assert retried >= 1  # the head of the queue was tried during the outage
    assert OutboxEvent.select().where(OutboxEvent.sent_at.is_null()).count() == 0
    assert max(len(b) for b in sim.batches()) <= 20


async def test_batches_respect_the_byte_limit(db: SqliteDatabase, sim: CloudSim) -> None:
    with write_tx(db):
        # Same-length payloads: every stored event has the same size.
        events = [(add_event("device.event_logs", {"device_id": "dev-0", "pad": "x" * 1000, "n": f"{i:03d}"},
                             site_id=SITE, partition="dev-0"), "dev-0") for i in range(40)]
    sizes = {e.size for e in OutboxEvent.select()}
    assert len(sizes) == 1
    size = sizes.pop()
    drainer = OutboxDrainer(make_config(sim.url, batch_max_bytes=4096), KEY, db)
    async with running(drainer):
        await sim_until(sim, lambda s: s.unique == 40)
    assert_delivered_once_in_order(sim, events)
    # body = '{"events":[' + k events joined by ',' + ']}' <= 4096 bytes
    per_batch = (4096 - len('{"events":[]}') + 1) // (size + 1)
    assert per_batch >= 2
    assert [len(b) for b in sim.batches()] == [per_batch] * (40 // per_batch) + (
        [40 % per_batch] if 40 % per_batch else [])


async def test_poison_event_parks_as_dead_without_blocking(db: SqliteDatabase, sim: CloudSim) -> None:
    events = add_events(db, 100, partitions=2)
    poison = [events[17][0], events[70][0]]
    sim.poison(poison, status=400)
    drainer = OutboxDrainer(make_config(sim.url, batch_max_events=50), KEY, db)
    async with running(drainer):
        await sim_until(sim, lambda s: s.unique == 98)
        await until(lambda: states(db) == {"sent": 98, "dead": 2}, 10, "98 sent and 2 dead")
        st = drainer.state()
    assert (st["dead"], st["dead_total"], st["degraded"]) == (2, 2, False)
    dead = list(OutboxEvent.select().where(OutboxEvent.state == "dead").order_by(OutboxEvent.seq))
    assert [d.event_id for d in dead] == poison
    assert all("HTTP 400" in (d.last_error or "") and "rejected" in (d.last_error or "") for d in dead)
    delivered = [(eid, p) for eid, p in events if eid not in poison]
    assert_delivered_once_in_order(sim, delivered)
    # Later events of a partition whose event died were delivered (documented choice).
    assert events[99][0] in sim.event_ids() and events[99][1] == events[17][1]
    # Isolated by halving, not one request per event: 2 batches, about 2*log2(50) requests each.
    assert sim.stats()["requests"] <= 30


async def test_auth_refusal_is_degraded_and_parks_nothing(db: SqliteDatabase, sim: CloudSim) -> None:
    add_events(db, 30, partitions=1)
    drainer = OutboxDrainer(make_config(sim.url), "not-the-site-key", db)
    async with running(drainer):
        await until(lambda: drainer.state()["consecutive_failures"] >= 3, 10, "3 refused attempts")
        st = drainer.state()
    assert st["degraded"] and "401" in st["degraded_reasons"][0] and "INVALID_SIGNATURE" in st["last_error"]
    assert states(db) == {"pending": 30}
    assert sim.unique == 0 and sim.stats()["rejected"] >= 3


async def test_server_errors_back_off_then_deliver(db: SqliteDatabase, sim: CloudSim) -> None:
    events = add_events(db, 10, partitions=2)
    sim.fail(503, count=3)
    drainer = OutboxDrainer(make_config(sim.url), KEY, db)
    async with running(drainer):
        await sim_until(sim, lambda s: s.unique == 10)
        await until(lambda: states(db) == {"sent": 10}, 10, "all sent")
    assert sim.stats()["rejected"] == 3
    assert_delivered_once_in_order(sim, events)
    assert {e.attempts for e in OutboxEvent.select()} == {4}
    assert all("HTTP 503" in (e.last_error or "") for e in OutboxEvent.select())


async def test_wake_starts_a_drain_at_once(db: SqliteDatabase, sim: CloudSim) -> None:
    drainer = OutboxDrainer(make_config(sim.url), KEY, db, poll_interval_sec=60)
    async with running(drainer):
        await until(lambda: drainer.state()["phase"] == "idle", 5, "idle")
        add_events(db, 5, partitions=1)
        drainer.wake()
        await sim_until(sim, lambda s: s.unique == 5, timeout=5)  # far less than the 60 s poll
        await until(lambda: drainer.state()["phase"] == "idle" and states(db) == {"sent": 5}, 5, "idle again")
        add_events(db, 5, partitions=1, start=5)
        await asyncio.to_thread(drainer.wake)  # from another thread
        await sim_until(sim, lambda s: s.unique == 10, timeout=5)


async def test_cancel_mid_batch_then_restart_loses_nothing(db: SqliteDatabase, sim: CloudSim) -> None:
    events = add_events(db, 400, partitions=4)
    sim.stall(after_processing=True)  # the cloud commits the first batch, the answer never comes
    drainer = OutboxDrainer(make_config(sim.url, batch_max_events=100), KEY, db)
    task = asyncio.create_task(drainer.run())
    await sim_until(sim, lambda s: s.stats()["held"] == 1)
    assert sim.unique == 100
    t0 = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - t0 < 2.0, "cancelling must abort the request in flight"
    assert not drainer.state()["running"]
    assert states(db) == {"pending": 400}  # never confirmed: nothing marked sent
    sim.release()
    again = OutboxDrainer(make_config(sim.url, batch_max_events=100), KEY, db)
    async with running(again):
        await sim_until(sim, lambda s: s.unique == 400)
        await until(lambda: states(db) == {"sent": 400}, 10, "all sent after restart")
    assert_delivered_once_in_order(sim, events)
    assert sim.duplicates == 100  # exactly the unconfirmed batch, deduplicated by the cloud
    assert sim.received == 500


def drainer_command(tmp_path: Path, sim: CloudSim, *args: str) -> list[str]:
    return [sys.executable, "-m", "gateway.uplink.drainer", "--database", str(tmp_path / "gateway.db"),
            "--url", sim.url, "--site-id", SITE, "--backoff-min", "0.05", "--backoff-max", "0.2", *args]


def drain_to_the_end(tmp_path: Path, db: SqliteDatabase, sim: CloudSim, cmd: list[str],
                     cloud_done: Callable[[CloudSim], bool], total: int) -> None:
    """Run a drainer process until `cloud_done` holds at the cloud and all `total` events are
    marked sent, then stop it (SIGTERM: exit 0)."""
    with (tmp_path / "drainer2.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env={**child_env(), KEY_ENV: KEY}, stdout=log, stderr=subprocess.STDOUT)
    try:
        sim.wait_for(cloud_done, 20)
        deadline = time.monotonic() + 10
        while states(db) != {"sent": total}:
            assert time.monotonic() < deadline, f"not all sent: {states(db)}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, (tmp_path / "drainer2.log").read_text()
    finally:
        stop_process(proc)


def test_sigkill_of_a_draining_process_then_resume(tmp_path: Path, db: SqliteDatabase, sim: CloudSim) -> None:
    """Killed while the cloud holds a batch it committed. Marks are deferred (the default), but a
    full batch of them is written at once: only the held batch is sent again."""
    events = add_events(db, 1000, partitions=5)
    cmd = drainer_command(tmp_path, sim, "--batch-max-events", "50")
    env = child_env()
    env[KEY_ENV] = KEY
    with (tmp_path / "drainer1.log").open("wb") as log1:
        first = subprocess.Popen(cmd, env=env, stdout=log1, stderr=subprocess.STDOUT)
    try:
        sim.wait_for(lambda s: s.unique >= 300, 20)
        sim.stall(after_processing=True)
        sim.wait_for(lambda s: s.stats()["held"] == 1, 10)
        held_at = sim.unique
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        stop_process(first)
    sim.release()
    assert sim.unique == held_at and held_at % 50 == 0
    assert states(db) == {"sent": held_at - 50, "pending": 1000 - held_at + 50}
    # 20 full batches: each batch's marks are written at once.
    drain_to_the_end(tmp_path, db, sim, cmd, lambda s: s.unique == 1000, 1000)
    assert_delivered_once_in_order(sim, events)
    assert sim.duplicates == 50  # the batch the cloud committed but the killed process never confirmed


def test_sigkill_before_deferred_marks_sends_them_again(tmp_path: Path, db: SqliteDatabase, sim: CloudSim) -> None:
    """What deferred marks cost: a process killed after delivering, before marking, leaves the
    events pending; the next one sends them again and the cloud drops the repeats by id."""
    events = add_events(db, 30, partitions=3)
    cmd = drainer_command(tmp_path, sim, "--batch-max-events", "50", "--mark-sent-delay", "600")
    with (tmp_path / "drainer1.log").open("wb") as log1:
        first = subprocess.Popen(cmd, env={**child_env(), KEY_ENV: KEY}, stdout=log1, stderr=subprocess.STDOUT)
    try:
        sim.wait_for(lambda s: s.unique == 30, 20)
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
    finally:
        stop_process(first)
    assert states(db) == {"pending": 30}
    # The next drainer marks at once, so that the database shows when it has read the answers.
    drain_to_the_end(tmp_path, db, sim, [*cmd[:-1], "0"], lambda s: s.duplicates == 30, 30)
    assert_delivered_once_in_order(sim, events)


async def test_deferred_marks_one_write_never_a_second_send(db: SqliteDatabase, sim: CloudSim) -> None:
    """Delivered events stay pending in the database until their marks are due, but are never sent
    again meanwhile, and do not hold back later events; housekeeping, a full batch of marks and an
    orderly stop each write them."""
    first = add_events(db, 5, partitions=1)
    drainer = OutboxDrainer(make_config(sim.url, batch_max_events=10, mark_sent_delay_sec=300), KEY, db,
                            poll_interval_sec=0.05, housekeeping_interval_sec=300)
    async with running(drainer):
        await sim_until(sim, lambda s: s.unique == 5)
        requests = sim.stats()["requests"]
        # Many reads of the queue (every 50 ms) while the 5 delivered rows are still pending.
        polls = drainer.state()["polls"]
        await until(lambda: drainer.state()["polls"] >= polls + 10, 5, "ten more reads of the queue")
        assert states(db) == {"pending": 5}
        assert sim.stats()["requests"] == requests, "a delivered event was sent again"
        assert drainer.state()["sent"] == 5
        # Later events pass the unmarked ones; the tenth delivery fills a batch of marks: written.
        second = add_events(db, 5, partitions=1, start=5)
        drainer.wake()
        await sim_until(sim, lambda s: s.unique == 10)
        await until(lambda: states(db) == {"sent": 10}, 5, "ten marks written at once")
        third = add_events(db, 3, partitions=1, start=10)
        drainer.wake()
        await sim_until(sim, lambda s: s.unique == 13)
        await until(lambda: drainer.state()["phase"] == "idle", 5, "idle")
        assert states(db) == {"sent": 10, "pending": 3}
        await asyncio.to_thread(drainer.housekeeping)  # marks first, then pruning and figures
        assert states(db) == {"sent": 13}
        assert drainer.state()["backlog"] == 0
        fourth = add_events(db, 2, partitions=1, start=13)
        drainer.wake()
        await sim_until(sim, lambda s: s.unique == 15)
        await until(lambda: drainer.state()["sent"] == 15, 5, "the cloud's answer read")
        assert states(db) == {"sent": 13, "pending": 2}
    assert states(db) == {"sent": 15}, "an orderly stop writes the waiting marks"
    assert_delivered_once_in_order(sim, first + second + third + fourth)
    assert sim.duplicates == 0


# --- retention and housekeeping (no cloud needed) ---------------------------------------------

ROUND = ["wash.status", "device.event_logs", "device.status", "device.registered", "wash.session",
         "payment.updated", "command.result", "device.lifecycle"]


def _fill_fixed_size(db: SqliteDatabase, rounds: int) -> list[tuple[int, str]]:
    """rounds × ROUND pending events of exactly 1000 bytes each; (seq, type) in order."""
    out = []
    with write_tx(db):
        for r in range(rounds):
            for typ in ROUND:
                row = stored_row(event_id=f"{typ}-{r}", type=typ, occurred_at="2026-01-01T00:00:00.000Z",
                                 payload=json.dumps({"id": f"{typ}-{r}"}), size=1000)
                out.append((row.seq, typ))
        # Delivered rows are not part of the cap and are never dropped by it.
        stored_row(event_id="old-sent", type="wash.status", occurred_at="x", payload="{}", size=10**6,
                   state="sent", sent_at=utc_now())
    return out


def _pending(db: SqliteDatabase) -> list[tuple[int, str]]:
    return [(int(s), t) for s, t in db.execute_sql(
        'SELECT "seq", "type" FROM "outbox_event" WHERE "state" = \'pending\' ORDER BY "seq"').fetchall()]


def test_retention_cap_drop_order(db: SqliteDatabase) -> None:
    rows = _fill_fixed_size(db, rounds=5)  # 40 events, 40,000 bytes
    coalescible = [r for r in rows if r[1] in ("wash.status", "device.status")]
    others = [r for r in rows if r[1] in ("device.registered", "device.lifecycle")]
    protected = [r for r in rows if r not in coalescible and r not in others]

    def drainer(cap: int) -> OutboxDrainer:
        return OutboxDrainer(make_config("", max_bytes=cap), KEY, db)

    assert drainer(40_000).enforce_retention() == 0  # at the cap is not over it

    d = drainer(37_500)  # 2,500 over: the 3 oldest coalescible events go
    assert d.enforce_retention() == 3
    assert _pending(db) == [r for r in rows if r not in coalescible[:3]]
    assert (d.state()["dropped"], d.state()["dropped_bytes"], d.degraded) == (3, 3000, False)
    assert d.state()["dropped_by_type"] == {"wash.status": 2, "device.status": 1}

    d = drainer(25_000)  # 12,000 over: the other 7 coalescible, then the 5 oldest other events
    assert d.enforce_retention() == 12
    assert _pending(db) == sorted(protected + others[5:])
    assert not d.degraded

    d = drainer(15_000)  # only protected events could free more: keep them, report degraded
    assert d.enforce_retention() == 5
    assert _pending(db) == protected
    st = d.state()
    assert st["degraded"] and "never dropped" in st["degraded_reasons"][0]
    assert OutboxEvent.get(OutboxEvent.event_id == "old-sent").state == "sent"

    d2 = drainer(25_000)  # back under the cap: no longer degraded
    assert d2.enforce_retention() == 0 and not d2.degraded


async def test_housekeeping_prunes_delivered_and_runs_without_cloud(db: SqliteDatabase) -> None:
    now = utc_now()
    with write_tx(db):
        for name, days, state in (("sent-8d", 8, "sent"), ("sent-6d", 6, "sent"), ("dead-30d", 30, "dead")):
            stored_row(event_id=name, type="wash.session", occurred_at="x", payload="{}", size=2,
                       state=state, sent_at=now - dt.timedelta(days=days))
    add_events(db, 3, partitions=1)
    drainer = OutboxDrainer(make_config("", delivered_retention_days=7), KEY, db, housekeeping_interval_sec=3600)
    assert not drainer.enabled
    async with running(drainer):
        await until(lambda: drainer.state()["backlog"] == 3, 5, "housekeeping at start")
    ids = {e.event_id for e in OutboxEvent.select()}
    assert "sent-8d" not in ids and {"sent-6d", "dead-30d"} <= ids
    st = drainer.state()
    assert (st["pending_bytes"] > 0, st["dead_total"], st["enabled"], st["running"]) == (True, 1, False, False)
