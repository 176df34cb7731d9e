"""Power cuts through the real processes (bench/powercut.py at its smallest): the site on a
power-cut filesystem under load, cut a few times (at a random moment and inside a write, torn or
not), then every acknowledged fact checked once in the database and once at the cloud, and
`PRAGMA integrity_check` after every restart. Deterministic seed; no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import powercut
from bench.powerfs import fuse_available


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
def test_acknowledged_facts_survive_power_cuts(tmp_path: Path) -> None:
    out = powercut.power_cuts(powercut.TEST, powercut.SEED, tmp_path)
    detail = powercut.summary(out) + f"\n{out.check}\n{out.per_cut}"
    assert out.cuts == powercut.TEST.cuts, detail
    assert {p["kind"] for p in out.per_cut} >= {"moment", "write"}, detail  # both kinds of cut happened
    assert sum(p["dropped_writes"] for p in out.per_cut) > 0, detail  # the cuts really took unsynced writes
    for kind, n in out.acknowledged.items():
        assert n > 0, f"no {kind} acknowledged: the load did not run\n{detail}"
    assert out.lost == 0, detail
    assert out.duplicated == 0, detail
    assert out.integrity_failures == 0, detail
    assert out.integrity_checks == out.cuts + 1, detail


@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
@pytest.mark.parametrize("replace", [False, True])
def test_init_secrets_survives_a_power_cut(tmp_path: Path, replace: bool) -> None:
    """`carwash-gateway init-secrets` (the package's postinst runs it once) has written the file
    when it says so: a power cut right after leaves it whole, never missing or empty (the site's
    device signing key would be gone, and the postinst does not write it again)."""
    import subprocess
    import tomllib

    from bench.powerfs import PowerFs
    from sim.procs import gateway_command

    fs = PowerFs(tmp_path / "medium", tmp_path / "etc", tmp_path / "ctl.sock", tmp_path / "powerfs.log")
    fs.mount()
    try:
        path = tmp_path / "etc" / "secrets.toml"
        args = ["init-secrets", str(path)]
        if replace:  # --force over a durable file: the old one or the new one, never neither
            subprocess.run(gateway_command(*args), check=True, capture_output=True, timeout=60)
            fs.sync()
            args.append("--force")
        subprocess.run(gateway_command(*args), check=True, capture_output=True, timeout=60)
        written = path.read_bytes()
        fs.cut()
        fs.unmount()
        fs.mount()
        assert path.read_bytes() == written
        assert len(tomllib.loads(written.decode())["device_signing_key"]) == 32
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        fs.unmount()


@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
def test_first_firmware_image_survives_a_power_cut(tmp_path: Path) -> None:
    """The first upload creates the firmware folders: the image answered 201 is still served
    after a power cut (the folders' names are synced, not only the image's). The folders are not
    beside the database, whose directory SQLite fsyncs at a connection's first commit."""
    import os
    import urllib.request

    from bench import chaos
    from bench.powerfs import PowerFs
    from sim.demo import DEMO_USER, ensure_demo_user, free_port, write_demo_site

    fs = PowerFs(tmp_path / "medium", tmp_path / "mnt", tmp_path / "ctl.sock", tmp_path / "powerfs.log")
    web_port = free_port()
    cfg = write_demo_site(tmp_path / "medium" / "data", web_port=web_port, mqtt_port=free_port())
    cfg.write_text(cfg.read_text().replace('firmware_dir = "firmware"', 'firmware_dir = "../firmware/images"'))
    ensure_demo_user(cfg)
    base = f"http://127.0.0.1:{web_port}"
    image = os.urandom(50_000)
    fs.mount()
    gw = chaos.Gateway(tmp_path, tmp_path / "mnt" / "data" / "gateway.toml")
    try:
        gw.start("core")
        gw.start("web")
        status, doc = chaos._http(base, "POST", "/api/v1/auth/login",
                                  {"username": DEMO_USER[0], "password": DEMO_USER[1]})
        assert status == 200, doc
        req = urllib.request.Request(f"{base}/api/v1/firmware?version=1.2.3", data=image, method="POST", headers={
            "Content-Type": "application/octet-stream", "Authorization": f"Bearer {doc['data']['token']}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 201
            url = json.loads(r.read())["data"]["url"]
        fs.cut()
        gw.kill("web")
        gw.kill("core")
        fs.unmount()
        fs.mount()
        gw.start("core")
        gw.start("web")
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == image
    finally:
        gw.stop()
        fs.unmount()
