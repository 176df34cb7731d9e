"""gateway.core.app: the core's parts are built in order and stopped in reverse, also when one fails."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading

import pytest

from gateway.config import BayConfig
from gateway.core.app import CoreApp
from gateway.core.sdnotify import Notifier
from tests.conftest import Site


async def test_a_part_that_fails_to_start_stops_the_parts_started_before_it(site: Site) -> None:
    cfg = site.config
    # The wash service fails in its start() (the profile is checked there, not by the config
    # loader), after the store, the broker and its own database thread are up: all of them must
    # be stopped (the harness fails the test on a leaked thread or task: `wash-db`, the broker's).
    bad = dataclasses.replace(cfg, bays=(BayConfig(id="bay1", bus="rs485", profile="no-such-profile"),))
    app = CoreApp(bad, site.secrets, Notifier({}))
    with pytest.raises(ValueError, match="unknown profile") as failure:
        await app.run(asyncio.Event())
    # Joined by the wash service's stop, not left to the garbage collector (the traceback in
    # `failure` still holds the service).
    assert failure.value is not None
    assert not [t.name for t in threading.enumerate() if t.name.startswith("wash-db")]
    assert not app.ready.is_set()
    with pytest.raises(RuntimeError, match="not running"):
        _ = app.parts
    with socket.socket() as s:  # the broker's listener is closed
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((cfg.mqtt.bind, cfg.mqtt.port))
