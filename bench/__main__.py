"""`python -m bench [--quick] [--only NAME] [--out PATH]`: run the benchmarks, print the table,
write every result (with its samples) as JSON. Exit status 1 if any benchmark failed."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import (
    access_checks,
    bridge,
    broker_throughput,
    chaos,
    commands,
    commit_cost,
    connect_storm,
    core_start,
    devices,
    fuzz_api,
    late_replies,
    memory,
    mqtt_abuse,
    payments,
    powercut,
    restart_storm,
    soak,
    uplink_drain,
    upload_writes,
    wash_bays,
)
from bench.common import DEFAULT_OUT, Result, environment, log, table, write_json

BENCHMARKS: dict[str, Callable[[bool], list[Result]]] = {
    core_start.NAME: core_start.run,
    memory.NAME: memory.run,
    broker_throughput.NAME: broker_throughput.run,
    wash_bays.NAME: wash_bays.run,
    late_replies.NAME: late_replies.run,
    devices.NAME: devices.run,
    commands.NAME: commands.run,
    uplink_drain.NAME: uplink_drain.run,
    upload_writes.NAME: upload_writes.run,
    restart_storm.NAME: restart_storm.run,
    commit_cost.NAME: commit_cost.run,
    payments.NAME: payments.run,
    bridge.NAME: bridge.run,
    connect_storm.NAME: connect_storm.run,
    mqtt_abuse.NAME: mqtt_abuse.run,
    chaos.NAME: chaos.run,
    powercut.NAME: powercut.run,
    soak.NAME: soak.run,
    fuzz_api.NAME: fuzz_api.run,
    access_checks.NAME: access_checks.run,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and messages (~1 min)")
    ap.add_argument("--only", choices=sorted(BENCHMARKS), metavar="NAME", action="append",
                    help=f"run this benchmark (repeat for several): {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results file (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)

    names = [n for n in BENCHMARKS if n in args.only] if args.only else list(BENCHMARKS)
    env = environment()
    results: list[Result] = []
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}
    t_all = time.monotonic()
    for name in names:
        log(f"{name}: start{' (quick)' if args.quick else ''}")
        t0 = time.monotonic()
        try:
            results += BENCHMARKS[name](args.quick)
        except Exception as exc:  # one failing benchmark does not hide the others
            errors[name] = "".join(traceback.format_exception(exc))
            log(f"{name}: FAILED: {exc}")
        durations[name] = round(time.monotonic() - t0, 2)
        log(f"{name}: done in {durations[name]:.1f} s")
    total = round(time.monotonic() - t_all, 2)

    print(table(results))
    for name, tb in errors.items():
        print(f"\n{name} FAILED:\n{tb}", file=sys.stderr)
    write_json(args.out, {
        "mode": "quick" if args.quick else "full",
        "benchmarks": names,
        "environment": env,
        "durations_s": durations,
        "total_s": total,
        "results": [r.as_dict() for r in results],
        "errors": errors,
    })
    print(f"\n{len(results)} results in {total:.0f} s ({'quick' if args.quick else 'full'} mode); "
          f"written to {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
