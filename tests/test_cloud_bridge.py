"""The live MQTT bridge to the cloud (gateway.uplink.bridge) against a real mosquitto.

Each test starts /usr/sbin/mosquitto on ephemeral ports in its tmp_path (stopped in teardown) and
talks to it with paho probes (tests/mqtt_probe.py) on a plain listener, as the cloud would. TLS
material (two CAs, server and client certificates) is made once per module with the openssl CLI.
A small TCP relay in the test's loop (`Relay`) sits between the bridge and mosquitto where a test
must kill the bridge's connection or keep it offline while mosquitto stays up.

Negative checks ("X was not delivered") use a marker sent after X on the same connection: MQTT
keeps one client's order, so when the marker arrives X would have arrived before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.uplink.bridge import BridgeSettings, CloudBridge, is_forwarded
from sim.demo import free_port
from tests.mqtt_probe import Msg, Probe

MOSQUITTO = "/usr/sbin/mosquitto"
SITE = "site-1"
PREFIX = f"sites/{SITE}/"
STATUS = f"{PREFIX}gateway/status"
WAIT = 10.0  # every wait has this timeout; a passing run takes a fraction of it

pytestmark = pytest.mark.skipif(not os.path.exists(MOSQUITTO), reason="needs Debian's mosquitto")


# --- TLS material ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca: Path  # the cloud's CA: signs the server and client certificates
    other_ca: Path  # an unrelated CA
    server_cert: Path  # SAN localhost, 127.0.0.1
    server_key: Path
    misnamed_cert: Path  # signed by `ca`, SAN cloud.example.invalid only
    misnamed_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)


def _make_leaf(d: Path, name: str, ca: str, san: str, usage: str) -> None:
    ext = d / f"{name}.ext"
    ext.write_text(f"{san}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-extfile", ext.name,
             "-out", f"{name}.crt", cwd=d)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    d = tmp_path_factory.mktemp("tls")
    _make_ca(d, "cloud-ca")
    _make_ca(d, "other-ca")
    _make_leaf(d, "server", "cloud-ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n", "serverAuth")
    _make_leaf(d, "misnamed", "cloud-ca", "subjectAltName=DNS:cloud.example.invalid\n", "serverAuth")
    _make_leaf(d, "client", "cloud-ca", "", "clientAuth")
    return Tls(d / "cloud-ca.crt", d / "other-ca.crt", d / "server.crt", d / "server.key", d / "misnamed.crt",
               d / "misnamed.key", d / "client.crt", d / "client.key")


# --- mosquitto ---------------------------------------------------------------------------------


@dataclass
class TlsListener:
    port: int
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS (a client certificate from this CA is required)


@dataclass
class Mosquitto:
    """mosquitto with a plain listener (probes, and the bridge in plain tests) and TLS listeners."""

    dir: Path
    port: int = field(default_factory=free_port)
    tls: list[TlsListener] = field(default_factory=list)
    anonymous: bool = True
    extra_conf: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.dir / "mosquitto.log"

    def write_conf(self) -> Path:
        lines = [f"allow_anonymous {str(self.anonymous).lower()}", *self.extra_conf, "persistence false",
                 "log_dest stderr",
                 "log_type error", "log_type warning", "log_type notice", "log_type information"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto, which cannot read tmp_path
        lines.append(f"listener {self.port} 127.0.0.1")
        for t in self.tls:
            lines += [f"listener {t.port} 127.0.0.1", f"certfile {t.cert}", f"keyfile {t.key}"]
            if t.client_ca is not None:
                lines += [f"cafile {t.client_ca}", "require_certificate true"]
        conf = self.dir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout: float = WAIT) -> None:
        """Start and wait until every listener accepts connections (same ports on a restart)."""
        conf = self.write_conf()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        for port in [self.port, *(t.port for t in self.tls)]:
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise AssertionError(f"mosquitto did not start:\n{self.log_path.read_text()[-2000:]}") from None
                    time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no clean close of anything (retained messages and sessions are gone)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def mosquitto(d: Path, tls: list[TlsListener] | None = None) -> Iterator[Mosquitto]:
    broker = Mosquitto(d, tls=tls or [])
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with mosquitto(tmp_path) as b:
        yield b


# --- a relay the test can cut or block -----------------------------------------------------------


class Relay:
    """TCP relay 127.0.0.1:port -> mosquitto. `cut()` resets both sides of every relayed
    connection (the broker sees a client vanish without DISCONNECT); while `blocked`, new
    connections are reset at once."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.blocked = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    async def stop(self) -> None:
        self.blocked = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        try:
            if self.blocked:
                writer.transport.abort()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            self._writers |= {writer, up_writer}
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                self._writers -= {writer, up_writer}
        finally:
            self._handlers.discard(me)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.transport.abort()  # the other direction's reader then sees the end too


