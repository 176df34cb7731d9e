"""Wash bays end to end: REST or MQTT command → core → Modbus (PLC simulator on a socat pty pair
and on TCP) → status on MQTT (retained), Socket.IO (npm socket.io-client) and SSE → history/stats.

Every test runs against both PLC simulators (tests/plcs.py): "project" (sim/plc.py, pymodbus,
in the test's event loop) and "independent" (sim/plc_umodbus.py, umodbus, its own process, written
from the register map). Faults are injected through the same controls on both; the core and the
web are the real processes. Blocking clients run through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sim.demo import WEB_CONNECTED, free_port
from sim.pty import SocatPair
from tests.clients import SocketIoClient, SseReader, http_json
from tests.conftest import Proc, Site, make_site, start_process
from tests.mqtt_probe import Probe
from tests.plcs import KINDS, TestPlc, make_plc

WASH_TIME = 1.2
RTU_BAYS = ("bay1", "bay2", "bay3")
TCP_BAYS = ("bay4",)


@dataclass
class WashSite:
    site: Site
    pty: SocatPair
    rtu: TestPlc
    tcp: TestPlc
    core: Proc | None = None
    web: Proc | None = None

    @property
    def url(self) -> str:
        return self.site.web_url

    def probe(self) -> Probe:
        cfg = self.site.config
        return Probe(self.site.mqtt_port, username=cfg.mqtt.internal_username,
                     password=self.site.secrets.mqtt_internal_password)

    async def start_core(self) -> None:
        self.core = await asyncio.to_thread(start_process, self.site, "core")

    async def stop_core(self) -> int:
        assert self.core is not None
        core, self.core = self.core, None
        rc = await asyncio.to_thread(core.stop)
        assert rc == 0, f"core exited with {rc}:\n{core.log()[-4000:]}"
        return rc

    def sim_for(self, bay: str) -> TestPlc:
        return self.tcp if bay in TCP_BAYS else self.rtu


def rtu_addresses(shared_unit: bool) -> list[tuple[str, int, int]]:
    """The RS485 bays' (bay, unit, base): one unit each, or all behind unit 1 at bases 0/100/200."""
    return [(b, 1, 100 * i) if shared_unit else (b, i + 1, 0) for i, b in enumerate(RTU_BAYS)]


def wash_toml(rtu_path: str, tcp_port: int, status_save_sec: float = 30.0, shared_unit: bool = False) -> str:
    bays = "".join(f'[[bays]]\nid = "{b}"\nname = "Bay {b[-1]}"\nbus = "rs485"\nunit = {u}\nbase = {base}\n'
                   for b, u, base in rtu_addresses(shared_unit))
    bays += f'[[bays]]\nid = "{TCP_BAYS[0]}"\nbus = "lan"\nunit = 1\n'
    return (
        "[wash]\nstart_timeout_sec = 3.0\noffline_after = 3\npoll_period_ms = 100\noffline_backoff_max_sec = 1.0\n"
        f"status_save_sec = {status_save_sec}\n"
        f'[[buses]]\nname = "rs485"\ntype = "rtu"\ndevice = "{rtu_path}"\nbaudrate = 115200\ntimeout_ms = 100\n'
        f'[[buses]]\nname = "lan"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {tcp_port}\ntimeout_ms = 200\n'
        + bays
    )


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Which PLC simulator the site's PLCs are: "project" or "independent"."""
    return str(request.param)


@contextlib.asynccontextmanager
async def wash_site(tmp: Path, kind: str, *, with_web: bool = True, status_save_sec: float = 30.0,
                    shared_unit: bool = False, process: bool = False) -> AsyncIterator[WashSite]:
    """A site with its PLCs of `kind`; `shared_unit`: the RS485 bays behind one unit id;
    `process`: the project's PLCs in processes of their own too (so they can be paused)."""
    pty = SocatPair(tmp / "pty")
    await asyncio.to_thread(pty.start)
    tcp_port = free_port()
    rtu = make_plc(kind, tmp / "plc", name="rtu", rtu=pty.plc_path, bays=rtu_addresses(shared_unit),
                   wash_time=WASH_TIME, process=process)
    tcp = make_plc(kind, tmp / "plc", name="tcp", tcp=("127.0.0.1", tcp_port), bays=[(TCP_BAYS[0], 1, 0)],
                   wash_time=WASH_TIME, process=process)
    ws = WashSite(make_site(tmp / "site", wash_toml(pty.gateway_path, tcp_port, status_save_sec, shared_unit)),
                  pty, rtu, tcp)
    try:
        await rtu.start()
        await tcp.start()
        await ws.start_core()
        if with_web:
            ws.web = await asyncio.to_thread(start_process, ws.site, "web")
            await asyncio.to_thread(ws.web.notify.wait_for, WEB_CONNECTED, 20)
        yield ws
    finally:
        if ws.web is not None:
            await asyncio.to_thread(ws.web.stop)
        if ws.core is not None:
            await asyncio.to_thread(ws.core.stop)
        await rtu.stop()
        await tcp.stop()
        await asyncio.to_thread(pty.stop)


