"""Connection storm on the embedded broker (what a gateway restart looks like to 1,000+ devices).

The core's LocalBus on an ephemeral port; N aiomqtt clients (client id = device id) connect, 50 at
a time, each subscribing its `device/{id}/command`; then all disconnect. Times for both phases at
1,000 and 2,000 clients (quick: 300 and 600): growth faster than linear means per-session work
that grows with the number of sessions.
"""

from __future__ import annotations

import asyncio
import time

import aiomqtt

from bench.common import Result
from gateway.mqtt.broker import BrokerSettings, LocalBus
from sim.demo import free_port

NAME = "connect_storm"


async def _storm(n: int) -> tuple[float, float]:
    port = free_port()
    bus = LocalBus(BrokerSettings("127.0.0.1", port, "bench", "bench-password-0123", True, n + 100))
    await bus.start()
    dispatcher = asyncio.create_task(bus.dispatch_forever())
    clients: list[aiomqtt.Client] = []
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with sem:
            c = aiomqtt.Client("127.0.0.1", port, identifier=f"device-{i:05d}")
            await c.__aenter__()
            await c.subscribe(f"device/device-{i:05d}/command", qos=1)
            clients.append(c)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        connect = time.perf_counter() - t0
        t1 = time.perf_counter()
        for c in clients:
            await c.__aexit__(None, None, None)
        await bus.wait_clients(lambda ids: not ids, 120)
        disconnect = time.perf_counter() - t1
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
        await bus.stop()
    return connect, disconnect


def run(quick: bool) -> list[Result]:
    out = []
    for n in ((300, 600) if quick else (1000, 2000)):
        connect, disconnect = asyncio.run(_storm(n))
        out.append(Result(NAME, f"{n} clients connect + subscribe", "s", [connect],
                          notes=f"{n / connect:,.0f} sessions/s, 50 connecting at a time"))
        out.append(Result(NAME, f"{n} clients disconnect", "s", [disconnect]))
    return out


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
