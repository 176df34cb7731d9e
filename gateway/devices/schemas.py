"""Typed schemas of the config documents devices take (data files in gateway/data/schemas/).

`validate_configs(device_type, configs)` raises `Invalid` naming the first failing field as a
dotted path (`function.sec_per_baht.FOAM`). Used for APPLY_CONFIG and by the technician's forms;
what a device *reports* is stored as sent and never validated against these.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

from gateway.devices.validate import Invalid

SCHEMA_FILES = {"CAR_WASH": "car_wash.configs.schema.json", "HELMET_DRYER": "helmet_dryer.configs.schema.json"}


@functools.cache
def schema(device_type: str) -> dict[str, Any]:
    name = SCHEMA_FILES.get(device_type)
    if name is None:
        raise KeyError(f"no config schema for device type {device_type!r}")
    return json.loads(resources.files("gateway").joinpath(f"data/schemas/{name}").read_text())  # type: ignore[no-any-return]


@functools.cache
def _validator(device_type: str) -> Draft202012Validator:
    s = schema(device_type)
    Draft202012Validator.check_schema(s)
    return Draft202012Validator(s)


def validate_configs(device_type: str, configs: Any, *, prefix: str = "configs") -> None:
    errors = sorted(_validator(device_type).iter_errors(configs), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = ".".join([prefix, *(str(p) for p in e.absolute_path)])
        raise Invalid(path, e.message)
    if device_type == "HELMET_DRYER":
        for name, end in configs["function_end"].items():
            if end < configs["function_start"][name]:
                raise Invalid(f"{prefix}.function_end.{name}", "must not be before function_start")
