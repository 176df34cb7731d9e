"""Embedded broker throughput: the core's amqtt broker against Debian's mosquitto, same load.

Load: one publisher process → one subscriber process (bench/mqtt_client.py, paho-mqtt 2.x),
200-byte messages on one topic, QoS 0 and QoS 1 (publish and subscription at the same QoS).
The publisher sends as fast as paho accepts; for QoS 1 it keeps at most INFLIGHT messages
unacknowledged and finishes only when every PUBACK arrived.

Measured at the subscriber: (received - 1) / (time of last message - time of first message),
and lost = messages sent - distinct sequence numbers received.

Clients and topic are the same for both brokers: the publisher connects anonymously and
publishes `server/bench/streaming` (a device's path into the gateway: ACL-checked, handed to
the core's LocalBus); the subscriber logs in as the gateway's internal user (the only one
allowed to subscribe outside `device/#`). mosquitto runs with `allow_anonymous true` and no
password file, so it accepts the same CONNECTs and does no ACL work. The core's per-client
publish limit of anonymous clients (`mqtt.client_rate_per_sec`) is off here: it would cut the
publisher at 20 messages/s.

Targets: (a) the real core process started as in core_start (fresh data dir), (b)
/usr/sbin/mosquitto with a minimal config on a free port (queue unlimited, as amqtt's). Repetitions
alternate between the two brokers so that both see the same machine state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Result, log, readline, tail, temp_dir, wait_port
from bench.core_start import run_core
from gateway.config import load_config, load_secrets
from sim.demo import free_port, write_demo_site

NAME = "broker_throughput"
MOSQUITTO = "/usr/sbin/mosquitto"
CLIENT = Path(__file__).resolve().parent / "mqtt_client.py"
TOPIC = "server/bench/streaming"
SIZE = 200
INFLIGHT = 20  # paho's default, set explicitly


@dataclass
class Target:
    name: str
    port: int
    username: str
    password: str
    pid: int  # the broker's process: its CPU time per message is reported


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def run_mosquitto(d: Path) -> Iterator[tuple[int, int]]:
    """mosquitto on a free port: yields (port, pid)."""
    port = free_port()
    conf = d / "mosquitto.conf"
    # max_queued_messages 0: no limit, as amqtt. mosquitto's default (1000 QoS 1 messages queued
    # per client beyond the in-flight ones) drops QoS 1 messages whenever the subscriber falls
    # behind the publisher by more than that, which measures the limit instead of the broker.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nlog_dest stderr\n")
    logfile = d / "mosquitto.log"
    with logfile.open("ab") as out:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        try:
            wait_port("127.0.0.1", port, 10.0)
        except TimeoutError as exc:
            raise RuntimeError(f"mosquitto (exit code {proc.poll()}): {exc}\n{tail(logfile)}") from None
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _client(role: str, t: Target, qos: int, count: int, timeout: float, errlog: Path,
            anonymous: bool) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(CLIENT), role, "--port", str(t.port), "--topic", TOPIC, "--qos", str(qos),
            "--count", str(count), "--size", str(SIZE), "--inflight", str(INFLIGHT),
            "--client-id", f"bench-{role}-{os.getpid()}", "--timeout", str(timeout)]
    env = dict(os.environ)
    if not anonymous:
        argv += ["--username", t.username]
        env["BENCH_MQTT_PASSWORD"] = t.password
    with errlog.open("a") as err:
        # Unbuffered pipes: select() on the descriptor then sees every line (no hidden buffer).
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0,
                                env=env)


def _tell(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    try:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died: its exit code says why


def one_run(t: Target, qos: int, count: int, d: Path) -> dict[str, Any]:
    timeout = 20.0 + count / 250.0  # far above any plausible duration: only a stuck run hits it
    errlog = d / "clients.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sub = _client("sub", t, qos, count, timeout + 10, errlog, anonymous=False)
        procs.append(sub)
        line = readline(sub, 15.0)
        if line.strip() != "READY":
            raise RuntimeError(f"subscriber did not start ({line!r}, exit {sub.poll()})\n{tail(errlog)}")
        cpu0 = _cpu_seconds(t.pid)
        pub = _client("pub", t, qos, count, timeout, errlog, anonymous=True)
        procs.append(pub)
        try:
            pub_out = readline(pub, timeout + 5)  # all published (QoS 1: all PUBACKs in)
        except TimeoutError:
            raise RuntimeError(f"publisher stuck\n{tail(errlog)}") from None
        if not pub_out:
            raise RuntimeError(f"publisher failed ({pub.wait(5)})\n{tail(errlog)}")
        # The publisher stays connected until the subscriber is done: see mqtt_client.publisher.
        _tell(sub, "DONE")
        try:
            sub_out = readline(sub, timeout + 15)
        except TimeoutError:
            raise RuntimeError(f"subscriber stuck\n{tail(errlog)}") from None
        cpu = _cpu_seconds(t.pid) - cpu0  # the publisher's run and the subscriber's catching up
        _tell(pub, "EXIT")
        for proc, role in ((sub, "subscriber"), (pub, "publisher")):
            try:
                code = proc.wait(15)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{role} did not exit\n{tail(errlog)}") from None
            if code != 0:
                raise RuntimeError(f"{role} failed ({code})\n{tail(errlog)}")
        p = json.loads(pub_out)
        s = json.loads(sub_out)
        if not s["rate"]:
            raise RuntimeError(f"subscriber received {s['received']} messages: no rate\n{tail(errlog)}")
        s["pub_rate"] = count / (p["t_done"] - p["t_start"])
        s["end_to_end_s"] = s["t_last"] - p["t_start"]
        s["broker_cpu_us_per_msg"] = cpu / count * 1e6
        return s
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for f in (proc.stdin, proc.stdout):
                if f is not None and not f.closed:
                    f.close()


def run(quick: bool) -> list[Result]:
    reps = 3 if quick else 5
    counts = {0: 10_000, 1: 5_000} if quick else {0: 20_000, 1: 10_000}
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with temp_dir() as d, ExitStack() as stack:
        # The per-client publish limit of anonymous clients (20/s) is off: this measures the broker.
        port = free_port()
        config = write_demo_site(d, web_port=free_port(), mqtt_port=port, extra_toml="client_rate_per_sec = 0\n")
        core = stack.enter_context(run_core(d, config=config, mqtt_port=port))
        cfg = load_config(core.config)
        secrets = load_secrets(cfg)
        amqtt = Target("amqtt (core)", core.mqtt_port, cfg.mqtt.internal_username, secrets.mqtt_internal_password,
                       core.proc.pid)
        mosq_dir = d / "mosquitto"
        mosq_dir.mkdir()
        mosq_port, mosq_pid = stack.enter_context(run_mosquitto(mosq_dir))
        mosq = Target("mosquitto", mosq_port, amqtt.username, amqtt.password, mosq_pid)
        for rep in range(reps):
            for qos in (0, 1):
                for t in (amqtt, mosq):
                    r = one_run(t, qos, counts[qos], d)
                    runs.setdefault((t.name, qos), []).append(r)
                    log(f"{NAME}: rep {rep + 1}/{reps} {t.name} QoS{qos}: {r['rate']:,.0f} msg/s, "
                        f"{r['broker_cpu_us_per_msg']:.0f} us CPU/msg in the broker, "
                        f"lost {r['lost']}/{counts[qos]}, dup {r['duplicates']}, "
                        f"publisher {r['pub_rate']:,.0f} msg/s")
        if core.proc.poll() is not None:
            raise RuntimeError(f"core died during the benchmark\n{tail(core.log)}")

    results: list[Result] = []
    for qos in (0, 1):
        n = counts[qos]
        load = (f"{reps}×{n:,} msgs of {SIZE} B; anon pub → internal-user sub"
                + (f"; inflight {INFLIGHT}" if qos else ""))
        medians = {}
        for t in (amqtt, mosq):
            rs = runs[(t.name, qos)]
            rates = [r["rate"] for r in rs]
            lost = [float(r["lost"]) for r in rs]
            dup = sum(r["duplicates"] for r in rs)
            pub = sorted(r["pub_rate"] for r in rs)
            res = Result(NAME, f"{t.name} QoS{qos}", "msgs/s", rates,
                         f"{load}; rate at subscriber; lost {int(sum(lost))}/{reps * n}"
                         + (f", dup {dup}" if dup else ""),
                         extra={"runs": rs, "count": n, "size": SIZE})
            medians[t.name] = res.median
            results.append(res)
            results.append(Result(NAME, f"{t.name} QoS{qos} CPU per message", "us",
                                  [r["broker_cpu_us_per_msg"] for r in rs],
                                  "CPU time (user+system) of the broker process per message, publisher start "
                                  "to the subscriber's last message; Pi 4 ≈ 3x (bench/README.md)"))
            results.append(Result(NAME, f"{t.name} QoS{qos} lost", "msgs", lost,
                                  f"per repetition of {n:,}; publisher side ran at "
                                  f"{pub[len(pub) // 2]:,.0f} msg/s (median)"))
        ratio = medians[amqtt.name] / medians[mosq.name]
        results.append(Result(NAME, f"amqtt/mosquitto QoS{qos}", "ratio", [], "ratio of the medians",
                              median=ratio))
    return results
