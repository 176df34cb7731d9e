"""Fuzzing figures (the hardening issue): the large schemathesis run against a real core and
gunicorn, every operation of /api/openapi.json.

The harness is tests/fuzzing.py, the same one tests/test_fuzz_api.py runs with a small budget:
here many more examples per operation and generation mode, and scope `all` (the HTML pages, the
firmware download and the event streams too, each stream read for a second). Findings are
figures, not failures: 5xx other than the documented 503s, error responses that are not the
envelope of device-api.md §1, invalid rows found in the database afterwards, and the rest
(signed requests refused, transport errors). The site has a cloud simulator (payments are stored)
and one bay on a PLC that never answers (the wash API reaches the core).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from bench.common import Result, log, start_notified
from sim.cloud import CloudSim
from sim.demo import DEMO_CLOUD_KEY, ensure_demo_user, free_port, write_demo_site
from sim.procs import gateway_command, stop_process
from tests.fuzzing import Budget, Report, Target, run as fuzz, site_toml

NAME = "fuzz_api"
SEED = 20_250_923


def _run_site(max_examples: int) -> Report:
    sim = CloudSim(DEMO_CLOUD_KEY, site_id="demo-site").start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as d:
            tmp = Path(d)
            cfg = write_demo_site(tmp / "site", web_port=free_port(), mqtt_port=free_port(),
                                  extra_toml=site_toml(sim.url, free_port()))
            ensure_demo_user(cfg)
            core, cn = start_notified(gateway_command("core", "--config", str(cfg)), tmp, "core")
            try:
                web, wn = start_notified(gateway_command("web", "--config", str(cfg)), tmp, "web",
                                         wait_connected=True)
                try:
                    return fuzz(Target.from_config(cfg), Budget(max_examples=max_examples, seed=SEED, scope="all"))
                finally:
                    stop_process(web)  # type: ignore[arg-type]
                    wn.close()
            finally:
                stop_process(core)  # type: ignore[arg-type]
                cn.close()
    finally:
        sim.stop()


OTHER_KINDS = ("signature_refused", "auth_refused", "rate_limited", "transport")


def run(quick: bool) -> list[Result]:
    max_examples = 25 if quick else 250
    report = _run_site(max_examples)
    log(f"{NAME}: {report.summary().splitlines()[0]}")
    budget = f"{max_examples} examples per operation and mode (positive, negative), seed {SEED}"

    def found(metric: str, kinds: tuple[str, ...], unit: str, notes: str) -> Result:
        """A count of findings; `extra` keeps the first few of them (request and response)."""
        shown = [dataclasses.asdict(f) for f in report.findings if f.kind in kinds]
        return Result(NAME, metric, unit, [float(sum(report.counts[k] for k in kinds))], notes=notes,
                      extra={"findings": shown} if shown else {})

    return [
        Result(NAME, "operations tested", "operations", [float(len(report.operations))],
               notes=f"scope all; left out by schemathesis: {', '.join(report.excluded) or 'none'}"),
        Result(NAME, "requests sent", "requests", [float(report.requests)],
               notes=f"{budget}; in {report.duration_sec:.0f} s"),
        Result(NAME, "request latency", "ms", report.latencies_ms, notes="every answered fuzz request",
               extra={"statuses": report.statuses, "by_operation": report.by_operation}),
        found("5xx responses (undocumented)", ("server_error",), "responses",
              f"besides {report.unavailable} documented 503 (PLC_OFFLINE, CLOUD_UNAVAILABLE)"),
        found("envelope violations", ("envelope",), "responses", "status >= 400 not the §1 envelope"),
        found("bad rows", ("bad_row",), "rows",
              "rows checked: " + ", ".join(f"{t} {n}" for t, n in report.rows_checked.items())),
        found("other findings", OTHER_KINDS, "findings",
              "signed or authorised requests refused, rate limited, transport errors"),
    ]


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
