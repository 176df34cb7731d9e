"""MQTT accounts end to end: Debian's `mosquitto_pub`/`mosquitto_sub` as an independent wash
backend and dashboard against the real core (PLC simulators behind it), accounts managed with
`carwash-gateway mqtt-user` while the core runs, the wash contract's payloads byte for byte.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from sim.procs import child_env, gateway_command
from tests.conftest import SHARED_SPEC
from tests.test_wash_e2e import WashSite, status_of, wash_site

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs Debian's mosquitto-clients")

BACKEND_PW = "backend-secret-0123"
DASH_PW = "dashboard-secret-0123"


def seed_block(heading: str) -> bytes:
    """The JSON block under `heading` in the seed, exactly as written (whitespace included)."""
    text = (SHARED_SPEC / "seeds" / "wash-message-contract.md").read_text()
    after = text[text.index(heading):]
    m = re.search(r"```json\n(.*?)\n```", after, re.S)
    assert m is not None
    return m.group(1).encode()


class Sub:
    """`mosquitto_sub -v` in the background; lines read on a thread into a queue."""

    def __init__(self, port: int, user: str, password: str, *topics: str) -> None:
        args = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", password, "-q", "1", "-v",
                "-N", "-F", "%t\t%p\n"]
        for t in topics:
            args += ["-t", t]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="mosquitto-sub", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            topic, _, payload = line.rstrip(b"\n").partition(b"\t")
            self.lines.put((topic.decode(), payload))

    def expect(self, pred: object, timeout: float = 15) -> tuple[str, dict[str, object]]:
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message; saw {seen}")
            try:
                topic, payload = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            doc = json.loads(payload)
            seen.append((topic, doc))
            if pred(topic, doc):  # type: ignore[operator]
                return topic, doc

    def wait_exit(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def close(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)
        self._thread.join(10)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode(errors="replace")
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return err


def pub(port: int, user: str | None, password: str | None, topic: str,
        payload: bytes) -> subprocess.CompletedProcess[bytes]:
    """`mosquitto_pub -q 1`: exit 0 only once the broker acknowledged the message."""
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-s"]
    if user is not None:
        args += ["-u", user, "-P", password or ""]
    return subprocess.run(args, input=payload, capture_output=True, timeout=30)


def cli(ws: WashSite, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(gateway_command("mqtt-user", *args, "--config", str(ws.site.config_path)), input=stdin,
                          capture_output=True, text=True, env=child_env(), timeout=60)


def connects(port: int, user: str, password: str, timeout: float = 10) -> bool:
    """Whether the account can log in: retried until `timeout` (the core reloads accounts each
    second), each attempt ending on its CONNACK."""
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-u", user, "-P", password,
                            "-t", "wash/+/status", "-C", "1", "-W", "5"], capture_output=True, timeout=30)
        if r.returncode == 0:
            return True
        if time.monotonic() > deadline:
            return False


async def test_wash_backend_and_dashboard_with_mosquitto_clients(tmp_path: Path) -> None:
    command = seed_block("### Command (Backend -> Gateway)")
    assert b'"action": "START"' in command and b'"requestId": "uuid-1234"' in command
    # The bays are the independent umodbus PLC's: the backend, the dashboard and the PLC are all
    # someone else's code.
    async with wash_site(tmp_path, "independent", with_web=False) as ws:
        port = ws.site.mqtt_port
        # Before any account: an anonymous START is not acknowledged (connection closed) and the bay stays IDLE.
        r = await asyncio.to_thread(pub, port, None, None, "wash/bay1/cmd", command)
        assert r.returncode != 0
        r = await asyncio.to_thread(cli, ws, "add", "backend", "--role", "wash-backend", "--password-stdin",
                                    stdin=BACKEND_PW + "\n")
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(cli, ws, "add", "dash", "--role", "monitor", "--password-stdin",
                                    stdin=DASH_PW + "\n")
        assert r.returncode == 0, r.stderr
        r = await asyncio.to_thread(cli, ws, "add", "short", "--role", "monitor", "--password-stdin", stdin="abc\n")
        assert r.returncode == 1 and "password" in r.stderr
        listing = json.loads((await asyncio.to_thread(cli, ws, "list", "--json")).stdout)
        assert [(a["username"], a["role"]) for a in listing] == [("backend", "wash-backend"), ("dash", "monitor")]
        assert "argon2" not in json.dumps(listing)
        assert await asyncio.to_thread(connects, port, "dash", DASH_PW)  # taken up without a restart
        assert await asyncio.to_thread(connects, port, "backend", BACKEND_PW)
        assert not await asyncio.to_thread(connects, port, "dash", "wrong-password-000", 0)

        backend = Sub(port, "backend", BACKEND_PW, "wash/bay1/status", "wash/bay1/cmd/result")
        dash = Sub(port, "dash", DASH_PW, "wash/+/status", "gateway/status")
        try:
            await asyncio.to_thread(dash.expect, lambda t, d: t == "wash/bay1/status" and d["state"] == "IDLE")
            await asyncio.to_thread(dash.expect, lambda t, d: t == "gateway/status" and d["online"] is True)
            await asyncio.to_thread(backend.expect, lambda t, d: t == "wash/bay1/status" and d["state"] == "IDLE")
            # The backend's START, byte for byte as the contract writes it: acknowledged, accepted, washing.
            r = await asyncio.to_thread(pub, port, "backend", BACKEND_PW, "wash/bay1/cmd", command)
            assert r.returncode == 0, r.stderr
            _, result = await asyncio.to_thread(backend.expect, lambda t, d: t.endswith("/cmd/result"))
            assert (result["accepted"], result["action"], result["requestId"]) == (True, "START", "uuid-1234")
            _, st = await asyncio.to_thread(dash.expect, lambda t, d: d.get("state") == "WASHING")
            assert (st["bayId"], st["requestId"], st["course"]) == ("bay1", "uuid-1234", "BASIC")
            # The monitor is read-only: its START is not acknowledged (exit code) and changes nothing.
            r = await asyncio.to_thread(pub, port, "dash", DASH_PW, "wash/bay2/cmd",
                                        command.replace(b'"bay1"', b'"bay2"'))
            assert r.returncode != 0
            # Removed while connected: the backend's subscriber is cut off and may not come back.
            r = await asyncio.to_thread(cli, ws, "remove", "backend")
            assert r.returncode == 0, r.stderr
            assert await asyncio.to_thread(backend.wait_exit) != 0
            assert not await asyncio.to_thread(connects, port, "backend", BACKEND_PW, 0)
            # A new password cuts the dashboard off; the new one works.
            r = await asyncio.to_thread(cli, ws, "passwd", "dash", "--password-stdin", stdin="dashboard-new-0123\n")
            assert r.returncode == 0, r.stderr
            assert await asyncio.to_thread(dash.wait_exit) != 0
            assert await asyncio.to_thread(connects, port, "dash", "dashboard-new-0123")
        finally:
            await asyncio.to_thread(backend.close)
            await asyncio.to_thread(dash.close)
        # Nothing reached bay2, the core counted the refusals.
        with ws.probe() as probe:
            await asyncio.to_thread(probe.connect)
            await asyncio.to_thread(probe.subscribe, "wash/bay2/status")
            await asyncio.to_thread(status_of, probe, "bay2", lambda s: s["state"] == "IDLE")
        assert ws.core is not None
        log = ws.core.log()
        assert "acl_publish" in log and "closing its connection" in log
