"""The command catalogue (data in `gateway/data/commands.json`) and payload validation, pure.

`check_payload(command, payload)` raises `Invalid` naming the failing field as `payload.<path>`;
`check_configs(device_id, device_type, configs)` checks APPLY_CONFIG against the device type's
config schema and names the device too. `warm()` builds those validators ahead of use.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from gateway.devices.schemas import SCHEMA_FILES, Validator, validate_configs
from gateway.devices.validate import Invalid

ACK_STATUSES = ("SUCCESS", "FAILED", "PROGRESS", "ERROR")
FINAL_FAILURES = ("FAILED", "ERROR")
MAX_DEVICES = 5000  # one request; a site has at most a few hundred devices


@dataclass(frozen=True)
class CommandType:
    name: str
    require_ack: bool
    validator: Any  # gateway.devices.schemas.Validator


@functools.cache
def catalogue() -> dict[str, CommandType]:
    raw = json.loads(resources.files("gateway").joinpath("data/commands.json").read_text())
    out = {}
    for name, entry in raw.items():
        if name.startswith("$"):
            continue
        Validator.check_schema(entry["payload"])
        out[name] = CommandType(name, bool(entry["require_ack"]), Validator(entry["payload"]))
    return out


def command_type(name: Any) -> CommandType:
    types = catalogue()
    if not isinstance(name, str) or name not in types:
        raise Invalid("command", f"must be one of {', '.join(types)}")
    return types[name]


def check_payload(ct: CommandType, payload: Any) -> dict[str, Any]:
    if payload is None:
        payload = {}
    errors = sorted(ct.validator.iter_errors(payload), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise Invalid(".".join(["payload", *(str(p) for p in e.absolute_path)]), e.message)
    checked: dict[str, Any] = payload  # the schema requires an object
    return checked


def check_configs(device_id: str, device_type: str, configs: Any) -> None:
    if device_type not in ("CAR_WASH", "HELMET_DRYER"):
        raise Invalid(f"device {device_id}", f"its type is {device_type}; configs cannot be checked for it")
    try:
        validate_configs(device_type, configs)
    except Invalid as exc:
        raise Invalid(f"device {device_id}: {exc.field}", str(exc).split(": ", 1)[1]) from None


def warm() -> None:
    """Check and compile every device type's config schema now (cached for the process): 30 to 100
    ms of jsonschema work that the first APPLY_CONFIG after a start would otherwise wait for on the
    bus dispatcher, in front of its answer."""
    for device_type in SCHEMA_FILES:
        try:
            validate_configs(device_type, {})
        except Invalid:
            pass  # an empty document is refused: what counts is that the validator is built


_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_counter = 0


def _b36(n: int, width: int) -> str:
    s = ""
    while n:
        n, r = divmod(n, 36)
        s = _B36[r] + s
    return s.rjust(width, "0")[-width:]


def new_id() -> str:
    """A 25-character collision-resistant id like the seed's `cmfwv9cqw0001u20olfjb9nyx` (cuid style:
    `c`, time, counter, randomness), so ids sort roughly by creation."""
    global _counter
    _counter = (_counter + 1) % 36**4
    rand = int.from_bytes(os.urandom(8), "big")
    return "c" + _b36(time.time_ns() // 1_000_000, 8) + _b36(_counter, 4) + _b36(rand, 12)
