"""The web's live presence feed (web.live.PresenceFeed): what it takes from the core's retained
`gateway/live/{device_id}` messages, what it refuses, and how views merge it over the stored row."""

from __future__ import annotations

import json
import logging

import pytest

from web.live import PresenceFeed


def msg(dev: str, **over: object) -> bytes:
    body = {"device_id": dev, "online": True, "rssi": -61, "status": "NORMAL", "uptime": 42,
            "last_seen_at": "2026-12-04T02:00:05.000Z", **over}
    return json.dumps(body).encode()


def test_newer_live_state_replaces_the_rows_values_but_not_online() -> None:
    feed = PresenceFeed()
    feed.on_message("gateway/live/dev-1", msg("dev-1"))
    row = {"rssi": -80, "status": "NORMAL", "online": False, "last_seen_at": "2026-12-04T02:00:00.000Z"}
    assert feed.merge("dev-1", dict(row)) == {**row, "rssi": -61, "last_seen_at": "2026-12-04T02:00:05.000Z"}
    # A row newer than the live message (saved later by the core) wins.
    newer = {**row, "last_seen_at": "2026-12-04T02:01:00.000Z"}
    assert feed.merge("dev-1", dict(newer)) == newer
    # Another device, or a row never seen: unchanged; the pages' key name works too.
    assert feed.merge("dev-2", dict(row)) == row
    page_row = {"rssi": None, "status": None, "last_seen": None}
    assert feed.merge("dev-1", page_row, last_seen_key="last_seen") == {
        "rssi": -61, "status": "NORMAL", "last_seen": "2026-12-04T02:00:05.000Z"}


@pytest.mark.parametrize("payload", [
    b"not json", b"[]", msg("dev-9"), msg("dev-1", rssi="strong"), msg("dev-1", rssi=True),
    msg("dev-1", uptime=1.5), json.dumps({"device_id": "dev-1", "online": True}).encode(),
])
def test_bad_messages_are_counted_logged_and_change_nothing(payload: bytes, caplog: pytest.LogCaptureFixture) -> None:
    feed = PresenceFeed()
    feed.on_message("gateway/live/dev-1", msg("dev-1", rssi=-50))
    with caplog.at_level(logging.WARNING, logger="web.live"):
        feed.on_message("gateway/live/dev-1", payload)
    assert feed.bad_messages == 1
    assert [r.getMessage() for r in caplog.records][0].startswith("ignored a bad message on gateway/live/dev-1")
    live = feed.get("dev-1")
    assert live is not None and live.rssi == -50


def test_a_cleared_retained_message_forgets_the_device() -> None:
    feed = PresenceFeed()
    feed.on_message("gateway/live/dev-1", msg("dev-1"))
    feed.on_message("gateway/live/dev-1", b"")
    assert feed.get("dev-1") is None