@contextlib.asynccontextmanager
async def relay_to(broker: Mosquitto) -> AsyncIterator[Relay]:
    relay = Relay(broker.port)
    await relay.start()
    try:
        yield relay
    finally:
        await relay.stop()


# --- the bridge under test -----------------------------------------------------------------------


class Inbox:
    """The three callbacks; each received message lands in one queue as (kind, id, payload)."""

    def __init__(self, fail_on: bytes | None = None) -> None:
        self.queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        self.fail_on = fail_on

    async def _put(self, kind: str, ident: str, payload: bytes) -> None:
        if payload == self.fail_on:
            raise RuntimeError(f"handler refuses {payload!r}")
        await self.queue.put((kind, ident, payload))

    async def wash(self, bay_id: str, payload: bytes) -> None:
        await self._put("wash", bay_id, payload)

    async def device(self, device_id: str, payload: bytes) -> None:
        await self._put("device", device_id, payload)

    async def payment(self, charge_id: str, payload: bytes) -> None:
        await self._put("payment", charge_id, payload)

    async def next(self) -> tuple[str, str, bytes]:
        return await asyncio.wait_for(self.queue.get(), WAIT)


def make_bridge(port: int, inbox: Inbox, **overrides: Any) -> CloudBridge:
    values: dict[str, Any] = {"site_id": SITE, "host": "127.0.0.1", "port": port, "tls": False,
                              "backoff_min_sec": 0.05, "backoff_max_sec": 0.3, "connect_timeout_sec": 5.0}
    values.update(overrides)
    return CloudBridge(BridgeSettings(**values), on_wash_cmd=inbox.wash, on_device_command=inbox.device,
                       on_payment_status=inbox.payment)


