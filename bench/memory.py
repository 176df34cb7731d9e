"""Resident memory (RSS) of the idle core and the idle web process.

Starts the real core (fresh data directory, waits for READY=1), then the web
(`carwash-gateway web`: gunicorn arbiter + one gthread worker; waits for the arbiter's READY=1
and then for the worker's "STATUS=serving; connected to the local broker"), lets both sit idle
for a moment, then samples RSS with psutil several times. Reported: the core, the gunicorn
arbiter, the worker and arbiter+worker. RSS counts pages the forked worker shares with the
arbiter twice, so the web's PSS sum (proportional set size, shared pages split) is given too.
"""

from __future__ import annotations

import subprocess
import time

import psutil

from bench.common import Result, log, tail, temp_dir
from bench.core_start import run_core, wait_ready
from sim.demo import WEB_CONNECTED
from sim.procs import NotifySocket, child_env, gateway_command, stop_process

NAME = "memory"
READY_TIMEOUT = 60.0
MB = 1024 * 1024


def _rss(p: psutil.Process) -> float:
    return p.memory_info().rss / MB


def _pss(p: psutil.Process) -> float:
    return p.memory_full_info().pss / MB


def run(quick: bool) -> list[Result]:
    settle = 1.0 if quick else 2.0
    n_samples = 3 if quick else 5
    interval = 0.3 if quick else 0.5
    core_rss: list[float] = []
    arbiter_rss: list[float] = []
    worker_rss: list[float] = []
    web_rss: list[float] = []
    web_pss: list[float] = []
    with temp_dir() as d, run_core(d) as core:
        weblog = d / "web.log"
        with NotifySocket(d / "web.notify") as notify, weblog.open("ab") as out:
            web = subprocess.Popen(gateway_command("web", "--config", str(core.config)), env=child_env(notify),
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            try:
                try:
                    wait_ready(notify, web, "READY=1", READY_TIMEOUT)
                    wait_ready(notify, web, WEB_CONNECTED, READY_TIMEOUT)
                except TimeoutError as exc:
                    raise RuntimeError(f"web not ready (exit code {web.poll()}): {exc}\n{tail(weblog)}") from None
                log(f"{NAME}: core and web ready; idle {settle:g} s, then {n_samples} samples")
                time.sleep(settle)
                core_p = psutil.Process(core.proc.pid)
                arbiter = psutil.Process(web.pid)  # `carwash-gateway web` execs gunicorn: same PID
                for _ in range(n_samples):
                    workers = arbiter.children(recursive=True)
                    if len(workers) != 1:
                        raise RuntimeError(f"expected one gunicorn worker, found {len(workers)}")
                    c, a, w = _rss(core_p), _rss(arbiter), _rss(workers[0])
                    core_rss.append(c)
                    arbiter_rss.append(a)
                    worker_rss.append(w)
                    web_rss.append(a + w)
                    web_pss.append(_pss(arbiter) + _pss(workers[0]))
                    time.sleep(interval)
                n_threads = workers[0].num_threads()
            finally:
                code = stop_process(web)
            if code != 0:
                raise RuntimeError(f"web exited with {code} on SIGTERM\n{tail(weblog)}")

    note = f"{n_samples} samples after {settle:g} s idle"
    return [
        Result(NAME, "core RSS (idle)", "MB", core_rss, f"{note}; core incl. embedded amqtt broker"),
        Result(NAME, "web arbiter RSS (idle)", "MB", arbiter_rss, f"{note}; gunicorn arbiter"),
        Result(NAME, "web worker RSS (idle)", "MB", worker_rss,
               f"{note}; gthread worker, joined the broker ({n_threads} threads)"),
        Result(NAME, "web arbiter+worker RSS", "MB", web_rss, f"{note}; shared pages counted twice"),
        Result(NAME, "web arbiter+worker PSS", "MB", web_pss, f"{note}; shared pages split (smaps)"),
    ]
