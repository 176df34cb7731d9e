"""PLC register profiles (data files) and the pure codec between registers and bay status.

A profile says where a bay's registers sit relative to its base address and what their values
mean (states, commands, courses, error codes). `decode_status` turns one poll block into a
`PlcStatus` or raises `DecodeError` naming the field; `encode_command` gives the registers of
the command block. No I/O here except reading profile files.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

STATE_NAMES = ("IDLE", "STARTING", "WASHING", "DONE", "CANCELED", "ERROR")
REGISTER_NAMES = ("cmd", "cmd_course", "cmd_seq", "state", "progress", "ack_seq", "error_code", "course",
                  "heartbeat", "session_counter")
COMMANDS = ("START", "STOP", "RESET_ERROR")


class ProfileError(ValueError):
    """A profile file is unusable; the message names the file and the key."""


class DecodeError(ValueError):
    """A poll reply holds a value the profile does not allow; names the field."""

    def __init__(self, field_name: str, value: object) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"{field_name}={value}")


@dataclass(frozen=True)
class Profile:
    name: str
    span: int
    registers: Mapping[str, int]
    poll_offset: int
    poll_count: int
    command_offset: int
    states: Mapping[int, str]
    commands: Mapping[str, int]
    courses: Mapping[int, str]
    error_codes: Mapping[int, str]
    _course_codes: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def course_code(self, name: str) -> int | None:
        return self._course_codes.get(name)

    def course_name(self, code: int) -> str | None:
        return self.courses.get(code) if code else None

    def error_name(self, code: int) -> str | None:
        if code == 0:
            return None
        return self.error_codes.get(code, f"PLC_ERROR_{code}")


@dataclass(frozen=True)
class PlcStatus:
    state: str
    progress: int
    ack_seq: int
    error_code: int
    error_name: str | None
    course: str | None
    course_code: int
    heartbeat: int
    session_counter: int


def _int_keyed(table: Any, file: str, key: str) -> dict[int, str]:
    if not isinstance(table, dict):
        raise ProfileError(f"{file}: {key}: must be a table")
    out: dict[int, str] = {}
    for k, v in table.items():
        if not k.isdigit() or not isinstance(v, str) or not v:
            raise ProfileError(f"{file}: {key}.{k}: keys must be register values, values names")
        out[int(k)] = v
    return out


def _req_int(data: Any, file: str, key: str, lo: int = 0, hi: int = 65535) -> int:
    v = data
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            raise ProfileError(f"{file}: {key}: missing")
        v = v[part]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProfileError(f"{file}: {key}: must be an integer from {lo} to {hi}")
    return v


def parse_profile(data: dict[str, Any], file: str) -> Profile:
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{file}: name: missing")
    span = _req_int(data, file, "span", 1, 1000)
    regs = {r: _req_int(data, file, f"registers.{r}", 0, span - 1) for r in REGISTER_NAMES}
    poll_offset = _req_int(data, file, "poll.offset", 0, span - 1)
    poll_count = _req_int(data, file, "poll.count", 1, 125)
    for r in ("state", "progress", "ack_seq", "error_code", "course", "heartbeat"):
        if not poll_offset <= regs[r] < poll_offset + poll_count:
            raise ProfileError(f"{file}: registers.{r}: outside the poll block")
    if not poll_offset <= regs["session_counter"] <= poll_offset + poll_count - 2:
        raise ProfileError(f"{file}: registers.session_counter: its two words must be in the poll block")
    command_offset = _req_int(data, file, "command.offset", 0, span - 3)
    states = _int_keyed(data.get("states"), file, "states")
    if sorted(states.values()) != sorted(STATE_NAMES):
        raise ProfileError(f"{file}: states: must name exactly {', '.join(STATE_NAMES)}")
    commands = data.get("commands")
    if not isinstance(commands, dict) or set(commands) != set(COMMANDS):
        raise ProfileError(f"{file}: commands: must give codes for {', '.join(COMMANDS)}")
    cmds = {k: _req_int(commands, file, k, 1, 65535) for k in COMMANDS}
    courses = _int_keyed(data.get("courses"), file, "courses")
    if not courses or 0 in courses:
        raise ProfileError(f"{file}: courses: at least one, codes from 1")
    errors = _int_keyed(data.get("error_codes", {}), file, "error_codes")
    unknown = set(data) - {"name", "span", "registers", "poll", "command", "states", "commands", "courses",
                           "error_codes"}
    if unknown:
        raise ProfileError(f"{file}: {sorted(unknown)[0]}: unknown key")
    return Profile(name, span, regs, poll_offset, poll_count, command_offset, states, cmds, courses, errors,
                   {v: k for k, v in courses.items()})


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ProfileError(f"{p}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{p}: not valid TOML: {exc}") from None
    return parse_profile(data, str(p))


def builtin_profiles() -> dict[str, Profile]:
    out: dict[str, Profile] = {}
    for entry in resources.files("plc").joinpath("profiles").iterdir():
        if entry.name.endswith(".toml"):
            prof = parse_profile(tomllib.loads(entry.read_text()), f"plc/profiles/{entry.name}")
            out[prof.name] = prof
    return out


def load_profiles(extra_paths: Sequence[str] = ()) -> dict[str, Profile]:
    profiles = builtin_profiles()
    for path in extra_paths:
        prof = load_profile(path)
        if prof.name in profiles:
            raise ProfileError(f"{path}: name: profile {prof.name!r} is already defined")
        profiles[prof.name] = prof
    return profiles


def decode_status(profile: Profile, registers: Sequence[int]) -> PlcStatus:
    """One poll block (profile.poll_count registers from poll_offset) → PlcStatus."""
    if len(registers) != profile.poll_count:
        raise DecodeError("registers", len(registers))

    def reg(name: str) -> int:
        return int(registers[profile.registers[name] - profile.poll_offset])

    state_code = reg("state")
    state = profile.states.get(state_code)
    if state is None:
        raise DecodeError("state", state_code)
    progress = reg("progress")
    if progress > 100:
        raise DecodeError("progress", progress)
    course_code = reg("course")
    if course_code and course_code not in profile.courses:
        raise DecodeError("course", course_code)
    error_code = reg("error_code")
    i = profile.registers["session_counter"] - profile.poll_offset
    counter = (int(registers[i]) << 16) | int(registers[i + 1])
    return PlcStatus(state=state, progress=progress, ack_seq=reg("ack_seq"), error_code=error_code,
                     error_name=profile.error_name(error_code), course=profile.course_name(course_code),
                     course_code=course_code, heartbeat=reg("heartbeat"), session_counter=counter)


def encode_command(profile: Profile, action: str, course_code: int, seq: int) -> list[int]:
    """Registers cmd, cmd_course, cmd_seq for one write-multiple at the command block."""
    if action not in profile.commands:
        raise ValueError(f"unknown action {action!r}")
    if not 1 <= seq <= 65535:
        raise ValueError("seq must be 1..65535")
    if not 0 <= course_code <= 65535:
        raise ValueError("course code out of range")
    block = [0, 0, 0]
    base = profile.command_offset
    block[profile.registers["cmd"] - base] = profile.commands[action]
    block[profile.registers["cmd_course"] - base] = course_code
    block[profile.registers["cmd_seq"] - base] = seq
    return block


def next_seq(seq: int) -> int:
    return seq % 65535 + 1
