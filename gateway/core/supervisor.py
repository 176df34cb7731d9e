"""Restart-with-backoff for the core's long-lived tasks.

Each service is an async callable that runs until cancelled. If it returns or raises, the
supervisor logs it (the first failure with its traceback, repeats in one line), waits with an
exponential backoff (reset after the service ran `stable_after` seconds) and starts it again.
All services live in one TaskGroup owned by `Supervisor.run()`; cancelling that cancels them all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Service:
    name: str
    run: Callable[[], Awaitable[None]]
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 60.0
    failures: int = field(default=0, init=False)
    restarts: int = field(default=0, init=False)


class Supervisor:
    def __init__(self, services: list[Service]) -> None:
        self.services = services

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for s in self.services:
                tg.create_task(self._keep_running(s), name=f"svc:{s.name}")

    async def _keep_running(self, s: Service) -> None:
        delay = s.backoff_min
        while True:
            started = time.monotonic()
            try:
                await s.run()
                log.warning("service %s returned; restarting in %.1f s", s.name, delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                s.failures += 1
                if s.failures == 1:
                    log.exception("service %s failed; restarting in %.1f s", s.name, delay)
                else:
                    log.error("service %s failed again (%d): %s; restarting in %.1f s", s.name, s.failures, exc, delay)
            if time.monotonic() - started >= s.stable_after:
                delay = s.backoff_min
            await asyncio.sleep(delay)
            s.restarts += 1
            delay = min(delay * 2, s.backoff_max)
