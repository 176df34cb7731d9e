"""Fieldbus truth end to end (#16): the real core against PLC simulators in their own processes.

Four bays sit behind one unit id at bases 0/100/200/300 on an RS485 line (socat pty pair), two
behind one unit id on Modbus TCP. A wash runs on one bay of each bus while the PLC processes are
paused (SIGSTOP/SIGCONT; the project's simulator) or answer late (the independent umodbus PLC)
five times for longer than the gateway's timeout: the issue saw one wash become four session
records, and idle bays open ghost sessions. Here every wash is one session, with its requestId and
its outcome, and no other bay ever leaves IDLE.

Then the reset of a latched error, decided by the core, from REST (technician token), from MQTT
(Debian's mosquitto_pub as the wash backend) and from the CLI, each recorded with who asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sim.demo import ensure_demo_user, free_port
from sim.plc import PlcSimulator
from sim.procs import gateway_command
from sim.pty import SocatPair
from tests.clients import http_json
from tests.conftest import make_site, start_process
from tests.mqtt_probe import Probe
from tests.plcs import TestPlc, make_plc
from tests.scripted_plc import ScriptedTcpPlc
from tests.test_technician_page import CHROMEDRIVER, CHROMIUM, browser  # noqa: F401 - the fixture

RTU_BAYS = {"bay1": 0, "bay2": 100, "bay3": 200, "bay4": 300}
TCP_BAYS = {"bay5": 0, "bay6": 100}
PAUSE_SEC = 0.35  # longer than both buses' timeouts (110 ms RTU at 115200 baud, 250 ms TCP)


def site_toml(rtu_path: str, tcp_port: int) -> str:
    out = ("[wash]\nstart_timeout_sec = 5.0\noffline_after = 3\npoll_period_ms = 100\n"
           "offline_backoff_max_sec = 1.0\n"
           f'[[buses]]\nname = "rs485"\ntype = "rtu"\ndevice = "{rtu_path}"\nbaudrate = 115200\n'
           f'[[buses]]\nname = "lan"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {tcp_port}\n')
    for bay, base in RTU_BAYS.items():
        out += f'[[bays]]\nid = "{bay}"\nbus = "rs485"\nunit = 1\nbase = {base}\n'
    for bay, base in TCP_BAYS.items():
        out += f'[[bays]]\nid = "{bay}"\nbus = "lan"\nunit = 1\nbase = {base}\n'
    return out


def statuses(probe: Probe, until: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every wash/+/status received until `until(all so far)` holds."""
    import time

    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        try:
            m = probe.expect(None, max(0.01, deadline - time.monotonic()))  # only wash/+/status is subscribed
        except TimeoutError:
            raise TimeoutError(f"statuses so far: {seen[-20:]}") from None
        seen.append(json.loads(m.payload))
    return seen


def sessions(db: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute('SELECT "bay_id", "state", "error_code", "request_id", "course" FROM "wash_session" '
                         'ORDER BY "id"').fetchall()


@pytest.fixture(params=[("project", "pause"), ("independent", "late")], ids=lambda p: f"{p[0]}-{p[1]}")
def faulty_site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Any, TestPlc, TestPlc, str]]:
    """The core, and both buses' PLCs as processes of the given kind; the fault to inject."""
    kind, fault = request.param
    pair = SocatPair(tmp_path / "pty")
    pair.start()
    tcp_port = free_port()
    rtu = make_plc(kind, tmp_path / "rtu", bays=[(b, 1, base) for b, base in RTU_BAYS.items()], rtu=pair.plc_path,
                   wash_time=15, process=True, name="rtu")
    tcp = make_plc(kind, tmp_path / "tcp", bays=[(b, 1, base) for b, base in TCP_BAYS.items()],
                   tcp=("127.0.0.1", tcp_port), wash_time=15, process=True, name="tcp")
    rtu.start_blocking()  # type: ignore[attr-defined]
    tcp.start_blocking()  # type: ignore[attr-defined]
    site = make_site(tmp_path / "site", site_toml(pair.gateway_path, tcp_port))
    core = start_process(site, "core")
    try:
        yield site, rtu, tcp, fault
    finally:
        rc = core.stop()
        rtu.stop_blocking()  # type: ignore[attr-defined]
        tcp.stop_blocking()  # type: ignore[attr-defined]
        pair.stop()
        assert rc == 0, core.log()[-3000:]