@contextlib.asynccontextmanager
async def watching(ws: WashSite, topic: str, idle: tuple[str, ...] = ()) -> AsyncIterator[Probe]:
    """A connected internal client subscribed to `topic`, once the bays in `idle` show IDLE."""
    with ws.probe() as p:
        await asyncio.to_thread(p.connect)
        await asyncio.to_thread(p.subscribe, topic)
        for bay in idle:
            await asyncio.to_thread(status_of, p, bay, lambda s: s["state"] == "IDLE")
        yield p


def status_of(probe: Probe, bay: str, pred: Any, timeout: float = 15) -> list[dict[str, Any]]:
    """Statuses of `bay` received until one satisfies `pred` (inclusive)."""
    seen: list[dict[str, Any]] = []
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            m = probe.expect(f"wash/{bay}/status", max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise TimeoutError(f"{bay}: no matching status within {timeout} s; saw {seen}") from None
        s = json.loads(m.payload)
        seen.append(s)
        if pred(s):
            return seen


async def test_full_wash_rest_to_plc_and_back_to_every_listener(tmp_path: Path, kind: str) -> None:
    async with wash_site(tmp_path, kind) as ws:
        sio = SocketIoClient(ws.url)
        sse = await asyncio.to_thread(SseReader, ws.url + "/api/wash/events")
        try:
            await asyncio.to_thread(sio.wait_connected)
            with ws.probe() as probe:
                await asyncio.to_thread(probe.connect)
                await asyncio.to_thread(probe.subscribe, "wash/bay1/status")
                first = await asyncio.to_thread(status_of, probe, "bay1", lambda s: s["state"] == "IDLE")
                assert first[-1]["bayId"] == "bay1"
                code, body = await asyncio.to_thread(http_json, ws.url + "/api/wash/start", method="POST",
                                                     body={"bayId": "bay1", "course": "BASIC", "requestId": "uuid-1"})
                assert (code, body) == (200, {"success": True, "bayId": "bay1", "course": "BASIC",
                                              "requestId": "uuid-1"})
                # An idempotent retry, and a conflicting start.
                code, body = await asyncio.to_thread(http_json, ws.url + "/api/wash/start", method="POST",
                                                     body={"bayId": "bay1", "course": "BASIC", "requestId": "uuid-1"})
                assert code == 200 and body["idempotent"] is True
                code, body = await asyncio.to_thread(http_json, ws.url + "/api/wash/start", method="POST",
                                                     body={"bayId": "bay1", "course": "BASIC", "requestId": "uuid-2"})
                assert (code, body["errorCode"]) == (409, "BAY_BUSY")
                seen = await asyncio.to_thread(status_of, probe, "bay1", lambda s: s["state"] == "IDLE")
            states = [s["state"] for s in seen]
            assert states[0] == "STARTING" and "WASHING" in states and "DONE" in states and states[-1] == "IDLE"
            washing = [s["progress"] for s in seen if s["state"] == "WASHING"]
            assert washing == sorted(washing) and any(0 < p < 100 for p in washing)
            done = next(s for s in seen if s["state"] == "DONE")
            assert done["progress"] == 100 and done["requestId"] == "uuid-1" and done["course"] == "BASIC"
            assert done["sessionId"].endswith("-bay1-001")
            # The same changes reached Socket.IO and SSE.
            sio_seen = await asyncio.to_thread(sio.wait_for,
                                               lambda s: s.get("bayId") == "bay1" and s["state"] == "DONE")
            assert {"STARTING", "DONE"} <= {s["state"] for s in sio_seen if s.get("bayId") == "bay1"}
            sse_seen = await asyncio.to_thread(sse.wait_for,
                                               lambda s: s.get("bayId") == "bay1" and s["state"] == "DONE")
            assert all(ev == "wash:status" for ev, _, _ in sse_seen)
            # History and stats.
            code, hist = await asyncio.to_thread(http_json, ws.url + "/api/wash/history?limit=5")
            assert code == 200 and len(hist) == 1
            h = hist[0]
            assert (h["bayId"], h["state"], h["requestId"], h["course"], h["sessionId"]) == (
                "bay1", "DONE", "uuid-1", "BASIC", done["sessionId"])
            code, stats = await asyncio.to_thread(http_json, ws.url + "/api/wash/stats")
            assert stats["summary"] == {"total": 1, "completed": 1, "canceled": 0, "error": 0}
            assert stats["perBayAvg"][0]["bayId"] == "bay1"
            # The retained status is there for a late subscriber.
            with ws.probe() as late:
                await asyncio.to_thread(late.connect)
                await asyncio.to_thread(late.subscribe, "wash/bay1/status")
                m = await asyncio.to_thread(late.expect, "wash/bay1/status")
                assert m.retain and json.loads(m.payload)["state"] == "IDLE"
        finally:
            await asyncio.to_thread(sse.close)
            await asyncio.to_thread(sio.close)


async def test_mqtt_command_stop_and_rejections(tmp_path: Path, kind: str) -> None:
    async with wash_site(tmp_path, kind, with_web=False) as ws:
        async with watching(ws, "wash/bay4/#", ("bay4",)) as p:
            cmd = {"bayId": "bay4", "action": "START", "course": "PREMIUM", "requestId": "m-1",
                   "timestampUtc": "2026-01-14T08:00:00.000Z"}
            await asyncio.to_thread(p.publish, "wash/bay4/cmd", json.dumps(cmd))
            res = json.loads((await asyncio.to_thread(p.expect, "wash/bay4/cmd/result")).payload)
            assert res["accepted"] is True and res["requestId"] == "m-1"
            await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "WASHING")
            await asyncio.to_thread(p.publish, "wash/bay4/cmd", json.dumps({"bayId": "bay4", "action": "STOP"}))
            res = json.loads((await asyncio.to_thread(p.expect, "wash/bay4/cmd/result")).payload)
            assert res["accepted"] is True and res["requestId"] not in (None, "m-1")
            seen = await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "CANCELED")
            assert seen[-1]["requestId"] == "m-1"
            for bad, code in ((b"not json", "VALIDATION_FAILED"),
                              (json.dumps({"bayId": "bay1", "action": "START", "course": "BASIC"}).encode(),
                               "VALIDATION_FAILED"),
                              (json.dumps({"bayId": "bay4", "action": "DANCE"}).encode(), "VALIDATION_FAILED")):
                await asyncio.to_thread(p.publish, "wash/bay4/cmd", bad)
                res = json.loads((await asyncio.to_thread(p.expect, "wash/bay4/cmd/result")).payload)
                assert (res["accepted"], res["errorCode"]) == (False, code)
            await asyncio.to_thread(p.subscribe, "wash/nobay/cmd/result")
            await asyncio.to_thread(p.publish, "wash/nobay/cmd", json.dumps({"action": "START", "course": "BASIC"}))
            res = json.loads((await asyncio.to_thread(p.expect, "wash/nobay/cmd/result")).payload)
            assert (res["accepted"], res["statusCode"], res["errorCode"]) == (False, 404, "BAY_NOT_FOUND")


