"""The pure command tracker: outcomes, SSE event order and shapes, deadlines, ignored ACKs."""

from __future__ import annotations

import pytest

from gateway.commands import catalogue
from gateway.commands.tracker import Ack, DeviceResult, Tracked, Tracker, parse_ack
from gateway.devices.validate import Invalid


def tracked(devices: list[str], command: str = "APPLY_CONFIG", *, ack: bool = True, setup: bool = True) -> Tracked:
    t = Tracked("cmd-x", command, ack, {"version": "2.0"} if command == "UPDATE_FIRMWARE" else {}, 30.0,
                setup_id="setup-x" if setup else None)
    for d in devices:
        t.results[d] = DeviceResult()
    return t


def test_the_seeds_three_device_sequence() -> None:
    tr = Tracker()
    t = tracked(["d1", "d2", "d3"])
    tr.add(t)
    assert t.progress_event() == ("progress", {"command_id": "cmd-x", "command": "APPLY_CONFIG", "setup_id": "setup-x",
                                               "total": 3, "completed": 0, "failed": 0, "timeout": 0, "pending": 3,
                                               "progress": 0})
    tr.arm("cmd-x", 100.0)
    u1 = tr.ack(Ack("cmd-x", "d1", "APPLY_CONFIG", "SUCCESS"), 1000)
    u2 = tr.ack(Ack("cmd-x", "d2", "APPLY_CONFIG", "FAILED", error="Config validation failed"), 2000)
    assert u1 is not None and u2 is not None
    assert [e for e, _ in u1.events] == ["device-success", "progress"]
    assert u1.events[0][1] == {"device_id": "d1", "command_id": "cmd-x", "command": "APPLY_CONFIG",
                               "setup_id": "setup-x", "status": "SUCCESS", "timestamp": 1000}
    assert u1.events[1][1]["progress"] == 33.33 and u2.events[1][1]["progress"] == 66.67
    assert u2.events[0] == ("device-failed", {"device_id": "d2", "command_id": "cmd-x", "command": "APPLY_CONFIG",
                                              "setup_id": "setup-x", "status": "FAILED",
                                              "error": "Config validation failed", "timestamp": 2000})
    assert tr.expire(99.9, 3000) == [] and tr.next_deadline() == 100.0
    (u3,) = tr.expire(100.0, 3000)
    assert [e for e, _ in u3.events] == ["device-timeout", "progress", "complete", "results"]
    assert u3.events[0][1]["error"] == "Device did not respond"
    assert u3.events[1][1]["progress"] == 100 and isinstance(u3.events[1][1]["progress"], int)
    assert u3.events[2][1] == {"command_id": "cmd-x", "command": "APPLY_CONFIG", "setup_id": "setup-x", "total": 3,
                               "completed": 1, "failed": 1, "timeout": 1, "status": "COMPLETED", "timestamp": 3000}
    assert [r["status"] for r in u3.events[3][1]["results"]] == ["SUCCESS", "FAILED", "TIMEOUT"]
    assert u3.completed and tr.pending == {} and tr.next_deadline() is None


def test_duplicate_late_unknown_and_stray_acks_are_ignored_and_counted() -> None:
    tr = Tracker()
    tr.add(tracked(["d1", "d2"]))
    assert tr.ack(Ack("cmd-x", "d1", "APPLY_CONFIG", "SUCCESS"), 1) is None  # not published yet
    tr.arm("cmd-x", 10.0)
    assert tr.ack(Ack("cmd-x", "d1", "APPLY_CONFIG", "SUCCESS"), 1) is not None
    assert tr.ack(Ack("cmd-x", "d1", "APPLY_CONFIG", "SUCCESS"), 2) is None
    assert tr.ack(Ack("cmd-x", "d9", "APPLY_CONFIG", "SUCCESS"), 2) is None
    assert tr.ack(Ack("cmd-x", "d2", "RESTART", "SUCCESS"), 2) is None
    assert tr.ack(Ack("cmd-x", "d2", "APPLY_CONFIG", "PROGRESS", progress={"progress": 5}), 2) is None
    tr.expire(10.0, 3)
    assert tr.ack(Ack("cmd-x", "d2", "APPLY_CONFIG", "SUCCESS"), 4) is None  # after the timeout
    assert tr.ack(Ack("cmd-x", "d1", "APPLY_CONFIG", "SUCCESS"), 4) is None  # after completion
    assert tr.ack(Ack("cmd-nope", "d1", "APPLY_CONFIG", "SUCCESS"), 4) is None
    assert dict(tr.ignored) == {"not_sent": 1, "duplicate": 2, "not_targeted": 1, "wrong_command": 1,
                                "progress_not_allowed": 1, "late": 1, "unknown": 1}
    assert tr.accepted == 1


