"""The cloud bridge's settings and the local topics it forwards (uplink.md, "MQTT bridge (live)").

Contract: `BridgeSettings` validates itself on construction (no I/O: certificate files are read
when connecting); `BridgeSettings.from_config` takes `[cloud.bridge]` and `site.id`.
`is_forwarded(topic)` says which local publishes the core hands to the bridge. `ID_RE` is what a
bay, device, charge or site id must match to be one safe topic level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.config import Config
from gateway.mqtt.topics import PRESENCE_FILTER, WASH_STATUS_FILTER, matches

# Bay, device and charge ids: one safe topic level (\Z: `$` would also take a trailing newline).
ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


@dataclass(frozen=True, kw_only=True)
class BridgeSettings:
    """Everything the bridge needs; validated here (no I/O: files are read when connecting)."""

    site_id: str
    host: str
    port: int = 8883
    tls: bool = True
    ca_file: str = ""  # empty: the system's trusted CAs (TLS settings are ignored with tls off)
    cert_file: str = ""  # client certificate (PEM) for mutual TLS; may hold the key too
    key_file: str = ""
    client_id: str = ""  # empty: carwash-gateway-{site_id}
    username: str = ""
    password: str = ""
    keepalive_sec: int = 60
    connect_timeout_sec: float = 10.0  # TCP connect, TLS handshake, and again for the CONNACK
    backoff_min_sec: float = 1.0
    backoff_max_sec: float = 60.0
    max_payload_bytes: int = 64 * 1024
    max_pending_topics: int = 10_000
    max_inbound_queue: int = 1_000
    max_inflight: int = 20

    def __post_init__(self) -> None:
        if not ID_RE.match(self.site_id):
            raise ValueError(f"site id {self.site_id!r} is not a valid topic level ({ID_RE.pattern})")
        if not self.host:
            raise ValueError("host is required")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        if not 0 < self.backoff_min_sec <= self.backoff_max_sec:
            raise ValueError("need 0 < backoff_min_sec <= backoff_max_sec")
        for name in ("keepalive_sec", "connect_timeout_sec", "max_payload_bytes", "max_pending_topics",
                     "max_inbound_queue", "max_inflight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"carwash-gateway-{self.site_id}"

    @classmethod
    def from_config(cls, config: Config, *, password: str = "", **overrides: Any) -> BridgeSettings:
        """Settings from `[cloud.bridge]` and `site.id`; `cert_file`/`key_file` are read from the
        bridge config when it has them (else pass them in `overrides`)."""
        b = config.cloud.bridge
        values: dict[str, Any] = {
            "site_id": config.site.id, "host": b.host, "port": b.port, "tls": b.tls, "ca_file": b.ca_file,
            "cert_file": getattr(b, "cert_file", ""), "key_file": getattr(b, "key_file", ""),
            "client_id": b.client_id, "username": b.username, "password": password,
            "keepalive_sec": b.keepalive_sec,
        }
        values.update(overrides)
        return cls(**values)


def is_forwarded(local_topic: str) -> bool:
    """Whether the core hands a local publish to the bridge: bay status and presence transitions.
    Not `gateway/live/{device_id}` (every streaming message, for the web only) nor anything else."""
    return matches(WASH_STATUS_FILTER, local_topic) or matches(PRESENCE_FILTER, local_topic)
