"""Configuration: the shipped example, defaults, and one clear line per mistake (in-process; the
subcommands that read it, run as processes, are in tests/test_config_cli.py)."""

from __future__ import annotations

import dataclasses
import re
import typing
from importlib import resources
from pathlib import Path

import pytest

from gateway.config import Config, ConfigError, Secrets, load_config, load_secrets

EXAMPLE = Path(str(resources.files("gateway").joinpath("data/gateway.example.toml")))
SECRETS = ('device_signing_key = "0123456789abcdef"\njwt_secret = "' + "j" * 40
           + '"\nmqtt_internal_password = "' + "p" * 20 + '"\n')


def write(tmp: Path, text: str, name: str = "gateway.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def minimal(tmp: Path, extra: str = "") -> Path:
    write(tmp, SECRETS, "secrets.toml")
    return write(tmp, f'[site]\nid = "s1"\n[paths]\nsecrets_file = "secrets.toml"\ndatabase = "db.sqlite"\n{extra}')


def documented_keys(text: str) -> set[str]:
    """Dotted keys of the example, including `# key = value` lines for keys with no default."""
    keys: set[str] = set()
    section = ""
    for line in text.splitlines():
        m = re.match(r"^\[\[?([\w.]+)\]\]?\s*$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#?\s*(\w+)\s*=", line)
        if m:
            keys.add(f"{section}.{m.group(1)}" if section else m.group(1))
    return keys


def all_keys(cls: type, prefix: str = "") -> set[str]:
    out: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out |= all_keys(typing.get_args(tp)[0], f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(tp):
            out |= all_keys(tp, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def test_example_documents_every_key() -> None:
    missing = all_keys(Config) - documented_keys(EXAMPLE.read_text())
    assert not missing, f"keys missing from gateway.example.toml: {sorted(missing)}"


def test_example_loads_with_defaults(tmp_path: Path) -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.site.id == "site-0001"
    # Every value written in the example is the default of its key.
    defaults = Config(site=cfg.site, buses=cfg.buses, bays=cfg.bays)
    assert dataclasses.replace(cfg, source="") == defaults
    assert [b.id for b in cfg.bays] == ["bay1", "bay2"]


def test_minimal_config_relative_paths_and_secrets(tmp_path: Path) -> None:
    cfg = load_config(minimal(tmp_path))
    assert cfg.paths.database == str(tmp_path.resolve() / "db.sqlite")
    assert cfg.mqtt.port == 1883 and cfg.web.body_limit_bytes == 262144
    sec = load_secrets(cfg)
    assert isinstance(sec, Secrets) and sec.device_signing_key == "0123456789abcdef"


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("[web]\nprot = 8080\n", "web.prot", "unknown key"),
        ("[web]\nport = \"8080\"\n", "web.port", "must be an integer"),
        ("[web]\nport = 70000\n", "web.port", "at most 65535"),
        ("[mqtt]\nallow_anonymous = 1\n", "mqtt.allow_anonymous", "true or false"),
        ("[signatures]\nhttp_schemes = [\"md5\"]\n", "signatures.http_schemes[0]", "one of"),
        ("[signatures]\nhttp_schemes = []\n", "signatures.http_schemes", "at least 1"),
        ("[devices]\ncommand_timeout_sec = 0\n", "devices.command_timeout_sec", "at least 1"),
        ("[[buses]]\nname = \"b\"\ntype = \"rtu\"\n", "buses[0].device", "required for an rtu bus"),
        ("[[buses]]\nname = \"b\"\ntype = \"serial\"\n", "buses[0].type", "one of"),
        ("[[buses]]\nname = \"b\"\ntype = \"tcp\"\nhost = \"10.0.0.5\"\n[[bays]]\nid = \"bay1\"\nbus = \"x\"\n",
         "bays[0].bus", "unknown bus 'x'"),
        ("[[buses]]\nname = \"b\"\ntype = \"tcp\"\nhost = \"h\"\n[[bays]]\nid = \"bay1\"\nbus = \"b\"\n"
         "[[bays]]\nid = \"bay1\"\nbus = \"b\"\nunit = 2\n", "bays[1].id", "duplicate bay id"),
        ("[[buses]]\nname = \"b\"\ntype = \"tcp\"\nhost = \"h\"\n[[bays]]\nid = \"bay1\"\nbus = \"b\"\n"
         "[[bays]]\nid = \"bay2\"\nbus = \"b\"\nbase = 10\n", "bays[1].base", "overlap"),
        ("[[buses]]\nname = \"b\"\ntype = \"rtu\"\ndevice = \"/dev/x\"\nbaudrate = 12345\n",
         "buses[0].baudrate", "one of"),
        ("[[buses]]\nname = \"b\"\ntype = \"rtu\"\ndevice = \"/dev/x\"\nrts_direction = true\n"
         "direction_gpio = 18\n", "buses[0].rts_direction", "choose one"),
        ("[[buses]]\nname = \"b\"\ntype = \"tcp\"\nhost = \"h\"\nrts_direction = true\n",
         "buses[0].rts_direction", "only an rtu bus"),
        ("[[buses]]\nname = \"b\"\ntype = \"tcp\"\nhost = \"h\"\ndirection_gpio = 18\n",
         "buses[0].direction_gpio", "only an rtu bus"),
        ("[cloud]\nurl = \"ftp://x\"\n", "cloud.url", "does not match"),
        ("[cloud.bridge]\nenabled = true\n", "cloud.bridge.host", "required"),
        ("[outbox]\nbackoff_min_sec = 10.0\nbackoff_max_sec = 5.0\n", "outbox.backoff_min_sec", "must not exceed"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, extra: str, key: str, words: str) -> None:
    path = minimal(tmp_path, extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key
    assert words in err.value.problem
    line = str(err.value)
    assert line.startswith(f"{path}: {key}: ") and "\n" not in line


def test_site_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"site: missing \(required\)"):
        load_config(write(tmp_path, "[web]\nport = 80\n"))
    with pytest.raises(ConfigError, match="site.timezone: unknown time zone 'Mars/Olympus'"):
        load_config(write(tmp_path, '[site]\nid = "s"\ntimezone = "Mars/Olympus"\n'))
    with pytest.raises(ConfigError, match="site.id: 'bad id!' does not match"):
        load_config(write(tmp_path, '[site]\nid = "bad id!"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[site\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_secrets_errors_name_key_not_value(tmp_path: Path) -> None:
    cfg = load_config(minimal(tmp_path))
    write(tmp_path, 'device_signing_key = "short"\njwt_secret = "' + "j" * 40
          + '"\nmqtt_internal_password = "' + "p" * 20 + '"\n', "secrets.toml")
    with pytest.raises(ConfigError) as err:
        load_secrets(cfg)
    assert err.value.key == "device_signing_key" and "short" not in str(err.value)
    (tmp_path / "secrets.toml").unlink()
    with pytest.raises(ConfigError, match="secrets.toml: file not found"):
        load_secrets(cfg)