def test_late_or_paused_plcs_never_split_a_wash_nor_open_ghost_sessions(faulty_site: Any) -> None:
    site, rtu, tcp, fault = faulty_site
    cfg = site.config
    with Probe(site.mqtt_port, username=cfg.mqtt.internal_username,
               password=site.secrets.mqtt_internal_password) as p:
        p.connect()
        p.subscribe("wash/+/status")
        everyone = set(RTU_BAYS) | set(TCP_BAYS)
        seen = statuses(p, lambda s: everyone <= {x["bayId"] for x in s if x["state"] == "IDLE"})
        for bay, rid in (("bay2", "paid-rtu"), ("bay6", "paid-tcp")):
            p.publish(f"wash/{bay}/cmd", json.dumps({"bayId": bay, "action": "START", "course": "STANDARD",
                                                     "requestId": rid, "timestampUtc": "2026-12-06T08:00:00.000Z"}))
        seen += statuses(p, lambda s: {"bay2", "bay6"} <= {x["bayId"] for x in s if x["state"] == "WASHING"})
        for _ in range(5):
            # The fault, longer than both buses' timeouts: the PLC processes stop dead, or every
            # reply comes late (in order, as a PLC whose scan overran).
            for plc in (rtu, tcp):
                plc.pause() if fault == "pause" else plc.late(PAUSE_SEC)
            threading.Event().wait(PAUSE_SEC)  # the fault's length, not a synchronisation
            for plc in (rtu, tcp):
                plc.resume() if fault == "pause" else plc.late(0)
            # The wash goes on: the next progress of bay2 (published at most once a second).
            seen += statuses(p, lambda s: any(x["bayId"] == "bay2" and x["state"] == "WASHING" for x in s))
        seen += statuses(p, lambda s: all(any(x["bayId"] == b and x["state"] == "IDLE" for x in s)
                                          for b in ("bay2", "bay6")), timeout=90)
    others = {x["state"] for x in seen if x["bayId"] not in ("bay2", "bay6")}
    assert others <= {"IDLE", "OFFLINE"}, [x for x in seen if x["bayId"] not in ("bay2", "bay6")]
    assert sessions(Path(site.dir) / "gateway.db") == [
        ("bay2", "DONE", None, "paid-rtu", "STANDARD"), ("bay6", "DONE", None, "paid-tcp", "STANDARD")]
    for bay in ("bay2", "bay6"):
        done = [x for x in seen if x["bayId"] == bay and x["state"] == "DONE"]
        assert done and done[0]["progress"] == 100 and done[0]["course"] == "STANDARD"
        washing = [x["progress"] for x in seen if x["bayId"] == bay and x["state"] == "WASHING"]
        assert washing == sorted(washing)  # no other bay's progress credited to this one


# --- reset of a latched error -----------------------------------------------------------------