@contextlib.asynccontextmanager
async def running(bridge: CloudBridge, *, wait_ready: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    """Run the bridge (until connected and subscribed, unless told not to wait); cancel it after."""
    task = asyncio.create_task(bridge.run(), name="bridge")
    try:
        if wait_ready:
            await ready(bridge, task)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def ready(bridge: CloudBridge, task: asyncio.Task[None], reconnects: int = 0) -> dict[str, Any]:
    waiter = asyncio.create_task(
        bridge.wait_state(lambda s: s["connected"] and s["subscribed"] and s["reconnects"] >= reconnects, WAIT))
    await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        raise AssertionError(f"bridge.run() ended: {task!r}")
    try:
        return await waiter
    except TimeoutError:
        raise AssertionError(f"bridge not ready: {bridge.state()}") from None


async def probe(port: int, *subscriptions: str) -> Probe:
    p = Probe(port)
    rc = await asyncio.to_thread(p.connect)
    assert not rc.is_failure, rc
    for s in subscriptions:
        assert await asyncio.to_thread(p.subscribe, s) == [1]
    return p


async def expect(p: Probe, topic: str) -> Msg:
    return await asyncio.to_thread(p.expect, topic, WAIT)


async def send(p: Probe, topic: str, payload: bytes, *, retain: bool = False) -> None:
    await asyncio.to_thread(p.publish, topic, payload, 1, retain)


# --- pure parts ----------------------------------------------------------------------------------


def test_only_bay_status_and_presence_transitions_go_to_the_cloud() -> None:
    assert is_forwarded("wash/bay1/status") and is_forwarded("gateway/presence/dev-1")
    for topic in ("gateway/live/dev-1", "wash/bay1/cmd", "wash/bay1/cmd/result", "gateway/presence/dev-1/x",
                  "gateway/health", "gateway/status", "device/dev-1/command", "server/dev-1/streaming"):
        assert not is_forwarded(topic), topic


def test_settings_validate_and_default_client_id(tmp_path: Path) -> None:
    s = BridgeSettings(site_id=SITE, host="mqtt.example.com")
    assert (s.effective_client_id, s.port, s.tls, s.backoff_min_sec, s.backoff_max_sec) == (
        "carwash-gateway-site-1", 8883, True, 1.0, 60.0)
    bad: dict[str, Any]
    for bad in ({"site_id": "a/b"}, {"site_id": "+"}, {"host": ""}, {"key_file": "k.pem"},
                {"backoff_min_sec": 5.0, "backoff_max_sec": 1.0}, {"port": 0}, {"max_inflight": 0}):
        values: dict[str, Any] = {"site_id": SITE, "host": "h", **bad}
        with pytest.raises(ValueError):
            BridgeSettings(**values)
    path = tmp_path / "gateway.toml"
    path.write_text('[site]\nid = "site-7"\n[cloud.bridge]\nenabled = true\nhost = "mqtt.example.com"\n'
                    'client_id = "gw-7"\nusername = "site-7"\n')
    cfg = load_config(path)
    s = BridgeSettings.from_config(cfg, password="pw", cert_file="/c.pem", backoff_max_sec=10.0)
    assert (s.site_id, s.host, s.port, s.tls, s.effective_client_id, s.username, s.password, s.cert_file,
            s.backoff_max_sec) == ("site-7", "mqtt.example.com", 8883, True, "gw-7", "site-7", "pw", "/c.pem", 10.0)


async def test_forward_maps_topics_and_drops_bad_input_without_io(caplog: pytest.LogCaptureFixture) -> None:
    bridge = make_bridge(1, Inbox(), max_payload_bytes=16, max_pending_topics=2)
    assert bridge.forward("wash/bay1/status", b'{"s":1}')
    assert bridge.forward("wash/bay1/status", b'{"s":2}')  # same topic: only the latest waits
    assert bridge.state()["pending"] == 1
    assert not bridge.forward("wash/bay1/cmd", b"{}")
    assert not bridge.publish_wash_status("bay/1", b"{}")
    assert not bridge.publish_device_presence("dev-1", b"x" * 17)
    assert bridge.forward("gateway/presence/dev-1", b'{"online":true}')
    assert bridge.publish_device_presence("dev-2", b"{}")  # a third topic: the oldest (bay1) goes
    st = bridge.state()
    assert (st["pending"], st["connected"], st["forwarded"]) == (2, False, 0)
    assert st["dropped_by_reason"] == {"unmapped local topic": 1, "bad id": 1, "payload too large": 1,
                                       "pending buffer full": 1}
    assert bridge.dropped == 4
    text = caplog.text
    assert "wash/bay1/cmd" in text and "'bay/1' does not match" in text and "17 bytes" in text


# --- against mosquitto ---------------------------------------------------------------------------


async def test_forwards_status_retained_under_site_prefix_and_says_offline_at_stop(broker: Mosquitto) -> None:
    bridge = make_bridge(broker.port, Inbox())
    async with running(bridge):
        assert bridge.publish_wash_status("bay1", b'{"state":"IDLE"}')
        assert bridge.publish_wash_status("bay1", b'{"state":"WASHING"}')
        # from another thread, as a sync caller would
        assert await asyncio.to_thread(bridge.publish_device_presence, "dev-1", b'{"online":true}')
        assert bridge.forward("gateway/presence/dev-2", b'{"online":false}')
        st = await bridge.wait_state(lambda s: s["forwarded"] == 4 and s["pending"] == 0, WAIT)
        assert st["dropped"] == 0
        # A cloud client that subscribes afterwards gets the retained state of everything.
        watcher = await probe(broker.port, "#")
        try:
            got = {t: await expect(watcher, t) for t in (
                f"{PREFIX}wash/bay1/status", f"{PREFIX}devices/dev-1/presence", f"{PREFIX}devices/dev-2/presence",
                STATUS)}
            assert {t: (m.payload, m.retain) for t, m in got.items()} == {
                f"{PREFIX}wash/bay1/status": (b'{"state":"WASHING"}', True),
                f"{PREFIX}devices/dev-1/presence": (b'{"online":true}', True),
                f"{PREFIX}devices/dev-2/presence": (b'{"online":false}', True),
                STATUS: (b'{"online": true}', True),
            }
            assert all(m.topic.startswith(PREFIX) for m in watcher.skipped), watcher.skipped
            assert bridge.connected
        except BaseException:
            await asyncio.to_thread(watcher.close)
            raise
    try:
        # Cancelled: a clean shutdown says offline itself (a DISCONNECT suppresses the will).
        m = await expect(watcher, STATUS)
        assert (m.payload, m.retain) == (b'{"online": false}', False)
        assert not bridge.connected and not bridge.state()["running"]
    finally:
        await asyncio.to_thread(watcher.close)
    assert "carwash-gateway-site-1" in broker.log_path.read_text()


async def test_cloud_messages_reach_the_callbacks_and_bad_ones_are_dropped(
        broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    cloud = await probe(broker.port)
    try:
        # Retained before the bridge subscribes: a command is a stale replay, a payment status is state.
        await send(cloud, f"{PREFIX}wash/bay9/cmd", b'{"action":"START","stale":true}', retain=True)
        await send(cloud, f"{PREFIX}payments/ch_0/status", b'{"status":"SUCCEEDED"}', retain=True)
        inbox = Inbox(fail_on=b"boom")
        bridge = make_bridge(broker.port, inbox, max_payload_bytes=1024)
        async with running(bridge):
            assert await inbox.next() == ("payment", "ch_0", b'{"status":"SUCCEEDED"}')
            await send(cloud, f"{PREFIX}wash/bay1/cmd", b'{"action":"START"}')
            await send(cloud, f"{PREFIX}device/dev-1/command", b"boom")  # the handler raises
            await send(cloud, f"{PREFIX}device/dev-1/command", b'{"command":"REBOOT"}')
            await send(cloud, f"{PREFIX}wash/bad id/cmd", b"{}")
            await send(cloud, f"{PREFIX}wash/bay1/cmd", b"x" * 1025)
            await send(cloud, "sites/other-site/wash/bay1/cmd", b"{}")  # not subscribed: never arrives
            await send(cloud, f"{PREFIX}payments/ch_1/status", b'{"status":"PENDING"}')  # the marker
            got = [await inbox.next() for _ in range(3)]
            assert got == [("wash", "bay1", b'{"action":"START"}'), ("device", "dev-1", b'{"command":"REBOOT"}'),
                           ("payment", "ch_1", b'{"status":"PENDING"}')]
            assert inbox.queue.empty()
            st = bridge.state()
            assert st["dropped_by_reason"] == {"retained command": 1, "bad id": 1, "payload too large": 1}
            assert (st["received"], st["callback_errors"], st["connected"]) == (8, 1, True)
        text = caplog.text
        assert f"{PREFIX}wash/bad id/cmd: bad id" in text
        assert f"{PREFIX}wash/bay1/cmd: payload too large: 1025 bytes" in text
        assert f"{PREFIX}wash/bay9/cmd: retained command" in text
        assert "the device command handler failed" in text and "handler refuses b'boom'" in text
    finally:
        await asyncio.to_thread(cloud.close)


async def test_will_when_the_connection_is_killed_then_back_online(broker: Mosquitto) -> None:
    watcher = await probe(broker.port, STATUS)
    try:
        async with relay_to(broker) as relay:
            inbox = Inbox()
            bridge = make_bridge(relay.port, inbox)
            async with running(bridge) as task:
                assert (await expect(watcher, STATUS)).payload == b'{"online": true}'
                relay.cut()  # the bridge vanishes without DISCONNECT
                m = await expect(watcher, STATUS)
                assert (m.payload, m.retain) == (b'{"online": false}', False)  # the will, from mosquitto
                assert (await expect(watcher, STATUS)).payload == b'{"online": true}'
                st = await ready(bridge, task, reconnects=1)
                assert st["reconnects"] == 1
                await send(watcher, f"{PREFIX}wash/bay2/cmd", b'{"action":"STOP"}')
                assert await inbox.next() == ("wash", "bay2", b'{"action":"STOP"}')
    finally:
        await asyncio.to_thread(watcher.close)


async def test_persistent_session_gets_commands_sent_while_offline_and_only_the_latest_status(
        broker: Mosquitto) -> None:
    async with relay_to(broker) as relay:
        inbox = Inbox()
        bridge = make_bridge(relay.port, inbox)
        async with running(bridge) as task:
            assert bridge.publish_wash_status("bay1", b'{"v":0}')
            await bridge.wait_state(lambda s: s["forwarded"] == 1, WAIT)
            relay.blocked = True
            relay.cut()
            await bridge.wait_state(lambda s: not s["connected"], WAIT)
            await bridge.wait_state(lambda s: s["connect_failures"] >= 1, WAIT)  # it keeps trying
            cloud = await probe(broker.port, f"{PREFIX}wash/+/status")
            try:
                assert (await expect(cloud, f"{PREFIX}wash/bay1/status")).payload == b'{"v":0}'  # retained
                # Queued by mosquitto for the bridge's offline session (the PUBACK came back).
                await send(cloud, f"{PREFIX}wash/bay1/cmd", b'{"action":"START","n":1}')
                await send(cloud, f"{PREFIX}device/dev-1/command", b'{"n":2}')
                for v in (1, 2, 3):
                    assert bridge.publish_wash_status("bay1", b'{"v":%d}' % v)
                assert bridge.publish_wash_status("bay2", b'{"v":9}')
                assert bridge.state()["pending"] == 2
                relay.blocked = False
                await ready(bridge, task, reconnects=1)
                assert await inbox.next() == ("wash", "bay1", b'{"action":"START","n":1}')
                assert await inbox.next() == ("device", "dev-1", b'{"n":2}')
                seen = []
                while (m := await expect(cloud, f"{PREFIX}wash/bay1/status")).payload != b'{"v":3}':
                    seen.append(m.payload)
                assert seen == [], "statuses superseded while offline were sent"
                assert (await expect(cloud, f"{PREFIX}wash/bay2/status")).payload == b'{"v":9}'
                st = await bridge.wait_state(lambda s: s["pending"] == 0, WAIT)
                assert st["forwarded"] == 3 and st["dropped"] == 0
            finally:
                await asyncio.to_thread(cloud.close)


async def test_broker_restart_reconnects_resubscribes_and_sends_the_latest_status(broker: Mosquitto) -> None:
    inbox = Inbox()
    bridge = make_bridge(broker.port, inbox)
    async with running(bridge) as task:
        assert bridge.publish_wash_status("bay1", b'{"v":0}')
        await bridge.wait_state(lambda s: s["forwarded"] == 1, WAIT)
        broker.kill()  # sessions, subscriptions and retained messages are gone with it
        await bridge.wait_state(lambda s: not s["connected"], WAIT)
        assert bridge.publish_wash_status("bay1", b'{"v":1}')
        assert bridge.publish_wash_status("bay1", b'{"v":2}')
        await asyncio.to_thread(broker.start)
        await ready(bridge, task, reconnects=1)
        st = await bridge.wait_state(lambda s: s["pending"] == 0, WAIT)
        assert st["forwarded"] == 2  # one message after the restart: the latest only
        cloud = await probe(broker.port, f"{PREFIX}wash/+/status")
        try:
            m = await expect(cloud, f"{PREFIX}wash/bay1/status")
            assert (m.payload, m.retain) == (b'{"v":2}', True)
            # A fresh broker knows nothing of the old session: this arrives only if the bridge subscribed again.
            await send(cloud, f"{PREFIX}payments/ch_9/status", b'{"status":"FAILED"}')
            assert await inbox.next() == ("payment", "ch_9", b'{"status":"FAILED"}')
        finally:
            await asyncio.to_thread(cloud.close)


# --- TLS -------------------------------------------------------------------------------------------


async def test_mutual_tls_forwards_and_receives(tmp_path: Path, tls: Tls) -> None:
    listener = TlsListener(free_port(), tls.server_cert, tls.server_key, client_ca=tls.ca)
    with mosquitto(tmp_path, [listener]) as broker:
        inbox = Inbox()
        bridge = make_bridge(listener.port, inbox, host="localhost", tls=True, ca_file=str(tls.ca),
                             cert_file=str(tls.client_cert), key_file=str(tls.client_key))
        async with running(bridge):
            cloud = await probe(broker.port, f"{PREFIX}wash/+/status")
            try:
                assert bridge.publish_wash_status("bay1", b'{"tls":true}')
                assert (await expect(cloud, f"{PREFIX}wash/bay1/status")).payload == b'{"tls":true}'
                await send(cloud, f"{PREFIX}device/dev-1/command", b'{"over":"tls"}')
                assert await inbox.next() == ("device", "dev-1", b'{"over":"tls"}')
            finally:
                await asyncio.to_thread(cloud.close)
        assert "New client connected" in broker.log_path.read_text()


@pytest.mark.parametrize("case", ["other CA", "host name", "no client certificate"])
async def test_tls_refuses_a_server_it_cannot_trust(tmp_path: Path, tls: Tls, case: str) -> None:
    listeners = {
        "other CA": TlsListener(free_port(), tls.server_cert, tls.server_key),
        "host name": TlsListener(free_port(), tls.misnamed_cert, tls.misnamed_key),
        "no client certificate": TlsListener(free_port(), tls.server_cert, tls.server_key, client_ca=tls.ca),
    }
    listener = listeners[case]
    ca = tls.other_ca if case == "other CA" else tls.ca
    with mosquitto(tmp_path, [listener]) as broker:
        cloud = await probe(broker.port, f"{PREFIX}gateway/#")
        try:
            bridge = make_bridge(listener.port, Inbox(), tls=True, ca_file=str(ca))
            gc.collect()  # what earlier tests left for the collector must not close during this one
            fds = len(os.listdir("/proc/self/fd"))
            async with running(bridge, wait_ready=False) as task:
                st = await bridge.wait_state(lambda s: s["connect_failures"] >= 3, WAIT)  # and it retries
                assert not task.done()
            # paho leaves the socket of a failed handshake open: the bridge must close it.
            assert len(os.listdir("/proc/self/fd")) <= fds, "file descriptors leaked by failed attempts"
            assert not st["connected"] and st["reconnects"] == 0
            expected = {"other CA": "TLS certificate rejected: ",
                        "host name": "TLS certificate rejected: IP address mismatch",
                        "no client certificate": f"127.0.0.1:{listener.port}"}[case]
            assert expected in st["last_error"], st["last_error"]
            # Nothing reached the cloud side: no online status was ever published.
            await send(cloud, STATUS + "/marker", b"m")
            before = await asyncio.to_thread(cloud.until, STATUS + "/marker", WAIT)
            assert before == []
        finally:
            await asyncio.to_thread(cloud.close)


async def test_refused_login_is_retried_and_reported(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    passwords.write_text("")  # nobody may log in
    broker = Mosquitto(tmp_path, anonymous=False, extra_conf=[f"password_file {passwords}"])
    broker.start()
    try:
        bridge = make_bridge(broker.port, Inbox(), username="site-1", password="wrong")
        async with running(bridge, wait_ready=False):
            st = await bridge.wait_state(lambda s: s["connect_failures"] >= 2, WAIT)
        assert "refused the connection" in st["last_error"] and not st["connected"], st
    finally:
        broker.stop()


def test_outbound_keeps_the_latest_payload_per_topic_until_its_puback() -> None:
    from gateway.uplink.bridge_outbound import LatestPerTopic

    out = LatestPerTopic(max_topics=2)
    s1, dropped = out.put("a", b"1")
    assert dropped is None
    out.sent(10, "a", s1)
    s2, _ = out.put("a", b"2")  # newer while the first is in flight
    assert out.acked(10) and len(out) == 1  # the PUBACK of the old payload keeps the new one
    assert out.waiting() == [("a", s2, b"2")]
    out.put("b", b"x")
    _, dropped = out.put("c", b"y")  # full: the oldest topic goes
    assert dropped == "a" and [t for t, _, _ in out.waiting()] == ["b", "c"]
    out.sent(11, "b", out.waiting()[0][1])
    out.lost()  # the connection went: nothing in flight, everything still waiting
    assert not out.acked(11) and len(out) == 2
    assert not out.acked(99)  # not ours (the online status)
