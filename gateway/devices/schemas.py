"""Typed schemas of the config documents devices take (data files in gateway/data/schemas/).

`validate_configs(device_type, configs)` raises `Invalid` naming the first failing field as a
dotted path (`function.sec_per_baht.FOAM`). Used for APPLY_CONFIG and by the technician's forms;
what a device *reports* is stored as sent and never validated against these.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators

from gateway.devices.validate import Invalid

SCHEMA_FILES = {"CAR_WASH": "car_wash.configs.schema.json", "HELMET_DRYER": "helmet_dryer.configs.schema.json"}


@functools.lru_cache(maxsize=256)
def python_regex(pattern: str) -> re.Pattern[str]:
    """A JSON Schema (ECMA-262) `pattern` for Python's `re`: an unescaped `$` outside a character
    class becomes `\\Z`. In ECMA-262 `$` is the end of the string; in Python it also matches before
    a trailing newline, so "http://x/a.bin\\n" passed `^https?://[^\\s]+$`."""
    out, in_class, i = [], False, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "$":
            c = "\\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: Any, _schema: Any) -> Iterator[ValidationError]:
    # jsonschema's own `pattern` with `re.search(pattern, ...)`, on the pattern read as ECMA-262.
    if validator.is_type(instance, "string") and not python_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


# The validator of every JSON Schema the gateway checks input with (configs, command payloads).
Validator = validators.extend(Draft202012Validator, {"pattern": _pattern})


@functools.cache
def schema(device_type: str) -> dict[str, Any]:
    name = SCHEMA_FILES.get(device_type)
    if name is None:
        raise KeyError(f"no config schema for device type {device_type!r}")
    loaded: dict[str, Any] = json.loads(resources.files("gateway").joinpath(f"data/schemas/{name}").read_text())
    return loaded


@functools.cache
def _validator(device_type: str) -> Any:
    s = schema(device_type)
    Validator.check_schema(s)
    return Validator(s)


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
