"""What site access costs per request and per message (issue 17).

1. The technician token check of every authenticated HTTP request (`web.auth.account_of`: JWT
   signature and expiry, then one indexed read of the account's row for `disabled` and
   `token_version`), against the JWT decode alone (what the page checked before): per call, in a
   request context of the real app on a migrated SQLite file (WAL, FULL).
2. The MQTT publish ACL (`gateway.mqtt.broker.may_publish`), run for every PUBLISH of a
   non-internal client before the broker acknowledges it: anonymous device vs account session.
3. End to end through the embedded broker: QoS 1 publishes per second of one paho client,
   anonymous on `server/d1/streaming` vs a `wash-backend` account on `wash/bay1/cmd` (each
   waits for its PUBACK; nothing subscribes, so the figure is the broker's intake).
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from bench.common import Result, temp_dir

NAME = "access_checks"


def _token_check(tmp: Path, batches: int, calls: int) -> tuple[list[float], list[float]]:
    import jwt

    from gateway.access import users
    from gateway.config import load_config, load_secrets
    from gateway.store import migrate, open_database
    from sim.demo import free_port, write_demo_site
    from web.app import create_app
    from web.auth import ALGORITHM, ISSUER, account_of, issue_token

    cfg_path = write_demo_site(tmp, web_port=free_port(), mqtt_port=free_port())
    cfg = load_config(cfg_path)
    db = open_database(cfg.paths.database)
    migrate(db)
    users.add_user(db, "bench", "bench-password")
    db.close()
    app = create_app(cfg, load_secrets(cfg))
    context = app.extensions["carwash"]
    context.start(connect_bus=False)
    full: list[float] = []
    decode_only: list[float] = []
    try:
        with app.test_request_context("/api/v1/devices"):
            token, _ = issue_token("bench")
            secret = load_secrets(cfg).jwt_secret
            assert account_of(token) == "bench"
            for _ in range(batches):
                t0 = time.perf_counter()
                for _ in range(calls):
                    account_of(token)
                full.append((time.perf_counter() - t0) / calls * 1e6)
                t0 = time.perf_counter()
                for _ in range(calls):
                    jwt.decode(token, secret, algorithms=[ALGORITHM], issuer=ISSUER,
                               options={"require": ["exp", "sub", "iss"]})
                decode_only.append((time.perf_counter() - t0) / calls * 1e6)
    finally:
        context.stop()
    return full, decode_only


def _acl(batches: int, calls: int) -> tuple[list[float], list[float]]:
    from types import SimpleNamespace

    from gateway.access.mqtt_accounts import Account
    from gateway.mqtt.broker import ACCOUNT, AccountBook, may_publish

    book = AccountBook()
    book.replace({"backend": Account("backend", "x", "wash-backend", 0)})
    anon = SimpleNamespace(attributes={})
    account = SimpleNamespace(attributes={ACCOUNT: ("backend", 0)})
    out: dict[str, list[float]] = {"anon": [], "account": []}
    for _ in range(batches):
        for key, session, topic in (("anon", anon, "server/device-0001/streaming"),
                                    ("account", account, "wash/bay1/cmd")):
            t0 = time.perf_counter()
            for _ in range(calls):
                may_publish(session, topic, book)  # type: ignore[arg-type]
            out[key].append((time.perf_counter() - t0) / calls * 1e6)
    return out["anon"], out["account"]


def _publish_rate(n: int, rounds: int) -> tuple[list[float], list[float]]:
    import paho.mqtt.client as mqtt
    from argon2 import PasswordHasher
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.access.mqtt_accounts import Account
    from gateway.mqtt.broker import BrokerSettings, LocalBus
    from sim.demo import free_port

    async def main() -> tuple[list[float], list[float]]:
        port = free_port()
        # No per-client rate limit here: the figure is the cost of the checks, not the limit.
        bus = LocalBus(BrokerSettings("127.0.0.1", port, "bench", "bench-password-0123", True, 100,
                                      client_rate_per_sec=0))
        await bus.reload_accounts({"backend": Account("backend", PasswordHasher().hash("backend-password-1"),
                                                      "wash-backend", 0)})
        await bus.start()
        dispatcher = asyncio.create_task(bus.dispatch_forever())

        def rate(user: str | None, topic: str) -> float:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{user or 'anon'}")
            if user:
                c.username_pw_set(user, "backend-password-1")
            done = threading.Event()
            acked = [0]

            def on_publish(*_a: object) -> None:
                acked[0] += 1
                if acked[0] == n:
                    done.set()

            connected = threading.Event()
            c.on_connect = lambda *a: connected.set()
            c.on_publish = on_publish
            c.max_inflight_messages_set(100)
            c.connect("127.0.0.1", port)
            c.loop_start()
            try:
                if not connected.wait(10):
                    raise RuntimeError("no CONNACK")
                t0 = time.perf_counter()
                for _ in range(n):
                    c.publish(topic, b'{"bayId":"bay1","action":"STOP"}', qos=1)
                if not done.wait(120):
                    raise RuntimeError(f"only {acked[0]} of {n} PUBACKs")
                return n / (time.perf_counter() - t0)
            finally:
                c.disconnect()
                c.loop_stop()

        anon: list[float] = []
        account: list[float] = []
        try:
            for _ in range(rounds):
                anon.append(await asyncio.to_thread(rate, None, "server/device-0001/streaming"))
                account.append(await asyncio.to_thread(rate, "backend", "wash/bay1/cmd"))
        finally:
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
            await bus.stop()
        return anon, account

    return asyncio.run(main())


def run(quick: bool) -> list[Result]:
    batches, calls = (5, 500) if quick else (20, 2000)
    with temp_dir() as tmp:
        full, decode_only = _token_check(tmp, batches, calls)
    anon_acl, account_acl = _acl(batches, calls * 10)
    anon_rate, account_rate = _publish_rate(500 if quick else 2000, 2 if quick else 5)
    return [
        Result(NAME, "HTTP token check (JWT + account row)", "µs/request", full,
               notes=f"{calls} calls per sample; the row read is what ends sessions at once"),
        Result(NAME, "HTTP JWT decode alone", "µs/request", decode_only, notes="the page's old check"),
        Result(NAME, "MQTT publish ACL, anonymous device", "µs/publish", anon_acl),
        Result(NAME, "MQTT publish ACL, account (wash-backend)", "µs/publish", account_acl,
               notes="role looked up in the account book on every publish"),
        Result(NAME, "QoS 1 intake, anonymous (server/+/streaming)", "msg/s", anon_rate,
               notes="one paho client, 100 in flight, nothing subscribed"),
        Result(NAME, "QoS 1 intake, wash-backend account (wash/+/cmd)", "msg/s", account_rate),
    ]