async def test_faults_error_code_start_timeout_bad_registers(tmp_path: Path, kind: str) -> None:
    async with wash_site(tmp_path, kind, with_web=False) as ws:
        async with watching(ws, "wash/bay2/status", ("bay2",)) as p:
            # A PLC error code: ERROR with its name; cleared: IDLE.
            ws.rtu.set_error("bay2", 4)
            s = (await asyncio.to_thread(status_of, p, "bay2", lambda s: s["state"] == "ERROR"))[-1]
            assert s["errorCode"] == "DOOR_OPEN"
            ws.rtu.set_error("bay2", 77)
            s = (await asyncio.to_thread(status_of, p, "bay2", lambda s: s["errorCode"] == "PLC_ERROR_77"))[-1]
            assert s["state"] == "ERROR"
            # The fault is gone, but the PLC latched it: ERROR until the gateway's RESET (the core
            # writes RESET_ERROR; the panel's own button, `local_reset`, would do as well).
            ws.rtu.set_error("bay2", 0)
            assert ws.rtu.status("bay2")["state"] == "ERROR"
            await asyncio.to_thread(p.publish, "wash/bay2/cmd", json.dumps({"bayId": "bay2", "action": "RESET"}))
            seen = await asyncio.to_thread(status_of, p, "bay2",
                                           lambda s: s["state"] == "IDLE" and s["errorCode"] is None)
            assert all(s["state"] in ("ERROR", "IDLE") for s in seen), seen
            # Out-of-range registers: the bay keeps its last valid state (they count as failed polls).
            ws.rtu.set_raw("bay2", 10, 9)  # state 9
            ws.rtu.set_raw("bay2", 11, 250)  # progress 250
            seen = await asyncio.to_thread(status_of, p, "bay2", lambda s: s["state"] == "OFFLINE")
            assert all(s["state"] in ("IDLE", "OFFLINE") for s in seen)
            ws.rtu.set_raw("bay2", 10, -1)
            ws.rtu.set_raw("bay2", 11, -1)
            await asyncio.to_thread(status_of, p, "bay2", lambda s: s["state"] == "IDLE")
            # A START the PLC never takes: ERROR / START_TIMEOUT, the session closed as such.
            ws.rtu.ignore_commands("bay2", True)
            cmd = {"bayId": "bay2", "action": "START", "course": "BASIC", "requestId": "t-1"}
            await asyncio.to_thread(p.publish, "wash/bay2/cmd", json.dumps(cmd))
            seen = await asyncio.to_thread(status_of, p, "bay2", lambda s: s["errorCode"] == "START_TIMEOUT")
            assert seen[0]["state"] == "STARTING" and seen[-1]["state"] == "ERROR"
            await asyncio.to_thread(status_of, p, "bay2", lambda s: s["state"] == "IDLE")
        ws.rtu.ignore_commands("bay2", False)
    sessions = await asyncio.to_thread(_sessions, ws.site)
    assert [(s["state"], s["error_code"], s["request_id"]) for s in sessions] == [("ERROR", "START_TIMEOUT", "t-1")]


