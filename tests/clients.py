"""Real clients used by the end-to-end tests: HTTP (urllib), an SSE reader, and the stock npm
socket.io-client (tests/node) as a child process. All waits have timeouts."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NODE_DIR = Path(__file__).resolve().parent / "node"


def http_json(url: str, *, method: str = "GET", body: Any = None, data: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float = 15) -> tuple[int, Any]:
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class SseReader:
    """Reads `event:`/`data:` frames of an SSE stream on a thread into a queue."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[tuple[str, str, Any]] = queue.Queue()
        self._resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30)
        self.status = self._resp.status
        self.content_type = self._resp.headers.get("Content-Type", "")
        self._thread = threading.Thread(target=self._read, name="sse-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        event, data, ev_id = "message", [], ""
        try:
            for raw in self._resp:
                line = raw.decode().rstrip("\n").rstrip("\r")
                if not line:
                    if data:
                        self.events.put((event, ev_id, json.loads("\n".join(data))))
                    event, data = "message", []
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line.startswith("id:"):
                    ev_id = line[3:].strip()
        except Exception:  # noqa: BLE001 - close() shuts the socket under the reader: any error ends it
            pass
        self.events.put(("__closed__", "", None))

    def next(self, timeout: float = 10) -> tuple[str, str, Any]:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no SSE event") from None

    def wait_for(self, pred: Any, timeout: float = 15) -> list[Any]:
        """Events until one whose data satisfies `pred` (returned last)."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            ev = self.next(max(0.01, deadline - time.monotonic()))
            seen.append(ev)
            if ev[0] == "__closed__":
                raise AssertionError(f"stream closed; saw {seen}")
            if pred(ev[2]):
                return seen

    def close(self) -> None:
        try:
            self._resp.fp.raw._sock.shutdown(2)  # type: ignore[union-attr]
        except (AttributeError, OSError):
            pass
        self._resp.close()
        self._thread.join(5)


class SocketIoClient:
    """tests/node/wash_client.js: the npm socket.io-client printing each `wash:status` as JSON."""

    def __init__(self, base_url: str) -> None:
        self.lines: queue.Queue[Any] = queue.Queue()
        self.proc = subprocess.Popen(["node", str(NODE_DIR / "wash_client.js"), base_url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=NODE_DIR)
        self._thread = threading.Thread(target=self._read, name="socketio-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def wait_connected(self, timeout: float = 15) -> dict[str, Any]:
        msg = self.lines.get(timeout=timeout)
        assert msg and msg.get("connected"), msg
        return msg

    def wait_for(self, pred: Any, timeout: float = 15) -> list[Any]:
        seen, deadline = [], time.monotonic() + timeout
        while True:
            try:
                msg = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"socket.io: no matching event; saw {seen}") from None
            if msg is None:
                raise AssertionError(f"socket.io client exited; saw {seen}")
            seen.append(msg)
            if pred(msg):
                return seen

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
