"""Topic names and matching. Device and wash topics are the spec's; `gateway/...` is ours.

`gateway/#` is reserved by the ACL for the gateway's own authenticated users (core and web):
- `gateway/rpc/{method}`: web -> core requests (`{"id", "reply_to", "params"}`)
- `gateway/reply/{client_id}`: core -> caller replies (`{"id", "ok", "result" | "error"}`)
- `gateway/status`: retained availability of the core (`{"online", "version", "since"}`)
- `gateway/health`: retained health of the parts the core owns (plc buses, cloud link)
- `gateway/commands/{command_id}/events`: `{"command_id"}`: that command has new stored SSE
  events (core -> web; the web reads them from `operation_event`)
- `gateway/presence/{device_id}`: retained online/offline transitions of a device (core)
- `gateway/live/{device_id}`: retained live state, every streaming message (core -> web only)
- `gateway/pairing`: retained state of the pairing window (core)

`sites/{site_id}/...` are the cloud broker's topics (uplink.md, "MQTT bridge"): only the cloud
bridge uses them, on the cloud's broker, never on the local one.
"""

from __future__ import annotations

RPC_REQUEST = "gateway/rpc/{method}"
RPC_REQUEST_FILTER = "gateway/rpc/+"
RPC_REPLY = "gateway/reply/{client_id}"
STATUS = "gateway/status"
HEALTH = "gateway/health"
COMMAND_EVENTS = "gateway/commands/{command_id}/events"
COMMAND_EVENTS_FILTER = "gateway/commands/+/events"
RPC_REPLY_PREFIX = "gateway/reply/"
PRESENCE = "gateway/presence/{device_id}"
PRESENCE_FILTER = "gateway/presence/+"
LIVE = "gateway/live/{device_id}"
LIVE_FILTER = "gateway/live/+"
PAIRING = "gateway/pairing"

DEVICE_COMMAND = "device/{device_id}/command"
DEVICE_COMMAND_FILTER = "device/+/command"
DEVICE_ACK = "server/{device_id}/ack"
DEVICE_ACK_FILTER = "server/+/ack"
DEVICE_STREAMING = "server/{device_id}/streaming"
DEVICE_STREAMING_FILTER = "server/+/streaming"
PAYMENT_STATUS = "device/{charge_id}/payment-status"
PAYMENT_STATUS_FILTER = "device/+/payment-status"
WASH_CMD = "wash/{bay_id}/cmd"
WASH_CMD_FILTER = "wash/+/cmd"
WASH_CMD_RESULT = "wash/{bay_id}/cmd/result"
WASH_CMD_RESULT_FILTER = "wash/+/cmd/result"
WASH_STATUS = "wash/{bay_id}/status"
WASH_STATUS_FILTER = "wash/+/status"

# The cloud broker's (uplink.md); `{site_id}` first, then the id of the level after it.
CLOUD_GATEWAY_STATUS = "sites/{site_id}/gateway/status"
CLOUD_WASH_STATUS = "sites/{site_id}/wash/{bay_id}/status"
CLOUD_DEVICE_PRESENCE = "sites/{site_id}/devices/{device_id}/presence"
CLOUD_WASH_CMD_FILTER = "sites/{site_id}/wash/+/cmd"
CLOUD_DEVICE_COMMAND_FILTER = "sites/{site_id}/device/+/command"
CLOUD_PAYMENT_STATUS_FILTER = "sites/{site_id}/payments/+/status"


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter match (`+` one level, `#` the rest); `$` topics never match wildcards."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def is_valid_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def covers(allowed: str, requested: str) -> bool:
    """True when every topic `requested` (a valid filter) can match is matched by `allowed`:
    `wash/+/status` covers `wash/bay1/status` and itself, not `wash/#` nor `+/+/status`."""
    a_levels, r_levels = allowed.split("/"), requested.split("/")
    for i, a in enumerate(a_levels):
        if a == "#":
            return True
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#":
            return False
        if a != "+" and a != r:
            return False
    return len(a_levels) == len(r_levels)