def _sessions(site: Site) -> list[dict[str, Any]]:
    from gateway.store import open_database
    from gateway.store.models import WashSession

    db = open_database(site.config.paths.database)
    try:
        return list(WashSession.select().order_by(WashSession.id).dicts())
    finally:
        db.close()


def _stored(site: Site, bay: str) -> tuple[str, list[str]]:
    """The bay row's state and the bay's wash.status outbox events (oldest first)."""
    from gateway.store import open_database
    from gateway.store.models import Bay, OutboxEvent
    from gateway.store.outbox import stored_events

    db = open_database(site.config.paths.database)
    try:
        events = [body["payload"]["state"] for _, body in stored_events(
            OutboxEvent.type == "wash.status", OutboxEvent.partition == f"bay:{bay}")]
        return Bay.get_by_id(bay).state, events
    finally:
        db.close()


async def test_session_ends_stored_at_once_other_changes_saved_later(tmp_path: Path, kind: str) -> None:
    """SD-card wear: a session's start and end are stored when they happen; WASHING and IDLE only
    replace the bay's unsaved view, stored every wash.status_save_sec and at stop."""
    async with wash_site(tmp_path / "slow", kind, with_web=False, status_save_sec=3600) as ws:
        async with watching(ws, "wash/bay4/status", ("bay4",)) as p:
            cmd = {"bayId": "bay4", "action": "START", "course": "BASIC", "requestId": "r-1"}
            await asyncio.to_thread(p.publish, "wash/bay4/cmd", json.dumps(cmd))
            await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "IDLE")
        # The session's end is on disk; IDLE is not yet (the coalesced event holds the latest saved).
        assert await asyncio.to_thread(_stored, ws.site, "bay4") == ("DONE", ["DONE"])
        assert await ws.stop_core() == 0
        assert await asyncio.to_thread(_stored, ws.site, "bay4") == ("IDLE", ["IDLE"])
    async with wash_site(tmp_path / "fast", kind, with_web=False, status_save_sec=0.2) as ws:
        async with watching(ws, "wash/bay4/status", ("bay4",)) as p:
            cmd = {"bayId": "bay4", "action": "START", "course": "BASIC", "requestId": "r-2"}
            await asyncio.to_thread(p.publish, "wash/bay4/cmd", json.dumps(cmd))
            await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "IDLE")
            deadline = asyncio.get_running_loop().time() + 10
            while (await asyncio.to_thread(_stored, ws.site, "bay4"))[0] != "IDLE":
                assert asyncio.get_running_loop().time() < deadline, "IDLE never saved"
                await asyncio.sleep(0.05)
    sessions = await asyncio.to_thread(_sessions, ws.site)
    assert [(s["request_id"], s["state"]) for s in sessions] == [("r-2", "DONE")]