def test_firmware_progress_is_not_final_and_error_is_a_failure() -> None:
    tr = Tracker()
    tr.add(tracked(["d1", "d2"], "UPDATE_FIRMWARE", setup=False))
    tr.arm("cmd-x", 10.0)
    p = tr.ack(Ack("cmd-x", "d1", "UPDATE_FIRMWARE", "PROGRESS", progress={"progress": 50, "bytes": 512}), 1)
    assert p is not None and p.events == [("device-progress", {
        "device_id": "d1", "command_id": "cmd-x", "command": "UPDATE_FIRMWARE", "status": "PROGRESS",
        "progress": 50, "bytes": 512, "timestamp": 1})]
    s = tr.ack(Ack("cmd-x", "d1", "UPDATE_FIRMWARE", "SUCCESS", new_version="2.1"), 2)
    assert s is not None and s.events[0][1]["new_version"] == "2.1"
    e = tr.ack(Ack("cmd-x", "d2", "UPDATE_FIRMWARE", "ERROR", error="sha256 mismatch"), 3)
    assert e is not None and e.events[0][0] == "device-failed" and e.events[0][1]["status"] == "ERROR"
    assert e.completed and e.events[-2][1]["failed"] == 1


def test_fire_and_forget_is_sent_and_done_at_once() -> None:
    tr = Tracker()
    tr.add(tracked(["d1"], "PING", ack=False, setup=False))
    u = tr.sent("cmd-x", 5)
    assert [e for e, _ in u.events] == ["command-sent", "progress", "complete", "results"]
    assert u.events[0][1] == {"device_id": "d1", "command_id": "cmd-x", "command": "PING", "status": "SENT",
                              "timestamp": 5}
    assert u.events[2][1]["completed"] == 1 and u.completed


def test_re_arming_moves_the_deadline() -> None:
    tr = Tracker()
    tr.add(tracked(["d1"]))
    tr.arm("cmd-x", 5.0)
    tr.arm("cmd-x", 7.0)
    assert tr.next_deadline() == 7.0 and tr.expire(6.0, 1) == []
    assert len(tr.expire(7.0, 1)) == 1


@pytest.mark.parametrize("msg, field", [
    ({"device_id": "d1", "command": "RESTART", "status": "SUCCESS"}, "command_id"),
    ({"command_id": "c", "device_id": "d2", "command": "RESTART", "status": "SUCCESS"}, "device_id"),
    ({"command_id": "c", "command": "RESTART", "status": "DONE"}, "status"),
    ({"command_id": "c", "command": "RESTART", "status": "PROGRESS", "progress": 101}, "progress"),
    ({"command_id": "c", "command": "RESTART", "status": "FAILED", "error": 5}, "error"),
])
def test_bad_acks_name_the_field(msg: dict, field: str) -> None:
    with pytest.raises(Invalid) as e:
        parse_ack("d1", msg)
    assert e.value.field == field


def test_catalogue_checks_payloads_and_configs() -> None:
    ct = catalogue.command_type("RESTART")
    assert ct.require_ack and not catalogue.command_type("PING").require_ack
    with pytest.raises(Invalid, match="payload.delay_seconds"):
        catalogue.check_payload(ct, {"delay_seconds": -1})
    with pytest.raises(Invalid, match="payload.sha256"):
        catalogue.check_payload(catalogue.command_type("UPDATE_FIRMWARE"),
                                {"url": "http://x/f.bin", "version": "1", "sha256": "abc"})
    with pytest.raises(Invalid, match="command"):
        catalogue.command_type("SELF_DESTRUCT")
    with pytest.raises(Invalid) as e:
        catalogue.check_configs("dev-1", "CAR_WASH", {"machine": {}})
    assert e.value.field.startswith("device dev-1: configs")
    ids = {catalogue.new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(len(i) == 25 and i[0] == "c" for i in ids)


def test_warm_builds_every_config_validator() -> None:
    from gateway.devices import schemas

    schemas._validator.cache_clear()
    catalogue.warm()
    assert schemas._validator.cache_info().currsize == len(schemas.SCHEMA_FILES)
