"""Request/response over the local broker: how the web asks the core for decisions.

Request on `gateway/rpc/{method}`: `{"id": str, "reply_to": str, "params": {...}}`.
Reply on `reply_to`: `{"id": str, "ok": true, "result": ...}` or
`{"id": str, "ok": false, "error": {"code", "message", "status"}}` where `code`/`status` are the
HTTP envelope's error code and status (device-api.md §1), so the web can relay a decision as is.
Only the gateway's own users may use `gateway/#` (ACL), so requests come from the web and the
CLI's bus tools (`scan-bus`, `reset-bay`); the cloud bridge lives in the core and calls the
services directly. The server side lives in the core (`RpcServer`), the client side in any
process with a paho connection (`BusClient.call()` in gateway/mqtt/client.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.mqtt.broker import LocalBus
from gateway.mqtt.topics import RPC_REPLY_PREFIX, RPC_REQUEST_FILTER

log = logging.getLogger(__name__)

RpcHandler = Callable[[dict[str, Any]], Awaitable[Any]]


class RpcError(Exception):
    """A refusal with an envelope error code and HTTP status (e.g. 409 BAY_BUSY)."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        self.code = code
        self.status = status
        super().__init__(message)

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "status": self.status}


class AfterReply:
    """A handler's result plus work to start once the reply is on its way (e.g. publishing a bulk
    command: started earlier, its thousand messages would queue in front of the reply)."""

    def __init__(self, result: Any, then: Callable[[], None]) -> None:
        self.result = result
        self.then = then


class RpcServer:
    """Answers `gateway/rpc/{method}` requests. A handler runs on the bus's dispatcher, in arrival
    order with every other message (a wash command is decided before the next one is read), unless
    it is registered `concurrent`: then it runs as a task of its own."""

    def __init__(self, bus: LocalBus) -> None:
        self._bus = bus
        self._methods: dict[str, RpcHandler] = {}
        self._concurrent: set[str] = set()
        self._running: set[asyncio.Task[None]] = set()
        self.bad_requests = 0
        bus.subscribe(RPC_REQUEST_FILTER, self._on_request)

    def register(self, method: str, handler: RpcHandler, *, concurrent: bool = False) -> None:
        """`concurrent` is for handlers that wait on slow I/O (a PLC bus scan, the cloud) and whose
        order relative to other messages does not matter: awaited on the dispatcher, they held up
        every ACK, streaming message and RPC of the site meanwhile."""
        if method in self._methods:
            raise ValueError(f"rpc method {method!r} registered twice")
        self._methods[method] = handler
        if concurrent:
            self._concurrent.add(method)

    async def _on_request(self, topic: str, data: bytes, client_id: str | None) -> None:
        method = topic.rsplit("/", 1)[-1]
        try:
            req = json.loads(data)
            req_id, reply_to, params = req["id"], req["reply_to"], req.get("params") or {}
            if not isinstance(req_id, str) or not isinstance(reply_to, str) or not isinstance(params, dict):
                raise TypeError("id, reply_to must be strings and params an object")
            if not reply_to.startswith(RPC_REPLY_PREFIX):
                raise ValueError("reply_to must be under gateway/reply/")
        except (ValueError, KeyError, TypeError) as exc:
            self.bad_requests += 1
            log.warning("rpc: bad request on %s from %r: %s", topic, client_id, exc)
            return
        if method in self._concurrent:
            task = asyncio.create_task(self._answer(method, req_id, reply_to, params), name=f"rpc {method}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            return
        await self._answer(method, req_id, reply_to, params)

    async def _answer(self, method: str, req_id: str, reply_to: str, params: dict[str, Any]) -> None:
        handler = self._methods.get(method)
        reply: dict[str, Any]
        after: Callable[[], None] | None = None
        if handler is None:
            reply = {"id": req_id, "ok": False,
                     "error": RpcError("NOT_FOUND", f"no rpc method {method}", 404).to_wire()}
        else:
            try:
                result = await handler(params)
                if isinstance(result, AfterReply):
                    result, after = result.result, result.then
                reply = {"id": req_id, "ok": True, "result": result}
            except RpcError as exc:
                reply = {"id": req_id, "ok": False, "error": exc.to_wire()}
            except Exception:
                log.exception("rpc: method %s failed", method)
                reply = {"id": req_id, "ok": False,
                         "error": RpcError("INTERNAL_ERROR", "internal error", 500).to_wire()}
        await self._bus.publish(reply_to, json.dumps(reply).encode(), qos=1)
        if after is not None:
            after()
