"""QR payments for devices (device-api.md §3, signed): create through the cloud, poll the status.

`POST /api/v1/payment-gateway/payments` checks the device's request, forwards its bytes to the
cloud (`cloud.timeout_sec`), checks the EMVCo CRC of the QR `rawData`, stores the charge (with its
outbox event) and answers the cloud's document in the seed's shape. When the gateway already knows
the cloud is unreachable (the core's uplink is failing, or this worker's last call failed less than
`REMEMBER_DOWN_SEC` ago) or has no cloud, it answers 503 `CLOUD_UNAVAILABLE` at once so the device
falls back to cash. The core then follows the charge
(RPC `payments.track`, best effort: it also rescans the store).
`GET /api/v1/payment-gateway/payments/{chargeId}/status` answers from the store; a PENDING charge
is refreshed from the cloud by the core first (RPC `payments.refresh`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Blueprint, jsonify

from gateway.clock import iso_z, utc_now
from gateway.devices import validate
from gateway.mqtt.client import BusUnavailable, RpcTimeout
from gateway.mqtt.rpc import RpcError
from gateway.payments.cloud import CloudRefused, CloudUnavailable, PaymentsClient
from gateway.payments.promptpay import check_emv, satang_from_decimal_js
from gateway.store.models import Device, Payment
from gateway.store.outbox import add_event
from web.body import raw_body
from web.context import ctx
from web.device_api import DEVICE_ID, SIGNED_ERRORS, _body, _write, verify_signature
from web.errors import ApiError
from web.openapi import doc

bp = Blueprint("payments", __name__)

PAYMENT_REQ = {"type": "object", "required": ["device_id", "amount", "payment_method"],
               "properties": {"device_id": DEVICE_ID,
                              "amount": {"type": "integer", "minimum": 1, "maximum": 10_000_000},
                              "payment_method": {"const": "QR_PROMPT_PAY"},
                              "description": {"type": "string", "maxLength": 255}}}
MAX_SATANG = 10_000_000
REFRESH_TIMEOUT_SEC = 3.0
REMEMBER_DOWN_SEC = 30.0  # after a failed call, answer 503 at once for this long


class _CloudMemory:
    """What this web worker learnt of the cloud by calling it (the core's health may lag)."""

    down_until = 0.0
    reason = ""


_memory = _CloudMemory()


def _unavailable(why: str) -> ApiError:
    return ApiError(503, "CLOUD_UNAVAILABLE", f"the cloud cannot take payments now: {why}", {"Retry-After": "30"})


def _check(body: dict[str, Any]) -> tuple[str, int, str | None]:
    device_id, amount, method, desc = (body.get("device_id"), body.get("amount"), body.get("payment_method"),
                                       body.get("description"))
    if not isinstance(device_id, str) or not validate.DEVICE_ID_RE.match(device_id):
        raise ApiError(400, "VALIDATION_FAILED", "device_id: not a device id")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= MAX_SATANG:
        raise ApiError(400, "VALIDATION_FAILED", f"amount must be a positive integer of satang (at most {MAX_SATANG})")
    if method != "QR_PROMPT_PAY":
        raise ApiError(400, "VALIDATION_FAILED", "payment_method must be QR_PROMPT_PAY")
    if desc is not None and (not isinstance(desc, str) or len(desc) > 255):
        raise ApiError(400, "VALIDATION_FAILED", "description: a string of at most 255 characters")
    if not Device.select().where(Device.device_id == device_id).exists():
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}")
    return device_id, amount, desc


@bp.post("/api/v1/payment-gateway/payments")
@doc("Create a QR PromptPay charge through the cloud (the device then listens on "
     "device/{chargeId}/payment-status)", tags=("payments",), request=PAYMENT_REQ, response={"type": "object"},
     errors=(*SIGNED_ERRORS, 503), security="device-signature")
def create_payment() -> Any:
    body = _body()
    device_id, amount, desc = _check(body)
    c = ctx()
    if not c.config.cloud.url:
        raise _unavailable("this site has no cloud")
    health = c.bus.health if c.bus is not None else None
    if health is not None and health.get("cloud_configured") and (health.get("uplink") or {}).get("failing"):
        raise _unavailable("the cloud is unreachable (uplink failing)")
    if time.monotonic() < _memory.down_until:
        raise _unavailable(f"the last call failed: {_memory.reason}")
    client = PaymentsClient(c.config.cloud.url, c.secrets.cloud_key, c.config.cloud.timeout_sec)
    try:
        answer = client.create(raw_body())
    except CloudUnavailable as exc:
        _memory.down_until, _memory.reason = time.monotonic() + REMEMBER_DOWN_SEC, str(exc)
        raise _unavailable(str(exc)) from None
    except CloudRefused as exc:
        raise ApiError(exc.status, str(exc.answer.get("errorCode") or "VALIDATION_FAILED"),
                       str(exc.answer.get("message") or "the cloud refused the payment")) from None
    _memory.down_until = 0.0
    data = answer.get("data")
    try:
        if not isinstance(data, dict):
            raise ValueError("no data")
        results = data["payment_results"]
        charge_id, raw = results["chargeId"], results["encodedImage"]["rawData"]
        if not isinstance(charge_id, str) or not charge_id:
            raise ValueError("no chargeId")
        check_emv(raw)
        if satang_from_decimal_js(data.get("amount")) != amount:
            raise ValueError("the amount differs from the request's")
    except (KeyError, TypeError, ValueError) as exc:
        raise _unavailable(f"the cloud's answer is not usable ({exc})") from None
    now = utc_now()
    expiry = results["encodedImage"].get("expiry")
    site_id = c.config.site.id

    def store() -> None:
        Payment.create(charge_id=charge_id, device=device_id, amount_satang=amount, payment_method="QR_PROMPT_PAY",
                       description=desc, status="PENDING", reference_id=data.get("reference_id"), raw_data=raw,
                       expiry=expiry if isinstance(expiry, str) else None, cloud_response=json.dumps(data),
                       created_at=now, updated_at=now)
        add_event("payment.updated", {"charge_id": charge_id, "device_id": device_id, "status": "PENDING",
                                      "amount_satang": amount, "reference_id": data.get("reference_id"),
                                      "at": iso_z(now)}, site_id=site_id, partition=device_id)

    _write(store)
    _tell_core("payments.track", charge_id)
    return jsonify({"success": True, "data": data, "message": "Payment created successfully"})


def _tell_core(method: str, charge_id: str) -> dict[str, Any] | None:
    bus = ctx().bus
    if bus is None:
        return None
    try:
        reply: dict[str, Any] = bus.call(method, {"charge_id": charge_id}, timeout=REFRESH_TIMEOUT_SEC)
        return reply
    except (BusUnavailable, RpcTimeout, RpcError):
        return None  # the core rescans the store; the store's answer stands


@bp.get("/api/v1/payment-gateway/payments/<charge_id>/status")
@doc("A charge's status (the device's fallback when no MQTT status came); signed over the path",
     tags=("payments",), response={"type": "object"}, errors=(401, 404), security="device-signature")
def payment_status(charge_id: str) -> Any:
    verify_signature()
    p = Payment.get_or_none(Payment.charge_id == charge_id)
    if p is None:
        raise ApiError(404, "PAYMENT_NOT_FOUND", f"no payment {charge_id!r}")
    status = p.status
    if status == "PENDING":
        fresh = _tell_core("payments.refresh", charge_id)
        if fresh is not None:
            status = fresh.get("status", status)
    return jsonify({"success": True, "data": {"chargeId": charge_id, "status": status},
                    "message": "Payment status checked successfully"})
