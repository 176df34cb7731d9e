"""One MQTT client of the throughput benchmark, run as its own OS process:

    python bench/mqtt_client.py sub --port P --topic T --qos Q --count N [--username U]
    python bench/mqtt_client.py pub --port P --topic T --qos Q --count N --size 200

With --username the password is read from $BENCH_MQTT_PASSWORD (not argv, which `ps` shows).
paho-mqtt 2.x, CallbackAPIVersion.VERSION2, threaded network loop (loop_start).

sub: subscribes, prints "READY" on stdout once the SUBACK granted the requested QoS, then counts
     messages. It stops when all N distinct sequence numbers arrived, or — once the line "DONE"
     was read on stdin (the publisher finished) — when nothing arrived for --idle seconds.
     Prints one JSON line: received, distinct, duplicates, lost, t_first, t_last, rate.
pub: publishes N messages of --size bytes (an 8-digit sequence number, then padding) as fast
     as paho takes them. For QoS 1 at most --inflight are unacknowledged (paho queues the rest)
     and it finishes only when every PUBACK arrived (on_publish); for QoS 0 on_publish means the
     packet was written to the socket. Prints one JSON line: t_start, t_done, published; then
     stays connected until it reads "EXIT" (or end of input) on stdin.

Times are time.monotonic() (CLOCK_MONOTONIC: comparable between processes on one host).
Every wait has a timeout (--timeout); a timeout exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def fail(msg: str) -> None:
    print(f"mqtt_client: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def make_client(args: argparse.Namespace, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if args.username:
        client.username_pw_set(args.username, os.environ.get("BENCH_MQTT_PASSWORD"))
    return client


def connect(client: mqtt.Client, args: argparse.Namespace) -> None:
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(c, userdata, flags, reason_code, properties):  # type: ignore[no-untyped-def]
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    client.connect(args.host, args.port, keepalive=60)
    client.loop_start()
    if not connected.wait(args.timeout):
        fail("no CONNACK")
    if refused:
        fail(f"connection refused: {refused[0]}")


def subscriber(args: argparse.Namespace) -> None:
    client = make_client(args, args.client_id or "bench-sub")
    lock = threading.Lock()
    seen = bytearray(args.count)
    state = {"received": 0, "distinct": 0, "duplicates": 0, "foreign": 0, "t_first": None, "t_last": None}
    complete = threading.Event()
    subscribed = threading.Event()
    granted: list[object] = []

    def on_message(c, userdata, msg):  # type: ignore[no-untyped-def]
        now = time.monotonic()
        with lock:
            if state["t_first"] is None:
                state["t_first"] = now
            state["t_last"] = now
            state["received"] += 1
            try:
                seq = int(msg.payload[:8])
            except ValueError:
                seq = -1
            if not 0 <= seq < args.count:
                state["foreign"] += 1
            elif seen[seq]:
                state["duplicates"] += 1
            else:
                seen[seq] = 1
                state["distinct"] += 1
                if state["distinct"] == args.count:
                    complete.set()

    def on_subscribe(c, userdata, mid, reason_code_list, properties):  # type: ignore[no-untyped-def]
        granted.extend(reason_code_list)
        subscribed.set()

    client.on_message = on_message
    client.on_subscribe = on_subscribe
    connect(client, args)
    client.subscribe(args.topic, qos=args.qos)
    if not subscribed.wait(args.timeout):
        fail("no SUBACK")
    if not granted or granted[0].is_failure or granted[0].value != args.qos:
        fail(f"subscription not granted at QoS {args.qos}: {granted}")
    print("READY", flush=True)

    publisher_done = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "DONE":
                publisher_done.set()
                return

    threading.Thread(target=read_stdin, daemon=True).start()
    deadline = time.monotonic() + args.timeout
    done_at: float | None = None
    while not complete.wait(0.05):
        now = time.monotonic()
        if now > deadline:
            fail(f"timeout: {state['distinct']} of {args.count} messages")
        if publisher_done.is_set():
            done_at = done_at or now
            with lock:
                last = max(state["t_last"] or 0.0, done_at)
            if now - last > args.idle:
                break  # the rest is lost
    client.disconnect()
    client.loop_stop()
    with lock:
        out = dict(state)
    out["lost"] = args.count - out["distinct"]
    out["missing_sample"] = [i for i, v in enumerate(seen) if not v][:10]
    span = (out["t_last"] or 0.0) - (out["t_first"] or 0.0)
    out["span_s"] = span
    out["rate"] = (out["received"] - 1) / span if out["received"] > 1 and span > 0 else None
    print(json.dumps(out), flush=True)


def publisher(args: argparse.Namespace) -> None:
    client = make_client(args, args.client_id or "bench-pub")
    client.max_inflight_messages_set(args.inflight)
    done = threading.Event()
    acked = [0]

    def on_publish(c, userdata, mid, reason_code, properties):  # type: ignore[no-untyped-def]
        acked[0] += 1  # called from the network thread only
        if acked[0] == args.count:
            done.set()

    client.on_publish = on_publish
    connect(client, args)
    pad = b"x" * (args.size - 8)
    t_start = time.monotonic()
    for i in range(args.count):
        info = client.publish(args.topic, b"%08d" % i + pad, qos=args.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            fail(f"publish {i} failed: {mqtt.error_string(info.rc)}")
    t_queued = time.monotonic()
    if not done.wait(max(0.0, args.timeout - (t_queued - t_start))):
        fail(f"timeout: {acked[0]} of {args.count} publishes completed")
    t_done = time.monotonic()
    print(json.dumps({"published": args.count, "t_start": t_start, "t_queued": t_queued, "t_done": t_done}),
          flush=True)
    # Stay connected until told (the subscriber has everything): amqtt 0.12 drops the messages of
    # a client that it acknowledged but had not yet delivered when that client disconnects.
    got_exit = threading.Event()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "EXIT":
                break
        got_exit.set()  # "EXIT" or end of input

    threading.Thread(target=read_stdin, daemon=True).start()
    if not got_exit.wait(args.timeout):
        fail("no EXIT on stdin")
    client.disconnect()
    client.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("sub", "pub"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--qos", type=int, choices=(0, 1), required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--inflight", type=int, default=20)
    ap.add_argument("--username")
    ap.add_argument("--client-id")
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()
    if args.size < 8:
        ap.error("--size must be at least 8")
    (subscriber if args.role == "sub" else publisher)(args)


if __name__ == "__main__":
    main()
