"""The real processes: core (notify protocol, signals), web under gunicorn, and the demo."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import urllib.request
from itertools import pairwise
from pathlib import Path

import pytest

from gateway.core.app import CoreApp
from gateway.core.sdnotify import Notifier
from sim.demo import WEB_CONNECTED
from sim.procs import NotifySocket, child_env, gateway_command, stop_process
from tests.clients import http_json
from tests.conftest import Proc, Site, start_demo, start_process
from tests.mqtt_probe import Probe
from web.context import STATUS_DISCONNECTED


def test_core_notify_ready_watchdog_stopping(site: Site) -> None:
    proc = start_process(site, "core", env={"WATCHDOG_USEC": "300000"})
    try:
        proc.notify.wait_for("WATCHDOG=1", 10, count=3)
        assert any(m.startswith("STATUS=") for _, m in proc.notify.messages)
        proc.popen.send_signal(signal.SIGTERM)
        proc.notify.wait_for("STOPPING=1", 5)
        assert proc.popen.wait(5) == 0
    finally:
        proc.stop()
    log = proc.log()
    assert "core ready in" in log and "core stopped" in log
    assert "Traceback" not in log


def test_core_raises_its_descriptor_limit_for_max_connections(site: Site) -> None:
    """systemd starts services with a soft RLIMIT_NOFILE of 1024: the core must raise it to what
    mqtt.max_connections (2,000 here) needs, within the hard limit."""
    import resource

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 8192))

    proc = start_process(site, "core", preexec_fn=low_soft_limit)
    try:
        soft, hard = resource.prlimit(proc.popen.pid, resource.RLIMIT_NOFILE)
        assert (soft, hard) == (site.config.mqtt.max_connections + 256, 8192)
    finally:
        assert proc.stop() == 0


def test_watchdog_ignored_when_meant_for_another_pid(site: Site) -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_interval is None
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "900000"})
    assert n.watchdog_interval == pytest.approx(0.3)


def test_core_sigint_and_mqtt_connection_with_mosquitto_clients(site: Site, core: Proc) -> None:
    # Debian's mosquitto_sub as a device: anonymous, subscribed to its command topic.
    with Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
               password=site.secrets.mqtt_internal_password) as gw:
        gw.connect()
        gw.publish("device/dev-1/command", b'{"command":"PING"}', retain=True)
        out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(site.mqtt_port),
                              "-t", "device/dev-1/command", "-C", "1", "-W", "10"],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"command": "PING"}
        # Anonymous publish to wash/x/cmd is refused by the ACL without a PUBACK (the connection is
        # closed: mosquitto_pub fails); server/{id}/ack passes.
        gw.subscribe("wash/#")
        gw.subscribe("server/#")
        for topic, ok in (("wash/x/cmd", False), ("server/dev-1/ack", True)):
            r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(site.mqtt_port), "-q", "1",
                                "-t", topic, "-m", "{}"], capture_output=True, text=True, timeout=20)
            assert (r.returncode == 0) == ok, (topic, r.returncode, r.stderr)
        assert gw.until("server/dev-1/ack") == []


def test_web_under_gunicorn_health_envelope_openapi(site: Site, web: Proc) -> None:
    web.notify.wait_for(WEB_CONNECTED, 20)
    status, health = http_json(site.web_url + "/api/health")
    assert status == 200
    assert health == {"status": "ok", "mqtt": True, "plc": {}, "cloud": False, "db": True}
    status, body = http_json(site.web_url + "/api/nothing-here")
    assert status == 404 and body["errorCode"] == "NOT_FOUND" and body["path"] == "/api/nothing-here"
    status, body = http_json(site.web_url + "/api/health", method="POST", data=b"{}",
                             headers={"Content-Type": "application/json"})
    assert status == 405 and body["errorCode"] == "METHOD_NOT_ALLOWED"
    status, body = http_json(site.web_url + "/api/health", method="POST", data=b"x" * 300_000)
    assert status in (405, 413) and body["success"] is False
    status, spec = http_json(site.web_url + "/api/openapi.json")
    assert status == 200 and "/api/health" in spec["paths"]


def test_web_reports_degraded_when_core_goes_away(site: Site) -> None:
    core = start_process(site, "core")
    web = start_process(site, "web")
    try:
        web.notify.wait_for(WEB_CONNECTED, 20)
        assert http_json(site.web_url + "/api/health")[1]["mqtt"] is True
        assert core.stop() == 0
        web.notify.wait_for("STATUS=" + STATUS_DISCONNECTED, 20)
        status, health = http_json(site.web_url + "/api/health")
        assert status == 200 and health["mqtt"] is False and health["status"] == "degraded"
        status, body = http_json(site.web_url + "/api/openapi.json")
        assert status == 200
    finally:
        web.stop()
        core.stop()


def test_second_core_on_same_port_fails_clearly(site: Site, core: Proc) -> None:
    r = subprocess.run(gateway_command("core", "--config", str(site.config_path)), env=child_env(),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "Address already in use" in r.stderr or "can't be started" in r.stderr


async def test_core_in_process_stops_on_signal_without_leaking_tasks(site: Site) -> None:
    app = CoreApp(site.config, site.secrets, Notifier({}))
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    await asyncio.wait_for(app.ready.wait(), 10)
    with Probe(site.mqtt_port, client_id="dev-probe") as device:
        assert not (await asyncio.to_thread(device.connect)).is_failure
        assert "dev-probe" in app.parts.bus.clients
    # Let the broker finish closing the connection (else amqtt's writer close is cancelled).
    await app.parts.bus.wait_clients(lambda ids: "dev-probe" not in ids, 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    # The test runner fails this test if any task of the core is still pending here.


def test_demo_command_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    proc, text = start_demo(data)
    try:
        web_url = re.search(r"^web: (http://127\.0\.0\.1:\d+/)$", text, re.M)
        mqtt_url = re.search(r"^mqtt: mqtt://127\.0\.0\.1:(\d+)$", text, re.M)
        assert web_url and mqtt_url, text + Path(f"{data}.log").read_text(errors="replace")[-3000:]
        assert re.search(r"^login: demo / demo$", text, re.M)
        cloud = re.search(r"^cloud: (http://127\.0\.0\.1:\d+/_sim/) ", text, re.M)
        assert cloud, text
        with urllib.request.urlopen(cloud.group(1), timeout=10) as r:
            assert r.status == 200 and b"<" in r.read()
        status, health = http_json(web_url.group(1) + "api/health")
        assert status == 200 and health["mqtt"] is True and health["db"] is True
        out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", mqtt_url.group(1), "-t", "device/x/command",
                              "-E"], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()
    assert (data / "gateway.db").exists()


def test_notifier_without_systemd_python_writes_the_datagram(tmp_path: Path) -> None:
    # An explicit environment makes the Notifier use its own socket code, not the library.
    with NotifySocket(tmp_path / "n.sock") as sock:
        n = Notifier({"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "600000"})
        assert n.ready("up") and n.watchdog() and n.stopping()
        sock.wait_for("STOPPING=1", 5)
        assert [m for _, m in sock.messages] == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"]
    assert Notifier({}).ready() is False  # outside systemd: a no-op


def test_watchdog_pings_stop_while_the_loop_is_blocked(site: Site) -> None:
    """A hung event loop stops WATCHDOG=1, so systemd (WatchdogSec=30) would restart the core."""
    import json as _json

    proc = start_process(site, "core", env={"WATCHDOG_USEC": "400000", "CARWASH_GATEWAY_TEST_HOOKS": "1"})
    try:
        proc.notify.wait_for("WATCHDOG=1", 10, count=3)
        with Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
                   password=site.secrets.mqtt_internal_password, client_id="watchdog-test") as p:
            p.connect()
            p.subscribe("gateway/reply/watchdog-test")
            p.publish("gateway/rpc/debug.block", _json.dumps({"id": "1", "reply_to": "gateway/reply/watchdog-test",
                                                              "params": {"seconds": 2.0}}))
            assert _json.loads(p.expect("gateway/reply/watchdog-test", 15).payload)["ok"] is True
        before = len([1 for _, m in proc.notify.messages if "WATCHDOG=1" in m.splitlines()])
        proc.notify.wait_for("WATCHDOG=1", 5, count=before + 2)  # pings resume after the block
        pings = [at for at, m in proc.notify.messages if "WATCHDOG=1" in m.splitlines()]
        gaps = [b - a for a, b in pairwise(pings)]
        assert max(gaps) >= 1.9, gaps  # no ping while the loop was blocked for 2 s
        assert sorted(gaps)[len(gaps) // 2] < 0.5  # otherwise every 0.2 s (half of WATCHDOG_USEC)
    finally:
        proc.stop()
    assert "test hooks enabled" in proc.log()


def test_no_test_hooks_without_the_variable(site: Site, core: Proc) -> None:
    with Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
               password=site.secrets.mqtt_internal_password, client_id="hook-test") as p:
        p.connect()
        p.subscribe("gateway/reply/hook-test")
        p.publish("gateway/rpc/debug.block", '{"id": "1", "reply_to": "gateway/reply/hook-test", "params": {}}')
        answer = p.expect("gateway/reply/hook-test", 10).payload
    assert b'"ok": false' in answer and b"NOT_FOUND" in answer
