"""Site configuration: one TOML file plus a secrets file, loaded into frozen dataclasses.

Contract: `load_config(path)` returns a fully validated `Config` or raises `ConfigError` whose
message is one line naming the file, the key and what is wrong. Unknown keys, wrong types and
impossible values are all errors; nothing is silently defaulted except keys that are absent.
Relative paths in the file are resolved against the file's own directory.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import secrets as pysecrets
import tomllib
import types
import typing
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CONFIG_PATH = "/etc/carwash-gateway/gateway.toml"
CONFIG_ENV = "CARWASH_GATEWAY_CONFIG"

_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ConfigError(Exception):
    """A configuration problem; str() is the one line shown to the operator."""

    def __init__(self, file: str | os.PathLike[str], key: str, problem: str) -> None:
        self.file = str(file)
        self.key = key
        self.problem = problem
        where = f"{self.file}: {key}: " if key else f"{self.file}: "
        super().__init__(where + problem)


def _f(default: Any = dataclasses.MISSING, *, doc: str = "", **checks: Any) -> Any:
    """A dataclass field with validation checks kept in its metadata."""
    meta = {"doc": doc, **checks}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    id: str = _f(doc="site identifier used towards the cloud", pattern=_ID_RE)
    name: str = _f("Car-wash site", max_len=100)
    timezone: str = _f("Asia/Bangkok", doc="IANA zone for session ids and day boundaries")


@dataclass(frozen=True, kw_only=True)
class PathsConfig:
    database: str = _f("/var/lib/carwash-gateway/gateway.db", path=True)
    secrets_file: str = _f("/etc/carwash-gateway/secrets.toml", path=True)
    firmware_dir: str = _f("/var/lib/carwash-gateway/firmware", path=True)


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    bind: str = _f("0.0.0.0", host=True)
    port: int = _f(8080, min=1, max=65535)
    threads: int = _f(64, min=4, max=1024, doc="gthread worker threads: SSE/WebSocket streams + requests")
    body_limit_bytes: int = _f(262144, min=1024, max=64 * 1024 * 1024)
    wash_api_auth: Literal["none", "jwt"] = _f("none")
    jwt_ttl_minutes: int = _f(720, min=1, max=60 * 24 * 30)
    firmware_max_bytes: int = _f(8 * 1024 * 1024, min=64 * 1024, max=64 * 1024 * 1024)
    device_rate_per_sec: float = _f(20.0, min=0, max=10000,
                                    doc="device API requests per second per client address; 0: no limit")
    device_rate_burst: int = _f(100, min=1, max=100000)
    rate_limit_exempt: tuple[str, ...] = _f(("127.0.0.1", "::1"), doc="addresses never rate limited")
    login_failures_per_min: float = _f(10.0, min=0, max=10000, doc="failed logins per minute per address; 0: no limit")
    login_failure_burst: int = _f(10, min=1, max=10000)
    device_base_url: str = _f("", doc="how devices reach this web server; empty: the URL of the request",
                              pattern=r"^(|https?://\S+)$")
    cors_allowed_origins: tuple[str, ...] = _f(
        (), doc="browser origins (scheme://host[:port]) allowed besides the gateway's own, for REST, SSE and "
                "Socket.IO; \"*\": any", pattern=r"^(\*|https?://[A-Za-z0-9.\-\[\]:]+)\Z")


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    bind: str = _f("0.0.0.0", host=True)
    port: int = _f(1883, min=1, max=65535)
    allow_anonymous: bool = _f(True, doc="devices may connect without credentials")
    internal_username: str = _f("carwash-gateway", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    max_connections: int = _f(2000, min=10, max=100000)
    rpc_timeout_sec: float = _f(5.0, min=0.1, max=60)
    max_packet_bytes: int = _f(16384, min=1024, max=268435455, doc="largest packet of an anonymous client")
    internal_max_packet_bytes: int = _f(1048576, min=65536, max=268435455,
                                        doc="largest packet of the gateway's own clients (RPC bodies)")
    connect_timeout_sec: float = _f(10.0, min=1, max=300, doc="a connection must send CONNECT within this")
    client_rate_per_sec: float = _f(20.0, min=0, max=100000,
                                    doc="publishes per second per anonymous client; 0: no limit")
    client_rate_burst: int = _f(100, min=1, max=1000000)
    flood_cooldown_sec: float = _f(60.0, min=0, max=86400,
                                   doc="a client at more than twice its rate is cut off; its address waits this long")
    ban_exempt: tuple[str, ...] = _f(("127.0.0.1", "::1"), doc="addresses never made to cool down")


@dataclass(frozen=True, kw_only=True)
class SignaturesConfig:
    http_schemes: tuple[Literal["sha256-suffix", "hmac-sha256"], ...] = _f(
        ("sha256-suffix", "hmac-sha256"), min_len=1
    )
    legacy_empty_body_signature: bool = _f(False)
    mqtt: Literal["require", "off"] = _f("require")


@dataclass(frozen=True, kw_only=True)
class DevicesConfig:
    command_timeout_sec: float = _f(30.0, min=1, max=3600)
    streaming_interval_sec: float = _f(60.0, min=1, max=3600)
    offline_after_intervals: int = _f(3, min=1, max=100)
    pin_ttl_sec: int = _f(600, min=30, max=86400)
    pairing_requires_button: bool = _f(False)
    pairing_window_sec: int = _f(120, min=10, max=3600)
    presence_save_sec: float = _f(900.0, min=1, max=3600)


@dataclass(frozen=True, kw_only=True)
class WashConfig:
    start_timeout_sec: float = _f(10.0, min=0.5, max=600)
    offline_after: int = _f(3, min=1, max=100, doc="failed or frozen polls in a row before OFFLINE")
    poll_period_ms: int = _f(200, min=20, max=60000)
    offline_backoff_max_sec: float = _f(5.0, min=0.1, max=300)
    status_save_sec: float = _f(30.0, min=0.1, max=3600)
    extra_profiles: tuple[str, ...] = _f((), doc="profile TOML files added to the shipped ones", path=True)


@dataclass(frozen=True, kw_only=True)
class BusConfig:
    name: str = _f(pattern=_ID_RE)
    type: Literal["rtu", "tcp"] = _f()
    device: str = _f("", doc="rtu: serial device path")
    baudrate: int = _f(19200, choices=(1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200))
    parity: Literal["N", "E", "O"] = _f("N")
    stopbits: int = _f(1, choices=(1, 2))
    bytesize: int = _f(8, choices=(7, 8))
    rts_direction: bool = _f(False, doc="rtu: drive DE/RE with RTS (high while the gateway sends)")
    direction_gpio: int | None = _f(None, min=0, max=53, doc="rtu: BCM pin driving DE/RE")
    host: str = _f("", doc="tcp: PLC address")
    port: int = _f(502, min=1, max=65535)
    timeout_ms: int | None = _f(None, min=5, max=10000,
                                doc="per-request reply timeout; none: derived from the line (plc.bus.default_timeout)")
    retries: int = _f(1, min=0, max=5, doc="a command write with no valid reply is sent again this many times")


@dataclass(frozen=True, kw_only=True)
class BayConfig:
    id: str = _f(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    name: str = _f("", max_len=64)
    bus: str = _f()
    unit: int = _f(1, min=1, max=247)
    profile: str = _f("washbay-v1", pattern=_ID_RE)
    base: int = _f(0, min=0, max=65000)
    poll_period_ms: int | None = _f(None, min=20, max=60000)


@dataclass(frozen=True, kw_only=True)
class BridgeConfig:
    enabled: bool = _f(False)
    host: str = _f("")
    port: int = _f(8883, min=1, max=65535)
    tls: bool = _f(True)
    ca_file: str = _f("", path=True)
    cert_file: str = _f("", path=True, doc="client certificate (PEM) for mutual TLS")
    key_file: str = _f("", path=True, doc="its private key (PEM)")
    client_id: str = _f("", doc="default: carwash-gateway-{site.id}")
    username: str = _f("")
    keepalive_sec: int = _f(60, min=5, max=3600)


@dataclass(frozen=True, kw_only=True)
class CloudConfig:
    url: str = _f("", doc="empty: no cloud, the site runs offline only", pattern=r"^(|https?://\S+)$")
    timeout_sec: float = _f(8.0, min=0.5, max=120)
    bridge: BridgeConfig = _f(BridgeConfig())


@dataclass(frozen=True, kw_only=True)
class OutboxConfig:
    batch_max_events: int = _f(500, min=1, max=500)
    batch_max_bytes: int = _f(262144, min=4096, max=262144)
    max_bytes: int = _f(200 * 1024 * 1024, min=1024 * 1024)
    delivered_retention_days: int = _f(7, min=0, max=365)
    backoff_min_sec: float = _f(1.0, min=0.05, max=60)
    backoff_max_sec: float = _f(300.0, min=1, max=3600)
    mark_sent_delay_sec: float = _f(60.0, min=0, max=600)


@dataclass(frozen=True, kw_only=True)
class GpioConfig:
    enabled: bool = _f(False)
    led_pin: int | None = _f(None, min=0, max=53)
    button_pin: int | None = _f(None, min=0, max=53)


@dataclass(frozen=True, kw_only=True)
class HealthConfig:
    sys_root: str = _f("/", path=True, doc="root under which /sys and /proc are read (tests: a recorded tree)")
    disk_warn_percent: float = _f(90.0, min=1, max=100, doc="warn when the data partition is this full")
    temperature_warn_c: float = _f(80.0, min=30, max=120, doc="warn at this CPU temperature")
    check_sec: float = _f(30.0, min=1, max=3600, doc="how often the core reads the Pi's health")


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    enabled: bool = _f(True, doc="serve GET /metrics on the web port")
    allow: tuple[str, ...] = _f(("127.0.0.1", "::1"), doc="client addresses or networks (CIDR) allowed to scrape",
                                pattern=r"^[0-9A-Fa-f.:/]+\Z")


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = _f("INFO")


@dataclass(frozen=True, kw_only=True)
class Config:
    site: SiteConfig = _f()
    paths: PathsConfig = _f(PathsConfig())
    web: WebConfig = _f(WebConfig())
    mqtt: MqttConfig = _f(MqttConfig())
    signatures: SignaturesConfig = _f(SignaturesConfig())
    devices: DevicesConfig = _f(DevicesConfig())
    wash: WashConfig = _f(WashConfig())
    buses: tuple[BusConfig, ...] = _f(())
    bays: tuple[BayConfig, ...] = _f(())
    cloud: CloudConfig = _f(CloudConfig())
    outbox: OutboxConfig = _f(OutboxConfig())
    gpio: GpioConfig = _f(GpioConfig())
    health: HealthConfig = _f(HealthConfig())
    metrics: MetricsConfig = _f(MetricsConfig())
    logging: LoggingConfig = _f(LoggingConfig())
    source: str = field(default="", compare=False, metadata={"internal": True})


@dataclass(frozen=True, kw_only=True)
class Secrets:
    """Secrets live in their own file, readable by the service only; never logged."""

    device_signing_key: str = _f(min_len=8, doc="shared key of device signatures (device-api §2)")
    jwt_secret: str = _f(min_len=32, doc="HMAC key of technician tokens")
    mqtt_internal_password: str = _f(min_len=16, doc="password of the gateway's own MQTT users")
    cloud_key: str = _f("", doc="key of the site's x-signature towards the cloud (uplink.md); needed with cloud.url")
    cloud_bridge_password: str = _f("", doc="password of the cloud MQTT bridge's user, if it has one")
    metrics_token: str = _f("", doc="bearer token that allows GET /metrics from any address; empty: none",
                            pattern=r"^(|[!-~]{16,256})\Z")


# --- generic loader -------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


class _Loader:
    def __init__(self, file: str, base_dir: Path) -> None:
        self.file = file
        self.base_dir = base_dir

    def fail(self, key: str, problem: str) -> typing.NoReturn:
        raise ConfigError(self.file, key, problem)

    def build(self, cls: type, data: Any, key: str) -> Any:
        if not isinstance(data, dict):
            self.fail(key, f"must be a table, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for k in data:
            if k not in names:
                self.fail(_join(key, k), f"unknown key (known: {', '.join(sorted(names))})")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            fkey = _join(key, f.name)
            if f.name in data:
                values[f.name] = self.value(hints[f.name], data[f.name], fkey, f.metadata)
            elif f.default is dataclasses.MISSING:
                self.fail(fkey, "missing (required)")
        return cls(**values)

    def value(self, tp: Any, raw: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
        origin = typing.get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            return self.value(inner[0], raw, key, meta)
        if origin is tuple:
            if not isinstance(raw, list):
                self.fail(key, f"must be {_type_name(tp)}, got {_show(raw)}")
            item_tp = typing.get_args(tp)[0]
            items = tuple(
                self.value(item_tp, item, f"{key}[{i}]", {} if dataclasses.is_dataclass(item_tp) else meta)
                for i, item in enumerate(raw)
            )
            if len(items) < meta.get("min_len", 0):
                self.fail(key, f"needs at least {meta['min_len']} item(s)")
            return items
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.build(tp, raw, key)
        if origin is Literal:
            if raw not in typing.get_args(tp):
                self.fail(key, f"must be {_type_name(tp)}, got {_show(raw)}")
            return raw
        if tp is bool:
            if not isinstance(raw, bool):
                self.fail(key, f"must be true or false, got {_show(raw)}")
            return raw
        if tp is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                self.fail(key, f"must be an integer, got {_show(raw)}")
        elif tp is float:
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                self.fail(key, f"must be a number, got {_show(raw)}")
            raw = float(raw)
        elif tp is str:
            if not isinstance(raw, str):
                self.fail(key, f"must be a string, got {_show(raw)}")
        return self.check(raw, key, meta)

    def check(self, v: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
        if "min" in meta and v < meta["min"]:
            self.fail(key, f"must be at least {meta['min']}, got {v}")
        if "max" in meta and v > meta["max"]:
            self.fail(key, f"must be at most {meta['max']}, got {v}")
        if "choices" in meta and v not in meta["choices"]:
            self.fail(key, f"must be one of {', '.join(map(str, meta['choices']))}, got {v}")
        if isinstance(v, str):
            if "min_len" in meta and len(v) < meta["min_len"]:
                self.fail(key, f"must be at least {meta['min_len']} characters long")
            if "max_len" in meta and len(v) > meta["max_len"]:
                self.fail(key, f"must be at most {meta['max_len']} characters long")
            if "pattern" in meta and not re.match(meta["pattern"], v):
                self.fail(key, f"{_show(v)} does not match {meta['pattern']}")
            if meta.get("path") and v:
                v = str((self.base_dir / v).resolve()) if not os.path.isabs(v) else v
        return v


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes before parsing and lets this through
        raise ConfigError(path, "", f"not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a file") from None


def config_path(explicit: str | None = None) -> Path:
    """The config file to use: --config, else $CARWASH_GATEWAY_CONFIG, else the default."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    data = _read_toml(p)
    loader = _Loader(str(p), p.resolve().parent)
    cfg: Config = loader.build(Config, data, "")
    _cross_check(cfg, loader)
    return dataclasses.replace(cfg, source=str(p))


