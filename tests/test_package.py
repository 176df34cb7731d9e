"""The Debian package, end to end (CI runs as root on a throwaway machine; elsewhere this skips):
`make deb`, `Depends` naming the release's default Python, lintian with no errors or warnings,
`systemd-analyze verify` silent on every installed unit and `systemd-analyze security --offline`
under `SECURITY_MAX`, `dpkg -i`, the installed core and web
started by hand as the `carwash` user with the installed config (no PID 1 systemd here),
`/api/health` and an MQTT client, then `dpkg --purge` leaves nothing but what policy allows."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sim.procs import NotifySocket, stop_process
from tests.clients import http_json
from tests.mqtt_probe import Probe

REPO = Path(__file__).resolve().parent.parent
SECURITY_MAX = 2.5  # systemd-analyze's exposure score (0 safest .. 10); documented in debian/README.md
UNITS = ("carwash-gateway-core.service", "carwash-gateway-web.service", "carwash-gateway.target")
TOOLS = ("dpkg-buildpackage", "dh_virtualenv", "lintian", "systemd-analyze", "runuser")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a package: root on a throwaway machine (CI)"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
    pytest.mark.skipif(os.environ.get("CARWASH_TEST_PACKAGE") == "0", reason="CARWASH_TEST_PACKAGE=0"),
    pytest.mark.timeout(600),
]


def sh(*cmd: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def installed() -> bool:
    return sh("dpkg-query", "-W", "-f=${Status}", "carwash-gateway").stdout.startswith("install ok installed")


def test_build_check_install_run_purge(tmp_path: Path) -> None:
    assert not installed(), "carwash-gateway is installed on this machine already: not a throwaway machine"
    built = sh("make", "deb", timeout=900)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    deb = sorted((REPO / "dist").glob("carwash-gateway_*.deb"))[-1]
    # Built with, and depending on, this release's default Python (3.11 on bookworm, 3.13 on trixie).
    default_py = sh("py3versions", "-dv").stdout.strip()
    depends = sh("dpkg-deb", "-f", str(deb), "Depends").stdout
    assert re.search(rf"(^|, )python{re.escape(default_py)}(,|$)", depends.strip()), (default_py, depends)

    lint = sh("lintian", "--no-tag-display-limit", str(deb))
    problems = [line for line in lint.stdout.splitlines() if line.startswith(("E:", "W:"))]
    assert not problems, "\n".join(problems)

    inst = sh("dpkg", "-i", str(deb))
    assert inst.returncode == 0, inst.stdout + inst.stderr
    procs = []
    cleanup: list[Path] = []
    try:
        secrets = Path("/etc/carwash-gateway/secrets.toml")
        st = secrets.stat()
        assert oct(st.st_mode & 0o777) == "0o640" and st.st_uid == 0
        assert "dialout" in sh("id", "-nG", "carwash").stdout.split()  # the serial ports
        for unit in UNITS:
            v = sh("systemd-analyze", "verify", f"/lib/systemd/system/{unit}")
            assert v.returncode == 0 and not v.stderr.strip(), (unit, v.stderr)
        for unit in UNITS[:2]:
            sec = sh("systemd-analyze", "security", "--offline=yes", f"/lib/systemd/system/{unit}")
            score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout).group(1))  # type: ignore[union-attr]
            assert score <= SECURITY_MAX, (unit, score)
        assert sh("/usr/bin/carwash-gateway", "check-config").returncode == 0
        # The SD-card sysctl is an example to copy, never active as installed.
        example = Path("/usr/share/doc/carwash-gateway/examples/60-carwash-gateway-sd-card.conf")
        assert "vm.dirty_expire_centisecs = 60000" in example.read_text()
        for active in ("/etc/sysctl.d", "/usr/lib/sysctl.d"):
            assert not list(Path(active).glob("*carwash*")), active

        # What systemd would do: StateDirectory, then both services as the carwash user.
        state = Path("/var/lib/carwash-gateway")
        state.mkdir(mode=0o750, exist_ok=True)
        shutil.chown(state, "carwash", "carwash")
        # The notify sockets where the carwash user can reach them (pytest's tmp dirs are 0700).
        sockets = Path(tempfile.mkdtemp(prefix="carwash-pkg-"))
        sockets.chmod(0o755)
        cleanup.append(sockets)
        for name in ("core", "web"):
            notify = NotifySocket(sockets / f"{name}.notify")
            os.chmod(notify.path, 0o777)
            log = (tmp_path / f"{name}.log").open("wb")
            p = subprocess.Popen([shutil.which("runuser") or "runuser", "-u", "carwash", "--",
                                  "/usr/bin/carwash-gateway", name],
                                 env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": notify.path}, stdout=log,
                                 stderr=subprocess.STDOUT, cwd="/")
            log.close()
            procs.append((p, notify))
            notify.wait_for("READY=1", 60)
        procs[1][1].wait_for("STATUS=serving; connected to the local broker", 30)
        code, health = http_json("http://127.0.0.1:8080/api/health")
        assert code == 200 and health["mqtt"] is True and health["db"] is True, health
        with Probe(1883) as device:
            assert not device.connect().is_failure
            device.subscribe("device/x/command")
    finally:
        for p, notify in reversed(procs):
            stop_process(p)
            notify.close()
        purge = sh("dpkg", "--purge", "carwash-gateway")
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)
    assert purge.returncode == 0, purge.stderr
    left = [p for p in ("/etc/carwash-gateway", "/var/lib/carwash-gateway", "/opt/venvs/carwash-gateway",
                        "/lib/systemd/system/carwash-gateway-core.service", "/usr/bin/carwash-gateway")
            if os.path.lexists(p)]
    assert not left, left  # the carwash user stays, as Debian policy wants
