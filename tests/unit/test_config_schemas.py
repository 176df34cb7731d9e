"""The config-document schemas accept the seed's examples and name the failing field."""

from __future__ import annotations

import copy

import pytest

from gateway.devices.schemas import validate_configs
from gateway.devices.validate import Invalid
from tests.test_device_api import STARTUP

CAR = STARTUP["payload"]["configs"]
HELMET = {"machine": dict(CAR["machine"]),
          "pricing": {"BASE_FEE": 30, "PROMOTION": 0, "WORK_PERIOD": 600},
          "function_start": {"DUST_BLOW": 0, "SANITIZE": 50, "UV": 100, "OZONE": 200, "DRY_BLOW": 300, "PERFUME": 400},
          "function_end": {"DUST_BLOW": 50, "SANITIZE": 100, "UV": 200, "OZONE": 300, "DRY_BLOW": 400, "PERFUME": 600}}


def test_seed_examples_are_valid() -> None:
    validate_configs("CAR_WASH", CAR)
    validate_configs("HELMET_DRYER", HELMET)


@pytest.mark.parametrize(
    ("kind", "path", "value", "field"),
    [
        ("CAR_WASH", ("function", "sec_per_baht", "FOAM"), -1, "configs.function.sec_per_baht.FOAM"),
        ("CAR_WASH", ("machine", "ON_TIME"), "25:00", "configs.machine.ON_TIME"),
        ("CAR_WASH", ("machine", "QR"), "yes", "configs.machine.QR"),
        ("HELMET_DRYER", ("pricing", "BASE_FEE"), 1.5, "configs.pricing.BASE_FEE"),
        ("HELMET_DRYER", ("function_end", "UV"), 99, "configs.function_end.UV"),
    ],
)
def test_invalid_values_name_the_field(kind: str, path: tuple[str, ...], value: object, field: str) -> None:
    doc = copy.deepcopy(CAR if kind == "CAR_WASH" else HELMET)
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    with pytest.raises(Invalid) as err:
        validate_configs(kind, doc)
    assert err.value.field == field


def test_unknown_and_missing_keys() -> None:
    with pytest.raises(Invalid, match="configs: 'function' is a required property"):
        validate_configs("CAR_WASH", {"machine": CAR["machine"]})
    with pytest.raises(Invalid, match="configs.machine"):
        validate_configs("CAR_WASH", {**CAR, "machine": {**CAR["machine"], "TURBO": True}})
