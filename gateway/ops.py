"""Operations commands of `carwash-gateway`: backup, restore, outbox, status.

They read the store directly (any process may read; SQLite's WAL keeps readers consistent) and the
core's retained health over the local broker. `backup` uses SQLite's online backup API, so the copy
is consistent while the services run; `restore` refuses while the core answers on its broker port.
"""

from __future__ import annotations

import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import Config, Secrets
from gateway.store import open_database, schema_status

PAGES_PER_STEP = 256


def _progress(label: str) -> Callable[[int, int, int], None]:
    def report(_status: int, remaining: int, total: int) -> None:
        done = total - remaining
        print(f"\r{label}: {done}/{total} pages ({100 * done // max(1, total)} %)", end="", file=sys.stderr,
              flush=True)

    return report


def _check(path: Path) -> None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    if result != "ok":
        raise SystemExit(f"{path}: integrity check failed: {result}")


def _copy(source: Path | str, dest: Path | str, label: str) -> None:
    """SQLite's online backup from `source` (read-only) into `dest`, with progress on stderr."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10)
    dst = sqlite3.connect(dest, timeout=10)
    try:
        src.backup(dst, pages=PAGES_PER_STEP, progress=_progress(label))
    finally:
        dst.close()
        src.close()
    print(file=sys.stderr)
    _check(Path(dest))


def backup(cfg: Config, dest: Path) -> int:
    """Copy the live database to `dest` (a new file), then check the copy's integrity."""
    if dest.exists():
        raise SystemExit(f"{dest} exists; choose a new file")
    t0 = time.monotonic()
    _copy(cfg.paths.database, dest, "backup")
    print(f"backup: {dest} ({dest.stat().st_size} bytes) in {time.monotonic() - t0:.1f} s, integrity ok")
    return 0


def core_running(cfg: Config) -> bool:
    host = "127.0.0.1" if cfg.mqtt.bind in ("0.0.0.0", "::", "") else cfg.mqtt.bind
    try:
        with socket.create_connection((host, cfg.mqtt.port), timeout=1):
            return True
    except OSError:
        return False


def restore(cfg: Config, source: Path) -> int:
    """Replace the database with a backup (checked first); the services must be stopped."""
    if not source.is_file():
        raise SystemExit(f"{source}: no such file")
    if core_running(cfg):
        raise SystemExit("the core is running (its broker answers): stop the services first "
                         "(systemctl stop carwash-gateway.target)")
    _check(source)
    db = open_database(source, bind_models=False)
    try:
        ok, version = schema_status(db)
    finally:
        db.close()
    print(f"restore: {source} has schema version {version}" + ("" if ok else " (the core will migrate it)"))
    # In WAL mode SQLite cannot take the page size of a backup from an older install (4 KiB pages;
    # new databases have 1 KiB): leave WAL mode first (this checkpoints); the core sets it again.
    live = sqlite3.connect(cfg.paths.database, timeout=10)
    try:
        live.execute("PRAGMA journal_mode = DELETE")
    finally:
        live.close()
    _copy(source, cfg.paths.database, "restore")
    print(f"restore: {cfg.paths.database} replaced, integrity ok")
    return 0