def resets(db: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as c:
        return c.execute('SELECT "bay_id", "requested_by", "error_code", "outcome" FROM "bay_reset" ORDER BY "id"'
                         ).fetchall()


def wait_state(p: Probe, bay: str, state: str, code: str | None = "any") -> dict[str, Any]:
    seen = statuses(p, lambda s: any(x["bayId"] == bay and x["state"] == state
                                     and (code == "any" or x["errorCode"] == code) for x in s), timeout=30)
    return seen[-1]


def publish_as_account(port: int, topic: str, payload: str, timeout: float = 30.0) -> None:
    """mosquitto_pub as the `backend` account; the core learns a new account within a second
    (it reloads the table), so a refused login (exit 5) is tried again until then."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-u", "backend", "-P",
                            "backend-secret-1", "-i", "backend-1", "-q", "1", "-t", topic, "-m", payload],
                           capture_output=True, text=True, timeout=20)
        if r.returncode == 0:
            return
        assert r.returncode == 5 and time.monotonic() < deadline, (r.returncode, r.stderr)
        threading.Event().wait(0.2)  # the account table is reloaded once a second: nothing to wait on


def wait_reset(url: str, auth: dict[str, str], n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The resets listed once there are `n` (a reset's outcome is stored, not published)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        code, listed = http_json(url + "/api/wash/resets", headers=auth)
        if code == 200 and len(listed) >= n:
            return listed
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} resets expected, listed: {listed}")
        threading.Event().wait(0.1)  # no event carries a reset's outcome: poll the API


def reset_in_the_browser(driver: Any, url: str, sim: PlcSimulator) -> None:
    """The bay tile's Reset button, in headless Chromium: shown only while the bay is in ERROR,
    asks for confirmation, and the bay goes back to IDLE."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 30)
    driver.get(url + "/login")
    driver.find_element(By.ID, "username").send_keys("demo")
    driver.find_element(By.ID, "password").send_keys("demo")
    driver.find_element(By.ID, "login-button").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".tile")))
    tile = driver.find_element(By.CSS_SELECTOR, '.tile[data-bay="bay2"]')
    wait.until(lambda _: tile.find_element(By.CSS_SELECTOR, ".bay-error").text == "EMERGENCY_STOP")
    button = tile.find_element(By.CSS_SELECTOR, ".bay-reset")
    assert button.is_displayed() and button.text  # Thai label by default
    other = driver.find_element(By.CSS_SELECTOR, '.tile[data-bay="bay1"] .bay-reset')
    assert not other.is_displayed()
    sim.set_error("bay2", 0)  # the emergency stop released: the PLC still latches ERROR
    button.click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(lambda _: tile.find_element(By.CSS_SELECTOR, ".bay-state").text == "IDLE")
    assert not tile.find_element(By.CSS_SELECTOR, ".bay-reset").is_displayed()


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver")
async def test_reset_from_rest_mqtt_and_cli_is_decided_by_the_core_and_recorded(
        tmp_path: Path, browser: Any) -> None:  # noqa: F811 - the fixture imported above
    """And the bus scan: unit ids × the configured bases on RTU; on TCP a PLC that answers every
    unit id (the scripted one, as many real ones) is named as such, not listed under every id."""
    pair = SocatPair(tmp_path / "pty")
    await asyncio.to_thread(pair.start)
    sim = PlcSimulator.rtu(pair.plc_path, bays=[(b, 1, base) for b, base in RTU_BAYS.items()], wash_time=1.0)
    await sim.start()
    tcp_plc = ScriptedTcpPlc()
    await tcp_plc.start()
    site = make_site(tmp_path / "site", site_toml(pair.gateway_path, tcp_plc.port))
    await asyncio.to_thread(ensure_demo_user, site.config_path)
    core = await asyncio.to_thread(start_process, site, "core")
    web = await asyncio.to_thread(start_process, site, "web")
    cfg, sec = site.config, site.secrets
    db = Path(site.dir) / "gateway.db"
    try:
        code, body = await asyncio.to_thread(http_json, site.web_url + "/api/v1/auth/login", method="POST",
                                             body={"username": "demo", "password": "demo"})
        auth = {"Authorization": "Bearer " + body["data"]["token"]}
        with Probe(site.mqtt_port, username=cfg.mqtt.internal_username, password=sec.mqtt_internal_password) as p:
            await asyncio.to_thread(p.connect)
            await asyncio.to_thread(p.subscribe, "wash/+/status")
            await asyncio.to_thread(wait_state, p, "bay3", "IDLE")
            # Not in ERROR: nothing to reset (409), decided by the core.
            code, body = await asyncio.to_thread(http_json, site.web_url + "/api/wash/reset", method="POST",
                                                 body={"bayId": "bay3"}, headers=auth)
            assert (code, body["errorCode"]) == (409, "CONFLICT")
            # REST: the technician's token is required, whatever wash_api_auth says.
            sim.set_error("bay3", 4)
            await asyncio.to_thread(wait_state, p, "bay3", "ERROR", "DOOR_OPEN")
            code, body = await asyncio.to_thread(http_json, site.web_url + "/api/wash/reset", method="POST",
                                                 body={"bayId": "bay3"})
            assert (code, body["errorCode"]) == (401, "UNAUTHORIZED")
            # The door is still open: the PLC takes the reset and stays in ERROR.
            code, body = await asyncio.to_thread(http_json, site.web_url + "/api/wash/reset", method="POST",
                                                 body={"bayId": "bay3"}, headers=auth)
            assert code == 200 and body["success"] is True and body["requestId"]
            await asyncio.to_thread(wait_reset, site.web_url, auth, 1)
            # Closed: the PLC latches ERROR (code kept on the status) until the next reset clears it.
            sim.set_error("bay3", 0)
            code, body = await asyncio.to_thread(http_json, site.web_url + "/api/wash/reset", method="POST",
                                                 body={"bayId": "bay3"}, headers=auth)
            assert code == 200
            await asyncio.to_thread(wait_state, p, "bay3", "IDLE")
            # MQTT, from Debian's mosquitto_pub as the wash backend (a `wash-backend` account, added
            # while the core runs); answered on cmd/result, recorded with the account's name.
            sim.set_error("bay4", 5)
            await asyncio.to_thread(wait_state, p, "bay4", "ERROR", "MOTOR_FAULT")
            sim.set_error("bay4", 0)
            await asyncio.to_thread(p.subscribe, "wash/bay4/cmd/result")
            cmd = json.dumps({"bayId": "bay4", "action": "RESET", "timestampUtc": "2026-12-06T08:00:00.000Z"})
            added = await asyncio.to_thread(subprocess.run, gateway_command(
                "mqtt-user", "add", "backend", "--role", "wash-backend", "--password-stdin", "--config",
                str(site.config_path)), input="backend-secret-1\n", capture_output=True, text=True, timeout=60)
            assert added.returncode == 0, added.stderr
            await asyncio.to_thread(publish_as_account, site.mqtt_port, "wash/bay4/cmd", cmd)
            res = json.loads((await asyncio.to_thread(p.expect, "wash/bay4/cmd/result", 20)).payload)
            assert (res["action"], res["accepted"]) == ("RESET", True)
            await asyncio.to_thread(wait_state, p, "bay4", "IDLE")
            # The CLI, through the running core.
            sim.set_error("bay1", 2)
            await asyncio.to_thread(wait_state, p, "bay1", "ERROR", "WATER_PRESSURE_LOW")
            sim.set_error("bay1", 0)
            out = await asyncio.to_thread(subprocess.run, gateway_command("reset-bay", "bay1", "--config",
                                                                          str(site.config_path)),
                                          capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "bay1: reset sent" in out.stdout and "lost the local broker" not in out.stderr
            await asyncio.to_thread(wait_state, p, "bay1", "IDLE")
            # The technician page, in a real browser.
            sim.set_error("bay2", 1)
            await asyncio.to_thread(wait_state, p, "bay2", "ERROR", "EMERGENCY_STOP")
            await asyncio.to_thread(reset_in_the_browser, browser, site.web_url, sim)
        scan = await asyncio.to_thread(subprocess.run, gateway_command("scan-bus", "rs485", "--first", "1", "--last",
                                                                       "2", "--config", str(site.config_path)),
                                       capture_output=True, text=True, timeout=120)
        assert scan.returncode == 0 and "lost the local broker" not in scan.stderr, scan.stderr
        answered = [line.split(":")[0] for line in scan.stdout.splitlines()
                    if line.startswith("unit") and "answers" in line]
        assert answered == [f"unit   1 base {b:5d}" for b in RTU_BAYS.values()], scan.stdout
        scan = await asyncio.to_thread(subprocess.run, gateway_command("scan-bus", "lan", "--first", "1", "--last",
                                                                       "8", "--config", str(site.config_path)),
                                       capture_output=True, text=True, timeout=120)
        assert scan.returncode == 0, scan.stderr
        assert "ignores the unit id" in scan.stdout
        answered = [line.split(":")[0] for line in scan.stdout.splitlines()
                    if line.startswith("unit") and "answers" in line]
        assert answered == ["unit   1 base     0", "unit   1 base   100"], scan.stdout
        code, listed = await asyncio.to_thread(http_json, site.web_url + "/api/wash/resets", headers=auth)
        assert code == 200
        assert [(r["bayId"], r["by"], r["errorCode"], r["outcome"]) for r in listed] == [
            ("bay2", "technician:demo", "EMERGENCY_STOP", "CLEARED"),
            ("bay1", f"cli:{getpass.getuser()}", "WATER_PRESSURE_LOW", "CLEARED"),
            ("bay4", "mqtt:backend/backend-1", "MOTOR_FAULT", "CLEARED"),
            ("bay3", "technician:demo", "DOOR_OPEN", "CLEARED"),
            ("bay3", "technician:demo", "DOOR_OPEN", "STILL_IN_ERROR")]
        assert resets(db)[0] == ("bay3", "technician:demo", "DOOR_OPEN", "STILL_IN_ERROR")
        with contextlib.closing(sqlite3.connect(db)) as c:
            (n,) = c.execute("""SELECT count(*) FROM "outbox_event" WHERE "type" = 'wash.reset'""").fetchone()
        assert n == 5
        code, _ = await asyncio.to_thread(http_json, site.web_url + "/api/wash/resets")
        assert code == 401
    finally:
        await asyncio.to_thread(web.stop)
        rc = await asyncio.to_thread(core.stop)
        await sim.stop()
        await tcp_plc.stop()
        await asyncio.to_thread(pair.stop)
    assert rc == 0
