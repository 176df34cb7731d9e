"""The operations commands against a running core and web: status, outbox, an online backup while
writes go on, and a restore that refuses while the core runs and works once it is stopped."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from sim.procs import child_env, gateway_command
from tests.conftest import Site, start_process
from tests.test_uplink_e2e import signed_post
from web.context import STATUS_CONNECTED


def run(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(gateway_command(*args, "--config", str(site.config_path)), env=child_env(),
                          capture_output=True, text=True, timeout=60)


def scalar(path: Path, sql: str) -> Any:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def devices_in(path: Path) -> int:
    return int(scalar(path, 'SELECT COUNT(*) FROM "device"'))


def page_size(path: Path) -> int:
    return int(scalar(path, "PRAGMA page_size"))


def test_status_outbox_backup_restore(site: Site, tmp_path: Path) -> None:
    core = start_process(site, "core")
    web = start_process(site, "web")
    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        for i in range(3):
            signed_post(site, "/api/v1/devices/need-register", {
                "chip_id": f"0B5E0{i}01", "mac_address": f"24:0A:C4:00:06:0{i}", "firmware_version": "car_wash_v1"})
        st = run(site, "status")
        assert st.returncode == 0, st.stderr
        assert "core: online since" in st.stdout and "devices: 3 (0 online, 3 pending)" in st.stdout, st.stdout
        assert "clients connected; refused so far: none" in st.stdout, st.stdout
        # The Pi's health (this machine: whatever it reports, or "not available"); a fresh site
        # has had no unclean shutdown.
        assert "pi: cpu " in st.stdout and "data disk " in st.stdout, st.stdout
        assert "last unclean shutdown: none" in st.stdout, st.stdout
        ob = run(site, "outbox")
        assert ob.returncode == 0 and "device.registered" in ob.stdout and "pending" in ob.stdout, ob.stdout

        backup = tmp_path / "backup.db"
        b = run(site, "backup", str(backup))
        assert b.returncode == 0 and "integrity ok" in b.stdout, b.stderr
        assert "pages" in b.stderr  # progress on the long operation
        assert devices_in(backup) == 3
        assert run(site, "backup", str(backup)).returncode != 0  # never overwrites

        signed_post(site, "/api/v1/devices/need-register", {
            "chip_id": "0B5E0901", "mac_address": "24:0A:C4:00:06:09", "firmware_version": "car_wash_v1"})
        refused = run(site, "restore", str(backup))
        assert refused.returncode != 0 and "stop the services first" in refused.stderr
    finally:
        web.stop()
        rc = core.stop()
    assert rc == 0
    restored = run(site, "restore", str(backup))
    assert restored.returncode == 0 and "integrity ok" in restored.stdout, restored.stderr
    assert devices_in(Path(site.config.paths.database)) == 3
    down = run(site, "status")
    assert down.returncode == 0 and "core: not answering" in down.stdout
    # A backup of an older install (4 KiB pages; new databases have 1 KiB) restores onto this one:
    # SQLite cannot change the page size of a database in WAL mode, so restore leaves WAL first.
    older = tmp_path / "older.db"
    src, dst = sqlite3.connect(backup), sqlite3.connect(older)
    try:
        dst.execute("PRAGMA page_size = 4096")
        dst.executescript("\n".join(src.iterdump()))
    finally:
        src.close()
        dst.close()
    live = Path(site.config.paths.database)
    assert page_size(live) == 1024 and page_size(older) == 4096
    restored = run(site, "restore", str(older))
    assert restored.returncode == 0 and "integrity ok" in restored.stdout, restored.stderr
    assert devices_in(live) == 3 and page_size(live) == 4096
    core = start_process(site, "core")  # WAL again, and the schema is current
    assert core.stop() == 0
    assert scalar(live, "PRAGMA journal_mode") == "wal"