def _rows(cfg: Config, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{cfg.paths.database}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def outbox(cfg: Config, *, dead_limit: int = 20) -> int:
    by_state = _rows(cfg, 'SELECT "state", "type", COUNT(*), SUM("size") FROM "outbox_event" '
                          'GROUP BY 1, 2 ORDER BY 1, 2')
    print(f"cloud: {cfg.cloud.url or '(none configured)'}")
    if not by_state:
        print("outbox: empty")
    for state, kind, n, size in by_state:
        print(f"  {state:8s} {kind:24s} {n:8d} events {size or 0:12d} bytes")
    dead = _rows(cfg, 'SELECT "seq", "type", "occurred_at", "last_error" FROM "outbox_event" WHERE "state" = \'dead\' '
                      'ORDER BY "seq" DESC LIMIT ?', (dead_limit,))
    if dead:
        print(f"dead letters (newest {len(dead)}; resend or discard them on the technician page, Cloud):")
        for seq, kind, at, err in dead:
            print(f"  #{seq} {kind} {at}: {err}")
    return 0


def _call_or_none(client: Any, method: str) -> Any:
    from gateway.mqtt.client import BusUnavailable, RpcTimeout
    from gateway.mqtt.rpc import RpcError

    try:
        return client.call(method, {}, timeout=3)
    except (BusUnavailable, RpcTimeout, RpcError):
        return None


def _size(n: float | None) -> str:
    if n is None:
        return "not available"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def pi_lines(pi: dict[str, Any]) -> list[str]:
    """The Pi's health (RPC `health.pi`, gateway/core/health.py) as `status` prints it."""
    flags = pi.get("flags")
    if flags is None:
        power = "not available"
    elif flags.get("under_voltage_now"):
        power = "UNDER-VOLTAGE NOW"
    elif flags.get("under_voltage_occurred"):
        power = "under-voltage occurred since boot"
    else:
        power = "ok"
    if flags and (flags.get("throttled_now") or flags.get("freq_capped_now")):
        power += ", CPU throttled"
    temp = pi.get("cpu_temp_c")
    up = pi.get("uptime_sec")
    unclean = (pi.get("last_unclean_stop") or {}).get("detected_at")
    lines = [f"pi: cpu {'not available' if temp is None else f'{temp:.1f} °C'}, power {power}, "
             f"uptime {'not available' if up is None else f'{up / 86400:.1f} d'}",
             f"pi: data disk {_size(pi.get('disk_free_bytes'))} free of {_size(pi.get('disk_total_bytes'))} "
             f"({pi.get('disk_used_percent')} % used, warning at {pi.get('disk_warn_percent')} %), "
             f"memory {_size(pi.get('mem_available_bytes'))} available of {_size(pi.get('mem_total_bytes'))}",
             f"pi: core writes {_size(pi.get('core_written_bytes_per_day'))}/day; last unclean shutdown: "
             + (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unclean)) if unclean else "none")]
    lines += [f"WARNING: {w}" for w in pi.get("warnings", [])]
    return lines


def status(cfg: Config, secrets: Secrets) -> int:
    from gateway.mqtt.client import BusClient

    print(f"site {cfg.site.id} ({cfg.site.name})")
    client = BusClient("127.0.0.1" if cfg.mqtt.bind in ("0.0.0.0", "::", "") else cfg.mqtt.bind, cfg.mqtt.port,
                       cfg.mqtt.internal_username, secrets.mqtt_internal_password, name="status")
    client.start()
    try:
        health = None
        if client.wait_connected(3):
            deadline = time.monotonic() + 3
            while client.health is None and time.monotonic() < deadline:
                time.sleep(0.05)  # the retained health arrives right after the subscription
            health = client.health
        core = client.core_status
        broker = _call_or_none(client, "broker.stats")
        pi = _call_or_none(client, "health.pi")
    finally:
        client.stop()
    if health is None:
        print("core: not answering (services stopped?)")
    else:
        print(f"core: online since {(core or {}).get('since', '?')}, version {(core or {}).get('version', '?')}")
        plc = health.get("plc", {})
        if broker is not None:
            refused = ", ".join(f"{n} {why}" for why, n in sorted(broker["refused"].items())) or "none"
            print(f"mqtt: {broker['clients']} clients connected; refused so far: {refused}")
        print(f"plc: {sum(plc.values())}/{len(plc)} bays answering" + "".join(
            f"; {b} OFFLINE" for b, up in plc.items() if not up))
        up = health.get("uplink") or {}
        cloud = "reachable" if health.get("cloud") else "unreachable" if health.get("cloud_configured") else "none"
        print(f"cloud: {cloud}"
              f", backlog {up.get('backlog', '?')}, dead {up.get('dead', '?')}"
              + (f", bridge {'up' if up.get('bridge') else 'down'}" if up.get("bridge") is not None else "")
              + ("".join(f"; {r}" for r in up.get("reasons", []))))
        if pi:
            for line in pi_lines(pi):
                print(line)
    for bay, state, course, err in _rows(cfg, 'SELECT "bay_id", "state", "course", "error_code" FROM "bay" ORDER BY 1'):
        print(f"  {bay:10s} {state:9s} {course or '-':12s} {err or ''}")
    (total, online, pending), = _rows(cfg, 'SELECT COUNT(*), SUM("online"), SUM(NOT "claimed" AND NOT "rejected") '
                                          'FROM "device"')
    print(f"devices: {total} ({online or 0} online, {pending or 0} pending)")
    (pending_events,), = _rows(cfg, 'SELECT COUNT(*) FROM "outbox_event" WHERE "state" = \'pending\'')
    print(f"outbox: {pending_events} events not marked sent (delivered ones are marked up to "
          f"{cfg.outbox.mark_sent_delay_sec:g} s later)")
    return 0