async def test_socat_killed_bays_offline_then_recover_and_muted_plc_does_not_stall_others(tmp_path: Path,
                                                                                         kind: str) -> None:
    async with wash_site(tmp_path, kind, with_web=False) as ws:
        async with watching(ws, "wash/+/status", ("bay1", "bay4")) as p:
            # One muted PLC (bay3's unit) among several: it goes offline; bay1 keeps washing.
            ws.rtu.mute("bay3", True)
            await asyncio.to_thread(status_of, p, "bay3", lambda s: s["state"] == "OFFLINE", 10)
            cmd = {"bayId": "bay1", "action": "START", "course": "STANDARD", "requestId": "k-1"}
            await asyncio.to_thread(p.publish, "wash/bay1/cmd", json.dumps(cmd))
            seen = await asyncio.to_thread(status_of, p, "bay1", lambda s: s["state"] == "DONE")
            assert "WASHING" in [s["state"] for s in seen]
            ws.rtu.mute("bay3", False)
            await asyncio.to_thread(status_of, p, "bay3", lambda s: s["state"] == "IDLE", 10)
            # The RS485 adapter vanishes: every bay on it goes OFFLINE / PLC_OFFLINE; TCP bay4 does not.
            await asyncio.to_thread(ws.pty.kill)
            for bay in RTU_BAYS:
                s = (await asyncio.to_thread(status_of, p, bay, lambda s: s["state"] == "OFFLINE", 10))[-1]
                assert s["errorCode"] == "PLC_OFFLINE"
            # It comes back (same device path): the bays recover by themselves.
            await asyncio.to_thread(ws.pty.start)
            await ws.rtu.reopen()
            for bay in RTU_BAYS:
                await asyncio.to_thread(status_of, p, bay, lambda s: s["state"] in ("IDLE", "DONE"), 20)
        code = ws.core.popen.poll() if ws.core else None
        assert code is None  # the core never crashed


async def test_plc_local_session_and_core_restart_mid_wash(tmp_path: Path, kind: str) -> None:
    async with wash_site(tmp_path, kind, with_web=False) as ws:
        async with watching(ws, "wash/bay4/status", ("bay4",)) as p:
            # A coin box wired to the PLC starts a session: recorded with requestId null.
            ws.tcp.local_start("bay4", 2)
            seen = await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "DONE")
            assert seen[-1]["requestId"] is None and seen[-1]["course"] == "STANDARD"
            await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "IDLE")
            # A wash started through the gateway; the core restarts in the middle of it.
            ws.tcp.set_wash_time("bay4", 4.0)
            cmd = {"bayId": "bay4", "action": "START", "course": "BASIC", "requestId": "r-9"}
            await asyncio.to_thread(p.publish, "wash/bay4/cmd", json.dumps(cmd))
            washing = (await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "WASHING"))[-1]
        assert await ws.stop_core() == 0
        await ws.start_core()
        async with watching(ws, "wash/bay4/status") as p:
            seen = await asyncio.to_thread(status_of, p, "bay4", lambda s: s["state"] == "DONE", 15)
            assert seen[-1]["sessionId"] == washing["sessionId"] and seen[-1]["requestId"] == "r-9"
    sessions = await asyncio.to_thread(_sessions, ws.site)
    assert [(s["request_id"], s["state"], s["course"]) for s in sessions] == [(None, "DONE", "STANDARD"),
                                                                              ("r-9", "DONE", "BASIC")]
    assert sessions[0]["session_id"].endswith("-bay4-001") and sessions[1]["session_id"].endswith("-bay4-002")


