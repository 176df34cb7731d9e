"""The configuration through the command line, as real processes: `check-config`, the core's
exit code 78 on a bad file, `init-secrets` (loading itself is tested in tests/unit/test_config.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from gateway.config import load_config, load_secrets
from sim.procs import child_env, gateway_command
from tests.unit.test_config import minimal, write


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(gateway_command(*args), env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=60)


def test_check_config_cli(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    good = minimal(tmp_path / "good")
    r = run_cli("check-config", "--config", str(good))
    assert r.returncode == 0 and "OK (site s1" in r.stdout
    bad = minimal(tmp_path / "bad", "[web]\nport = 0\n")
    r = run_cli("check-config", "--config", str(bad))
    assert r.returncode == 78
    assert r.stderr.strip().splitlines() == [f"configuration error: {bad}: web.port: must be at least 1, got 0"]
    # The environment variable names the file when --config is absent.
    r = run_cli("check-config", env={"CARWASH_GATEWAY_CONFIG": str(good)})
    assert r.returncode == 0, r.stderr
    r = run_cli("check-config", env={"CARWASH_GATEWAY_CONFIG": str(tmp_path / "missing.toml")})
    assert r.returncode == 78 and "missing.toml: file not found" in r.stderr


def test_check_config_warns_about_a_missing_serial_device_and_names_the_adapters(tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.wash.tools import serial_device_warnings

    cfg_path = minimal(tmp_path, '[[buses]]\nname = "rs485"\ntype = "rtu"\ndevice = "/dev/ttyUSB7"\n'
                                 '[[buses]]\nname = "lan"\ntype = "tcp"\nhost = "10.0.0.9"\n')
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    assert "no serial adapter is plugged in" in serial_device_warnings(load_config(cfg_path), str(by_id))[0]
    (by_id / "usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0").symlink_to("/dev/ttyUSB0")
    (warning,) = serial_device_warnings(load_config(cfg_path), str(by_id))
    assert warning.startswith(f"{cfg_path}: buses[0].device: /dev/ttyUSB7 does not exist (yet?)")
    assert f"{by_id}/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0" in warning
    # A warning, not an error: the adapter may be plugged in later.
    r = run_cli("check-config", "--config", str(cfg_path))
    assert r.returncode == 0 and "warning: " in r.stderr and "buses[0].device" in r.stderr, r.stderr


def test_core_refuses_bad_config_with_exit_78(tmp_path: Path) -> None:
    bad = minimal(tmp_path, "[mqtt]\nport = -1\n")
    r = run_cli("core", "--config", str(bad))
    assert r.returncode == 78
    assert "mqtt.port: must be at least 1" in r.stderr


def test_init_secrets_mode_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "secrets.toml"
    r = run_cli("init-secrets", str(path))
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"
    first = path.read_text()
    r = run_cli("init-secrets", str(path))
    assert r.returncode == 1 and path.read_text() == first
    cfg_path = write(tmp_path, f'[site]\nid = "s"\n[paths]\nsecrets_file = "{path}"\n')
    sec = load_secrets(load_config(cfg_path))
    assert len(sec.jwt_secret) >= 32 and len(sec.mqtt_internal_password) >= 16
