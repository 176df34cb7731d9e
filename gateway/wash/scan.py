"""`wash.scan`: probing unit ids × base addresses on one PLC bus (RPC of the core, CLI `scan-bus`).

Contract: `scan(schedulers, profiles, configured_bases, params)` validates `params` (bus, profile,
first..last, bases; `RpcError` 400 naming the field, 503 `PLC_OFFLINE` for a down bus), then reads
the poll block at each unit × base between the bus's polls (at most `SCAN_MAX_PROBES` reads) and
decodes each answer with the profile when it decodes. On TCP, a PLC that answers a unit id no bay
uses (247) ignores unit ids: it is read once and `ignores_unit_id` says so.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.mqtt.rpc import RpcError
from plc.bus import BusScheduler, PlcError
from plc.profile import DecodeError, Profile, decode_status

log = logging.getLogger(__name__)

SCAN_MAX_UNITS = 32
SCAN_MAX_PROBES = 128  # unit ids × bases of one scan


async def scan(schedulers: dict[str, BusScheduler], profiles: dict[str, Profile],
               configured_bases: dict[str, set[int]], params: dict[str, Any]) -> dict[str, Any]:
    """Probe unit ids `first..last` × `bases` on one bus; `bases` defaults to 0 and the bases the
    site configures on that bus (`configured_bases[bus]`)."""
    bus, profile_name = params.get("bus"), params.get("profile", "washbay-v1")
    first, last, bases = params.get("first", 1), params.get("last", 16), params.get("bases")
    scheduler = schedulers.get(bus) if isinstance(bus, str) else None
    if scheduler is None:
        raise RpcError("VALIDATION_FAILED", f"bus must be one of {', '.join(schedulers) or '(none)'}", 400)
    profile = profiles.get(profile_name) if isinstance(profile_name, str) else None
    if profile is None:
        raise RpcError("VALIDATION_FAILED", f"profile must be one of {', '.join(profiles)}", 400)
    if not (isinstance(first, int) and isinstance(last, int) and 1 <= first <= last <= 247
            and last - first < SCAN_MAX_UNITS):
        raise RpcError("VALIDATION_FAILED", f"first..last: unit ids 1..247, at most {SCAN_MAX_UNITS}", 400)
    if bases is None:
        bases = sorted({0} | configured_bases.get(str(bus), set()))
    if not (isinstance(bases, list) and bases and all(isinstance(x, int) and 0 <= x <= 65000 for x in bases)):
        raise RpcError("VALIDATION_FAILED", "bases: a list of base addresses 0..65000", 400)
    bases = sorted(set(bases))
    if (last - first + 1) * len(bases) > SCAN_MAX_PROBES:
        raise RpcError("VALIDATION_FAILED", f"at most {SCAN_MAX_PROBES} unit id × base probes per scan", 400)
    if not scheduler.connected:
        # A down bus answers nothing, and each read would wait for the next failed reconnect:
        # a scan took minutes, and held up every other RPC meanwhile.
        raise RpcError("PLC_OFFLINE", f"bus {bus} is down; nothing to scan", 503)
    ignores_unit_id = False
    if scheduler.settings.type == "tcp":
        try:
            await scheduler.read(247, bases[0] + profile.poll_offset, profile.poll_count)
            ignores_unit_id = True
        except PlcError:
            pass
    units = []
    for unit in range(first, first + 1 if ignores_unit_id else last + 1):
        for base in bases:
            units.append(await _probe(scheduler, profile, unit, base))
    log.info("scan of bus %s units %d..%d, bases %s: %d answered%s", bus, first, last, bases,
             sum(1 for u in units if "registers" in u), "; the PLC ignores unit ids" if ignores_unit_id else "")
    return {"bus": bus, "profile": profile.name, "bases": bases, "ignores_unit_id": ignores_unit_id,
            "units": units}


async def _probe(scheduler: BusScheduler, profile: Profile, unit: int, base: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"unit": unit, "base": base}
    try:
        regs = await scheduler.read(unit, base + profile.poll_offset, profile.poll_count)
    except PlcError as exc:
        entry["error"] = str(exc)
        return entry
    entry["registers"] = regs
    try:
        st = decode_status(profile, regs)
        entry["decoded"] = {"state": st.state, "progress": st.progress, "course": st.course,
                            "error": st.error_name or (st.error_code or None)}
    except DecodeError as exc:
        entry["decoded"] = None
        entry["decode_error"] = str(exc)
    return entry
