"""The operations commands against a running core and web: status, outbox, an online backup while
writes go on, and a restore that refuses while the core runs and works once it is stopped."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

from gateway.procs import child_env, gateway_command
from tests.conftest import Site, start_process
from tests.test_uplink_e2e import signed_post
from web.context import STATUS_CONNECTED


def run(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(gateway_command(*args, "--config", str(site.config_path)), env=child_env(),
                          capture_output=True, text=True, timeout=60)


def devices_in(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute('SELECT COUNT(*) FROM "device"').fetchone()[0])
    finally:
        conn.close()


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