def load_secrets(cfg: Config) -> Secrets:
    p = Path(cfg.paths.secrets_file)
    data = _read_toml(p)
    loader = _Loader(str(p), p.resolve().parent)
    secrets: Secrets = loader.build(Secrets, data, "")
    if cfg.cloud.url and len(secrets.cloud_key) < 8:
        loader.fail("cloud_key", "required (at least 8 characters) when cloud.url is set")
    return secrets


def _cross_check(cfg: Config, loader: _Loader) -> None:
    try:
        zoneinfo.ZoneInfo(cfg.site.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        loader.fail("site.timezone", f"unknown time zone {cfg.site.timezone!r}")
    if cfg.outbox.backoff_min_sec > cfg.outbox.backoff_max_sec:
        loader.fail("outbox.backoff_min_sec", "must not exceed outbox.backoff_max_sec")
    # The web relays request bodies to the core as RPCs over the broker.
    if cfg.mqtt.internal_max_packet_bytes < cfg.web.body_limit_bytes + 65536:
        loader.fail("mqtt.internal_max_packet_bytes", "must be at least web.body_limit_bytes + 65536")
    for i, net in enumerate(cfg.metrics.allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            loader.fail(f"metrics.allow[{i}]", f"{net!r} is not an IP address or network")
    if cfg.cloud.bridge.enabled and not cfg.cloud.bridge.host:
        loader.fail("cloud.bridge.host", "required when cloud.bridge.enabled is true")
    buses: dict[str, BusConfig] = {}
    for i, bus in enumerate(cfg.buses):
        if bus.name in buses:
            loader.fail(f"buses[{i}].name", f"duplicate bus name {bus.name!r}")
        buses[bus.name] = bus
        if bus.type == "rtu" and not bus.device:
            loader.fail(f"buses[{i}].device", "required for an rtu bus")
        if bus.type == "tcp" and not bus.host:
            loader.fail(f"buses[{i}].host", "required for a tcp bus")
        if bus.rts_direction and bus.type != "rtu":
            loader.fail(f"buses[{i}].rts_direction", "only an rtu bus has a direction to drive")
        if bus.rts_direction and bus.direction_gpio is not None:
            loader.fail(f"buses[{i}].rts_direction", "choose one of rts_direction and direction_gpio")
        if bus.direction_gpio is not None and bus.type != "rtu":
            loader.fail(f"buses[{i}].direction_gpio", "only an rtu bus has a direction to drive")
    seen: dict[str, int] = {}
    spans: list[tuple[str, int, int, int, int]] = []
    for i, bay in enumerate(cfg.bays):
        if bay.id in seen:
            loader.fail(f"bays[{i}].id", f"duplicate bay id {bay.id!r} (also bays[{seen[bay.id]}])")
        seen[bay.id] = i
        if bay.bus not in buses:
            known = ", ".join(buses) or "none configured"
            loader.fail(f"bays[{i}].bus", f"unknown bus {bay.bus!r} (buses: {known})")
        # Register blocks of bays on one PLC must not overlap: a block spans BAY_REGISTER_SPAN.
        for bus_name, unit, base, end, j in spans:
            if bus_name == bay.bus and unit == bay.unit and base < bay.base + BAY_REGISTER_SPAN and bay.base < end:
                loader.fail(f"bays[{i}].base", f"registers overlap those of bays[{j}] on the same unit")
        spans.append((bay.bus, bay.unit, bay.base, bay.base + BAY_REGISTER_SPAN, i))


# Offsets 0..17 of washbay-v1; other profiles are checked against their own span by the bridge.
BAY_REGISTER_SPAN = 18


def write_secrets(path: Path, *, device_signing_key: str, cloud_key: str = "") -> None:
    """Write a new secrets file readable by its owner and group only. When this returns the file
    is on disk whole (data and name fsynced): a power cut right after setup must not leave it
    empty or missing, and `--force` leaves the old file or the new one, never neither."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (
        "# carwash-gateway secrets: readable by the service only, never commit or log.\n"
        f'device_signing_key = "{device_signing_key}"\n'
        f'jwt_secret = "{pysecrets.token_urlsafe(48)}"\n'
        f'mqtt_internal_password = "{pysecrets.token_urlsafe(24)}"\n'
        "# The site's key towards the cloud (x-signature of uplink batches and payments), given by the\n"
        "# cloud when the site is enrolled; needed when cloud.url is set.\n"
        f'cloud_key = "{cloud_key}"\n'
    )
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename: without it the name may not survive a power cut
    finally:
        os.close(dir_fd)
