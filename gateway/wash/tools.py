"""The technician's bus tools on the command line: `scan-bus`, `reset-bay`, and the serial-device
check of `check-config`. The core owns the serial ports and decides every command, so the first
two ask the running core over the local broker (RPC), as the web does.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Any

from gateway.config import Config, config_path, load_config, load_secrets

BY_ID = "/dev/serial/by-id"


def _core_call(cfg: Config, tool: str, method: str, params: dict[str, Any], timeout: float) -> Any:
    """One RPC to the running core; prints the reason and returns None when it cannot be made."""
    from gateway.mqtt.client import BusClient, BusUnavailable, RpcTimeout
    from gateway.mqtt.rpc import RpcError

    secrets = load_secrets(cfg)
    host = "127.0.0.1" if cfg.mqtt.bind in ("0.0.0.0", "::", "") else cfg.mqtt.bind
    client = BusClient(host, cfg.mqtt.port, cfg.mqtt.internal_username, secrets.mqtt_internal_password, name=tool)
    client.start()
    try:
        if not client.wait_connected(10):
            print(f"{tool}: the core's broker does not answer (is the core running?)", file=sys.stderr)
            return None
        return client.call(method, params, timeout=timeout)
    except (BusUnavailable, RpcTimeout, RpcError) as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return None
    finally:
        client.stop()


def cmd_scan_bus(args: argparse.Namespace) -> int:
    """Ask the running core to probe unit ids × bases on one of its buses."""
    cfg = load_config(config_path(args.config))
    params: dict[str, Any] = {"bus": args.bus, "first": args.first, "last": args.last, "profile": args.profile}
    if args.base:
        params["bases"] = args.base
    result = _core_call(cfg, "scan-bus", "wash.scan", params, timeout=300)
    if result is None:
        return 1
    print(f"bus {result['bus']}, profile {result['profile']}, bases {', '.join(map(str, result['bases']))}")
    if result.get("ignores_unit_id"):
        print("the PLC answers every unit id (it ignores the unit id, as many Modbus TCP PLCs do): "
              "shown once, under the first id; any unit id reaches it")
    for u in result["units"]:
        where = f"unit {u['unit']:3d} base {u['base']:5d}"
        if "registers" in u:
            d = u.get("decoded")
            what = (f"{d['state']} progress {d['progress']} course {d['course'] or '-'} error {d['error'] or '-'}"
                    if d else f"does not decode: {u.get('decode_error')}")
            print(f"{where}: answers {u['registers']}  {what}")
        else:
            print(f"{where}: {u['error']}")
    return 0


def cmd_reset_bay(args: argparse.Namespace) -> int:
    """Ask the core to clear a bay's latched PLC error (RESET_ERROR), recorded as `cli:USER`."""
    cfg = load_config(config_path(args.config))
    by = f"cli:{getpass.getuser()}"
    result = _core_call(cfg, "reset-bay", "wash.command", {"bayId": args.bay, "action": "RESET", "by": by},
                        timeout=10)
    if result is None:
        return 1
    print(f"{args.bay}: reset sent (requestId {result['requestId']}); "
          "the outcome is in the bay's status and in `status`")
    return 0


def serial_device_warnings(cfg: Config, by_id: str = BY_ID) -> list[str]:
    """One line per rtu bus whose device does not exist now (it may be plugged in later), naming
    the stable /dev/serial/by-id names of the adapters that are there."""
    present = sorted(str(p) for p in Path(by_id).iterdir()) if os.path.isdir(by_id) else []
    out = []
    for i, bus in enumerate(cfg.buses):
        if bus.type != "rtu" or os.path.exists(bus.device):
            continue
        hint = (f"adapters present: {', '.join(present)}" if present
                else f"no serial adapter is plugged in ({by_id} is empty)")
        out.append(f"{cfg.source}: buses[{i}].device: {bus.device} does not exist (yet?); the bus stays offline "
                   f"until it does; {hint}. Prefer the stable {by_id}/... name over /dev/ttyUSBn.")
    return out