async def test_bus_scan_from_the_cli_and_the_api(tmp_path: Path, kind: str) -> None:
    """The core probes unit ids between polls: the simulated PLC's units answer and decode, the
    absent ones time out, and the polls go on."""
    import subprocess

    from sim.demo import ensure_demo_user
    from sim.procs import child_env, gateway_command
    from tests.test_commands_e2e import token_for

    async with wash_site(tmp_path, kind) as ws:
        out = await asyncio.to_thread(subprocess.run, gateway_command("scan-bus", "rs485", "--first", "1", "--last",
                                                                      str(len(RTU_BAYS) + 2), "--config",
                                                                      str(ws.site.config_path)),
                                      env=child_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = [line for line in out.stdout.splitlines() if line.startswith("unit")]
        assert len(lines) == len(RTU_BAYS) + 2
        assert all("answers" in line and "IDLE" in line for line in lines[:len(RTU_BAYS)]), out.stdout
        # No PLC at those ids: the simulator's server answers with an exception (a real bus: timeout).
        assert all("answers" not in line and ("exception" in line or "timeout" in line)
                   for line in lines[len(RTU_BAYS):]), out.stdout
        ensure_demo_user(ws.site.config_path)
        auth = await asyncio.to_thread(token_for, ws.site)
        code, body = await asyncio.to_thread(http_json, ws.url + "/api/v1/buses/scan", method="POST",
                                             body={"bus": "lan", "first": 1, "last": 1}, headers=auth, timeout=60)
        assert code == 200 and body["data"]["units"][0]["decoded"]["state"] == "IDLE", body
        code, body = await asyncio.to_thread(http_json, ws.url + "/api/v1/buses/scan", method="POST",
                                             body={"bus": "nope"}, headers=auth)
        assert code == 400 and "rs485" in body["message"]
        code, diag = await asyncio.to_thread(http_json, ws.url + "/api/v1/buses/diagnostics", headers=auth)
        assert code == 200 and diag["data"]["rs485"]["connected"] is True
        assert all(b["polls"] > 0 for b in diag["data"]["rs485"]["bays"].values())
        # Polls go on beside the scan, at most the odd error while the line settles (the rate itself is
        # a timing: bench/wash_bays.py measures it).
        assert all(b["polls_per_s"] > 0 and b["error_rate"] < 0.2 for b in diag["data"]["rs485"]["bays"].values()), \
            diag["data"]["rs485"]["bays"]


@pytest.mark.parametrize("fault", ["late", "pause"])
async def test_late_replies_never_move_a_wash_to_another_bay(tmp_path: Path, kind: str, fault: str) -> None:
    """Three RS485 bays behind one unit id (bases 0/100/200). During bay1's wash the PLC answers
    late (each reply 1.5 x timeout_ms after its request, in order) or stops dead five times for
    250 ms (SIGSTOP/SIGCONT). The wash stays one session of bay1; bay2 and bay3 never leave
    IDLE/OFFLINE, and no session is recorded for them."""
    async with wash_site(tmp_path, kind, with_web=False, shared_unit=True, process=True) as ws:
        ws.rtu.set_wash_time("bay1", 5.0)
        async with watching(ws, "wash/+/status", RTU_BAYS) as p:
            cmd = {"bayId": "bay1", "action": "START", "course": "PREMIUM", "requestId": "late-1"}
            await asyncio.to_thread(p.publish, "wash/bay1/cmd", json.dumps(cmd))
            await asyncio.to_thread(status_of, p, "bay1", lambda s: s["state"] == "WASHING")
            if fault == "late":
                ws.rtu.late(0.15)  # timeout_ms is 100 on the RS485 bus
                await asyncio.sleep(2.0)  # the fault's duration, not a synchronisation
                ws.rtu.late(0)
            else:
                for _ in range(5):
                    ws.rtu.pause()
                    await asyncio.sleep(0.25)  # the length of the pause is the fault itself
                    ws.rtu.resume()
                    await asyncio.sleep(0.25)
            # The PLC's truth: its one session of bay1 ran to its end and the bay went idle.
            deadline = asyncio.get_running_loop().time() + 20
            while (plc := ws.rtu.status("bay1"))["state"] != "IDLE":
                assert asyncio.get_running_loop().time() < deadline, plc
                await asyncio.sleep(0.1)
            assert plc["session_counter"] == 1
            seen = await asyncio.to_thread(status_of, p, "bay1", lambda s: s["state"] == "DONE", 10)
            while not p.messages.empty():
                p.skipped.append(p.messages.get_nowait())
            others = [json.loads(m.payload) for m in p.skipped if m.topic != "wash/bay1/status"]
        assert all(s["state"] in ("WASHING", "OFFLINE", "DONE") for s in seen), seen
        assert {s["state"] for s in others} <= {"IDLE", "OFFLINE"}, others
    sessions = await asyncio.to_thread(_sessions, ws.site)
    assert [(s["bay"], s["request_id"], s["state"]) for s in sessions] == [("bay1", "late-1", "DONE")], sessions
