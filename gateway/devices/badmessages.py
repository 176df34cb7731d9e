"""Malformed device messages per device (core memory): the technician sees why a command timed out.

A signed ACK or streaming message that fails its signature, is not JSON, or has an invalid field is
dropped (it cannot be trusted), and the command it answered would only show TIMEOUT 30 s later.
`BadMessages` counts such drops per device id (taken from the topic) and keeps the last reason;
the core answers RPC `devices.bad_messages {device_id}` from it and the device's page shows it.
Messages from unregistered ids are not counted here (they have no page; the presence service
counts them per reason). Bounded: at most `MAX_DEVICES` ids, the least recently hit forgotten.
Kept in memory only: the counts restart with the core.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gateway.clock import iso_z

Kind = Literal["ack", "streaming"]


@dataclass
class BadRecord:
    ack: int = 0
    streaming: int = 0
    last_kind: str = ""
    last_reason: str = ""
    last_detail: str = ""
    last_at: str = ""


class BadMessages:
    MAX_DEVICES = 10_000
    MAX_DETAIL = 200

    def __init__(self) -> None:
        self._by_device: OrderedDict[str, BadRecord] = OrderedDict()

    def add(self, device_id: str, kind: Kind, reason: str, detail: str) -> None:
        rec = self._by_device.get(device_id)
        if rec is None:
            rec = self._by_device[device_id] = BadRecord()
            while len(self._by_device) > self.MAX_DEVICES:
                self._by_device.popitem(last=False)
        else:
            self._by_device.move_to_end(device_id)
        setattr(rec, kind, getattr(rec, kind) + 1)
        rec.last_kind, rec.last_reason, rec.last_detail = kind, reason, detail[:self.MAX_DETAIL]
        rec.last_at = iso_z()

    def get(self, device_id: str) -> dict[str, Any] | None:
        rec = self._by_device.get(device_id)
        return asdict(rec) if rec is not None else None
