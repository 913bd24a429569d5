"""The configuration file (SPEC §2): YAML -> validated, immutable pydantic models, with every problem
reported as `FILE:LINE:COL: path.to.key: message` (1-based; `path` is dotted, list items by index:
`devices.cod.interval`, `alarms.2.above`; problems with the file as a whole use the path `(file)`).

Imports `agent.envsubst`, `drivers.registers`, `drivers.profiles` (names, maps) and, lazily,
`drivers.serial_frames` (the fixed channels of pms5003/sds011); nothing else from the project.
Entry points: `load_config`, `parse_config`, `check_files`, `json_schema`.

How it works: `yaml.compose` gives a node tree with line/column marks; `_TreeBuilder` turns it into
plain Python data (detecting duplicate keys, substituting `${NAME}`, remembering where every key and
value sits); pydantic validates the data; `_cross_check` validates references between sections
(devices -> buses, alarms -> devices/channels, payload -> hj212) on the plain data, so it runs even
when a section is invalid. Every error, whatever its source, becomes a `Problem` located through the
remembered marks. One limit: a rule that combines several keys of one section (url vs urls, cert
without key, ...) is checked once that section's keys are individually valid, so it may show up only
after the other problems of that section are fixed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import ipaddress
import os
import re
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.envsubst import SubstitutionError, substitute
from drivers import profiles
from drivers.registers import RegisterSpec, check_map, value_channels

__all__ = [
    "AGGREGATE_MINUTES",
    "DRIVERS",
    "FILE_PATH",
    "PRESETS",
    "Action",
    "Aggregate",
    "Alarm",
    "Broker",
    "Bus",
    "Config",
    "ConfigError",
    "Console",
    "Device",
    "Hj212",
    "Mqtt",
    "Problem",
    "RtuBus",
    "SerialBus",
    "SimChannel",
    "Station",
    "Storage",
    "TcpBus",
    "Tls",
    "Uplink",
    "check_files",
    "json_schema",
    "load_config",
    "parse_config",
]

# --------------------------------------------------------------------------------------------------
# Constants

#: Path shown for problems that belong to the file as a whole (missing, unreadable, empty, syntax).
FILE_PATH = "(file)"



def _preset_names() -> tuple[str, ...]:
    """The names of the alarm presets in the packaged `agent/data/presets.yaml` (the limits
    themselves are read by `agent.alarms.load_presets`)."""
    text = importlib.resources.files("agent").joinpath("data/presets.yaml").read_text("utf-8")
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or not isinstance(document.get("presets"), dict):
        raise ValueError("agent/data/presets.yaml: top-level 'presets' mapping missing")
    return tuple(str(name) for name in document["presets"])


#: Alarm presets (DOMAIN.md "Limits for alarm presets"): names of agent/data/presets.yaml.
PRESETS: tuple[str, ...] = _preset_names()

DRIVERS: tuple[str, ...] = ("modbus", "pms5003", "sds011", "hj212", "simulated")
SERIAL_DRIVERS = frozenset({"pms5003", "sds011", "hj212"})
MODBUS_BUS_TYPES = frozenset({"rtu", "tcp"})
AGGREGATE_MINUTES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30)

STATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,24}")
DEVICE_ID_RE = re.compile(r"[a-z0-9_-]+")
BUS_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
CHANNEL_RE = re.compile(r"[A-Za-z0-9_]+")

# Keys whose values are never echoed in a message, even when they were written literally.
_SECRET_KEYS = frozenset({"password", "pw"})

# Unit words appended to range messages ("must be at least 0.1 seconds").
_UNITS: dict[str, str] = {
    name: " seconds"
    for name in (
        "interval", "timeout", "reconnect_max", "shutdown_grace", "keepalive", "delay", "clear_delay",
        "window", "stale", "fault", "min_on", "period", "stuck_after",
    )
} | {"max_mb": " MB", "keep_sent_days": " days", "commit_interval_ms": " ms"}


# --------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file, located at a 1-based line and column."""

    file: str
    line: int
    col: int
    path: str  # dotted key path (`devices.cod.interval`, `alarms.2.above`) or FILE_PATH
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.path}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid; `.problems` lists every problem found, in file order."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------------------------------
# Scalars as written: a number written where text is expected keeps its spelling ("0012" stays
# "0012", not 10), because `_as_text` takes the raw YAML text of the number.


class _RawInt(int):
    _yaml_raw: str


class _RawFloat(float):
    _yaml_raw: str


def _with_raw(value: Any, raw: str) -> Any:
    if type(value) is int:
        wrapped: Any = _RawInt(value)
    elif type(value) is float:
        wrapped = _RawFloat(value)
    else:
        return value
    wrapped._yaml_raw = raw
    return wrapped


def _err(message: str, at: str | None = None, *, section: bool = False) -> PydanticCustomError:
    """A validation error with a technician-readable message. It points at the value being
    validated; at the key `at` of it (dotted, relative); or, with `section`, at the key of the
    section a model-level rule is about."""
    # Braces in the message would be taken as format fields by pydantic-core: double them.
    template = message.replace("{", "{{").replace("}", "}}")
    return PydanticCustomError("config_section" if section else "config", template, {"at": at} if at else None)


def _as_text(value: Any) -> Any:
    raw = getattr(value, "_yaml_raw", None)
    if raw is not None:
        return raw
    if isinstance(value, bool):
        raise _err("expected text, got a yes/no value (put the value in quotes)")
    if isinstance(value, int | float):
        return str(value)
    return value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _none_to_empty_dict(value: Any) -> Any:
    return {} if value is None else value


def _none_to_empty_list(value: Any) -> Any:
    return [] if value is None else value


def _suggest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _known(choices: Iterable[str], what: str) -> str:
    items = sorted(choices)
    if not items:
        return f" (no {what} are defined)"
    if len(items) > 12:
        return ""
    return f"; {what}: " + ", ".join(items)


Text = Annotated[str, BeforeValidator(_as_text)]


def _non_empty_text(value: str) -> str:
    if not value.strip():
        raise _err("must not be empty")
    return value


NonEmptyText = Annotated[Text, AfterValidator(_non_empty_text)]


def _check_path_text(value: Any) -> Any:
    value = _as_text(value)
    if isinstance(value, str) and not value.strip():
        raise _err("must not be empty")
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file's directory (context `base_dir`)."""
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return Path(os.path.normpath(value))


FilePath = Annotated[Path, BeforeValidator(_check_path_text), AfterValidator(_resolve_path)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# station, storage


class Station(_Model):
    """`station:` who this gateway is."""

    id: Annotated[Text, Field(description="Station code (HJ 212 MN, used in topics): [A-Za-z0-9_-]{1,24}",
                              json_schema_extra={"pattern": r"^[A-Za-z0-9_-]{1,24}$"})]
    name: Text | None = Field(None, description="Human-readable station name")
    type: Literal["river_section", "outfall", "dust", "other"] = Field(
        description="river_section | outfall | dust | other")
    timezone: Text = Field("Asia/Shanghai", description="IANA zone for HJ 212 times and day boundaries")

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not STATION_ID_RE.fullmatch(value):
            raise _err(f"station id {value!r} must be 1 to 24 characters of A-Z, a-z, 0-9, '_' or '-'")
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ValueError, KeyError, OSError):
            raise _err(f"unknown time zone {value!r} (use an IANA name such as Asia/Shanghai)") from None
        return value


class Storage(_Model):
    """`storage:` the SQLite buffer."""

    path: FilePath = Field(description="Buffer database file; relative paths are relative to the config file")
    max_mb: float = Field(256, gt=0, description="Hard cap on the database size, MB")
    keep_sent_days: float = Field(7, ge=0, description="Days published readings are kept for resend requests")
    commit_interval_ms: int = Field(200, ge=1, le=60000,
                                    description="Group-commit window = the most a power cut can lose")
    sync: Literal["full", "normal"] = Field("full", description="SQLite synchronous mode (extension)")


# --------------------------------------------------------------------------------------------------
# mqtt


class Broker(NamedTuple):
    """One broker address, parsed from an `mqtt://` or `mqtts://` url."""

    host: str
    port: int
    tls: bool
    url: str


def _check_mqtt_url(value: str) -> str:
    value = value.strip()
    if "://" not in value:
        raise _err("a broker url must start with mqtt:// or mqtts:// (e.g. mqtt://192.168.1.10:1883)")
    scheme = value.split("://", 1)[0].lower()
    if scheme not in ("mqtt", "mqtts"):
        raise _err(f"unsupported scheme '{scheme}://': use mqtt:// or mqtts://")
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise _err("do not put a user or password in the url; use username: and password_file:")
    if not parts.hostname:
        raise _err("the url names no host (expected mqtt://HOST[:PORT])")
    try:
        port = parts.port
    except ValueError:
        raise _err("the url's port must be a number from 1 to 65535") from None
    if port == 0:
        raise _err("the url's port must be a number from 1 to 65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _err("a broker url has no path, query or fragment (expected mqtt://HOST[:PORT])")
    return value


MqttUrl = Annotated[Text, AfterValidator(_check_mqtt_url)]


def _parse_broker(url: str) -> Broker:
    parts = urlsplit(url)
    tls = parts.scheme.lower() == "mqtts"
    return Broker(parts.hostname or "", parts.port or (8883 if tls else 1883), tls, url)


class Tls(_Model):
    """`mqtt.tls:` CA bundle and optional client certificate (cert and key together)."""

    ca: FilePath | None = Field(None, description="CA certificate(s), PEM; default: the system's CAs")
    cert: FilePath | None = Field(None, description="Client certificate, PEM (needs key)")
    key: FilePath | None = Field(None, description="Client private key, PEM (needs cert)")

    @model_validator(mode="after")
    def _cert_and_key(self) -> Tls:
        if self.cert is not None and self.key is None:
            raise _err("cert needs key too (the client certificate's private key)", at="cert")
        if self.key is not None and self.cert is None:
            raise _err("key needs cert too (the client certificate)", at="key")
        return self


def _check_topic_prefix(value: str) -> str:
    if not value or value.startswith("/") or value.endswith("/") or "//" in value:
        raise _err("must be a topic like 'env' or 'prov/env' (no leading, trailing or double '/')")
    if any(c in value for c in "#+\0"):
        raise _err("must not contain the MQTT wildcards '#' or '+'")
    return value


class Mqtt(_Model):
    """`mqtt:` the broker the station publishes to."""

    url: MqttUrl | None = Field(None, description="mqtt://host[:1883] or mqtts://host[:8883]")
    urls: Annotated[list[MqttUrl], Field(min_length=1)] | None = Field(
        None, description="Several broker urls for failover, tried in order (instead of url)")
    client_id: NonEmptyText | None = Field(None, description="MQTT client id; default: station.id")
    username: Text | None = None
    password: Text | None = Field(None, repr=False, description="Prefer password_file or ${VAR}")
    password_file: FilePath | None = Field(None, description="File holding the password (one line)")
    tls: Tls | None = None
    topic_prefix: Annotated[Text, AfterValidator(_check_topic_prefix)] = Field(
        "env", description="Topics are {topic_prefix}/{station.id}/...")
    qos: Literal[0, 1] = Field(1, description="0 or 1; only 1 promises delivery")
    payload: Literal["json", "hj212"] = "json"
    max_batch: int = Field(200, ge=1, le=10000, description="Readings per data message when draining a backlog")
    reconnect_max: float = Field(30, gt=0, description="Reconnect backoff ceiling, seconds")
    shutdown_grace: float = Field(5, ge=0, description="Seconds to go on publishing after SIGTERM")
    keepalive: int = Field(30, ge=1, le=65535, description="MQTT keepalive, seconds (extension)")

    @model_validator(mode="after")
    def _rules(self) -> Mqtt:
        if self.url is not None and self.urls is not None:
            raise _err("give either url or urls, not both", at="urls")
        if self.url is None and self.urls is None:
            raise _err("missing required key 'url' (or 'urls' for failover)", section=True)
        if self.password is not None and self.password_file is not None:
            raise _err("give either password or password_file, not both", at="password_file")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise _err("a password needs a username (MQTT sends no password without a user name)",
                       at="password" if self.password is not None else "password_file")
        if self.tls is not None and any(not b.tls for b in self.brokers()):
            raise _err("tls is set but the broker url is mqtt:// (plain); use mqtts://", at="tls")
        return self

    def broker_urls(self) -> list[str]:
        """The broker urls in failover order (one when `url` is used)."""
        if self.urls is not None:
            return list(self.urls)
        return [self.url] if self.url is not None else []

    def brokers(self) -> list[Broker]:
        """The brokers in failover order, with host, port (defaults 1883 / 8883) and TLS flag."""
        return [_parse_broker(u) for u in self.broker_urls()]

    def read_password(self) -> str | None:
        """The MQTT password: `password`, or the content of `password_file` without its trailing
        newline, or None. Raises ConfigError (never quoting the file) when the file can't be read."""
        if self.password is not None:
            return self.password
        if self.password_file is None:
            return None
        try:
            text = self.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
            raise ConfigError([Problem(str(self.password_file), 1, 1, "mqtt.password_file",
                                       f"cannot read the password file: {reason}")]) from None
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        return text


# --------------------------------------------------------------------------------------------------
# buses

Parity = Annotated[Literal["N", "E", "O"], BeforeValidator(_upper)]


class RtuBus(_Model):
    """A Modbus RTU line (RS-485 / RS-232)."""

    type: Literal["rtu"]
    port: NonEmptyText = Field(description="Serial device, e.g. /dev/ttyUSB0")
    baudrate: int = Field(9600, gt=0)
    parity: Parity = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout: float = Field(0.5, gt=0, description="Answer timeout, seconds")
    retries: int = Field(1, ge=0, description="Retries before a device is given up for this poll")


class TcpBus(_Model):
    """A Modbus TCP connection (instrument or RS-485 gateway)."""

    type: Literal["tcp"]
    host: NonEmptyText
    port: int = Field(502, ge=1, le=65535)
    timeout: float = Field(1.0, gt=0, description="Answer timeout, seconds")
    retries: int = Field(1, ge=0, description="Retries before a device is given up for this poll")


class SerialBus(_Model):
    """A serial port for instruments that stream frames (PMS5003, SDS011, HJ 212 over RS-232)."""

    type: Literal["serial"]
    port: NonEmptyText = Field(description="Serial device, e.g. /dev/ttyAMA0")
    baudrate: int = Field(9600, gt=0)
    parity: Parity = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout: float = Field(1.0, gt=0, description="Read timeout, seconds")


Bus = Annotated[RtuBus | TcpBus | SerialBus, Field(discriminator="type")]


def _check_bus_name(value: str) -> str:
    if not BUS_NAME_RE.fullmatch(value):
        raise _err(f"bus name {value!r} may only contain letters, digits, '_', '.' and '-'")
    return value


def _check_device_id(value: str) -> str:
    if not DEVICE_ID_RE.fullmatch(value):
        raise _err(f"device id {value!r} may only contain a-z (lower case), 0-9, '_' and '-'")
    return value


def _check_channel_code(value: str) -> str:
    if not CHANNEL_RE.fullmatch(value):
        hint = " ('-' separates code and field in HJ 212)" if "-" in value else ""
        raise _err(f"channel code {value!r} may only contain letters, digits and '_'{hint}")
    return value


BusName = Annotated[str, AfterValidator(_check_bus_name)]
DeviceId = Annotated[str, AfterValidator(_check_device_id)]
ChannelCode = Annotated[str, AfterValidator(_check_channel_code)]


# --------------------------------------------------------------------------------------------------
# devices

def _spec_fields(spec: RegisterSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def _profile_specs(name: str) -> tuple[RegisterSpec, ...] | None:
    """The registers of built-in profile `name`, or None when it is unknown or broken."""
    if name not in profiles.names():
        return None
    try:
        return profiles.load(name).registers
    except ValueError:  # ProfileError: reported by Device._check_profile
        return None


def _serial_channels(driver: str) -> tuple[str, ...] | None:
    """The fixed channels of a serial frame driver (pms5003, sds011), when the driver module is there."""
    try:
        from drivers import serial_frames
    except ImportError:  # pragma: no cover - the module ships with the package
        return None
    return {"pms5003": getattr(serial_frames, "PMS5003_CHANNELS", None),
            "sds011": getattr(serial_frames, "SDS011_CHANNELS", None)}.get(driver)


class SimChannel(_Model):
    """One channel of a `driver: simulated` device: mean + amplitude*sin(2 pi t/period) + noise."""

    unit: Text | None = None
    mean: float = 0.0
    amplitude: float = 0.0
    period: float = Field(86400.0, gt=0, description="Seconds per cycle of the sine wave")
    noise: float = Field(0.0, ge=0, description="Standard deviation of Gaussian noise")
    dropout: float = Field(0.0, ge=0, le=1, description="Probability that a reading fails (null, flag B)")
    stuck_after: float | None = Field(None, ge=0, description="Seconds after start when the value freezes")
    spike_chance: float = Field(0.0, ge=0, le=1, description="Probability of a spike per reading")
    spike: float = Field(0.0, description="Added to the value when a spike happens")
    decimals: int | None = Field(None, ge=0, le=10, description="Round values to this many decimals")


class Device(_Model):
    """`devices.ID:` one instrument. `driver` is always set on a Config returned by load_config."""

    bus: Text | None = Field(None, description="Name of a bus under buses: (not for driver: simulated)")
    slave: int | None = Field(None, ge=0, le=247, description="Modbus unit id")
    interval: float = Field(60.0, ge=0.1, description="Poll period, seconds (>= 0.1)")
    profile: Text | None = Field(None, description="Built-in register map (drivers/profiles/)")
    registers: Annotated[list[RegisterSpec], Field(min_length=1)] | None = Field(
        None, description="Inline register map; with a profile, entries override the profile's entry of "
        "the same channel (and may give only the keys to change) or add channels")
    driver: Literal["modbus", "pms5003", "sds011", "hj212", "simulated"] | None = Field(
        None, description="Default: modbus on an rtu/tcp bus")
    channels: Annotated[dict[ChannelCode, SimChannel], Field(min_length=1)] | None = Field(
        None, description="Simulated channels (driver: simulated only)")
    dropout: float | None = Field(None, ge=0, le=1,
                                  description="Probability that a whole poll fails (simulated only)")
    seed: int | None = Field(None, description="Random seed (simulated only)")

    @model_validator(mode="before")
    @classmethod
    def _complete_overrides(cls, data: Any) -> Any:
        """With a profile, `{channel: w01018, range: [0, 500]}` changes only `range` of the profile's
        w01018 entry: complete such entries from the profile before they are validated."""
        if not isinstance(data, dict) or not isinstance(data.get("registers"), list):
            return data
        name = _text_of(data.get("profile"))
        specs = _profile_specs(name) if name is not None else None
        if specs is None:
            return data
        base = {s.channel: s for s in specs}
        filled = []
        for entry in data["registers"]:
            if isinstance(entry, dict) and _text_of(entry.get("channel")) in base:
                entry = {**_spec_fields(base[str(_text_of(entry["channel"]))]), **entry}
            filled.append(entry)
        return {**data, "registers": filled}

    @field_validator("profile")
    @classmethod
    def _check_profile(cls, value: str) -> str:
        known = profiles.names()
        if value not in known:
            if not known:
                raise _err(f"unknown profile {value!r} (no built-in profiles are installed)")
            raise _err(f"unknown profile {value!r}{_suggest(value, known)}{_known(known, 'profiles')}")
        try:
            profiles.load(value)
        except ValueError as exc:
            raise _err(f"built-in profile {value!r} cannot be used: {exc}") from None
        return value

    @field_validator("registers")
    @classmethod
    def _unique_register_channels(cls, value: list[RegisterSpec] | None) -> list[RegisterSpec] | None:
        seen: set[str] = set()
        for i, spec in enumerate(value or ()):
            if spec.channel in seen:
                raise _err(f"channel {spec.channel!r} appears twice in this device", at=f"{i}.channel")
            seen.add(spec.channel)
        return value

    @model_validator(mode="after")
    def _rules(self) -> Device:
        simulated_only = ("channels", "dropout", "seed")
        if self.driver == "simulated":
            for key in ("bus", "slave", "profile", "registers"):
                if getattr(self, key) is not None:
                    raise _err(f"a simulated device takes no {key} (remove it, or set another driver)", at=key)
            if self.channels is None:
                raise _err("missing required key 'channels' (a simulated device needs channels)", section=True)
            return self
        for key in simulated_only:
            if getattr(self, key) is not None:
                raise _err(f"{key} is only for driver: simulated", at=key)
        if self.driver in SERIAL_DRIVERS:
            for key in ("slave", "profile", "registers"):
                if getattr(self, key) is not None:
                    raise _err(f"driver {self.driver} takes no {key} (it is for Modbus devices)", at=key)
        if self.registers is not None:
            try:
                self.register_map()
            except ValueError as exc:
                raise _err(str(exc), at="registers") from None
        return self

    def register_map(self) -> list[RegisterSpec] | None:
        """The Modbus register map: the profile's entries with the inline ones merged in (an inline
        entry replaces the profile's entry of the same channel; others are appended), or the inline
        entries alone. None for a device with neither. Raises ValueError for an inconsistent map."""
        if self.profile is not None:
            return profiles.merge(profiles.load(self.profile).registers, self.registers or [])
        if self.registers is not None:
            check_map(self.registers)
            return list(self.registers)
        return None

    def known_channels(self) -> list[str] | None:
        """The channel codes this device produces readings for, when the config tells them
        (simulated channels, register map, the fixed channels of pms5003/sds011); else None."""
        if self.channels is not None:
            return list(self.channels)
        if self.driver in ("pms5003", "sds011"):
            return list(_serial_channels(self.driver) or []) or None
        try:
            specs = self.register_map()
        except ValueError:
            return None
        return value_channels(specs) if specs is not None else None


# --------------------------------------------------------------------------------------------------
# aggregate, hj212, alarms


_AGG_CHANNEL_RE = re.compile(r"[a-z0-9_-]+\.[A-Za-z0-9_]+")


def _share(value: Any) -> Any:
    """`min_valid: 0.75` is short for the same share for minute, hour and day periods."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not 0 < value <= 1:
            raise _err(f"must be a share above 0 and at most 1, e.g. 0.75 (got {_show(value)})")
        return {"minute": value, "hour": value, "day": value}
    return value


def _share_schema(schema: dict[str, Any]) -> None:
    share = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
    schema.clear()
    schema.update({
        "description": "Share of the expected values (period / device interval) that must be valid for flag N: "
                       "one number, or per period kind",
        "anyOf": [share, {"type": "object", "additionalProperties": False,
                          "properties": {"minute": share, "hour": share, "day": share}}],
    })


class AggregateShare(_Model):
    """`aggregate.min_valid:` per period kind, the share of expected values that must be valid."""

    minute: float = Field(0.75, gt=0, le=1)
    hour: float = Field(0.75, gt=0, le=1)
    day: float = Field(0.75, gt=0, le=1)


class AggregateCount(_Model):
    """`aggregate.min_count:` per period kind, an absolute number of valid values (replaces min_valid)."""

    minute: int | None = Field(None, ge=1)
    hour: int | None = Field(None, ge=1)
    day: int | None = Field(None, ge=1)


def _check_agg_channel(value: str) -> str:
    if not _AGG_CHANNEL_RE.fullmatch(value):
        raise _err(f"{value!r} must be \"device.channel\"")
    return value


AggChannel = Annotated[Text, AfterValidator(_check_agg_channel)]


class Aggregate(_Model):
    """`aggregate:` HJ 212 period statistics computed at the edge (see agent/aggregate.py)."""

    minute: Literal[1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30] = Field(
        10, description="Minutes per 'minute' period (divides 60)")
    hour: bool = True
    day: bool = True
    min_valid: Annotated[AggregateShare, BeforeValidator(_share)] = Field(
        default_factory=lambda: AggregateShare.model_validate({}), json_schema_extra=_share_schema)
    min_count: AggregateCount | None = Field(
        None, description="Valid values a period needs for flag N, per period kind (instead of min_valid)")
    flow: AggChannel | None = Field(
        None, description='"device.channel" of the wastewater flow (w00000, L/s): enables flow-weighted '
                          "concentrations and pollutant loads (cou, kg)")
    flow_weighted: list[AggChannel] | None = Field(
        None, description='"device.channel" list of the concentrations to weight by the flow '
                          "(default: every channel in mg/L, ug/L, ng/L or g/L)")
    grace: float = Field(2.0, ge=0, le=300,
                         description="Seconds after a period's end to wait for its last readings before computing it")


class Uplink(_Model):
    """An HJ 212 platform reached over TCP."""

    host: NonEmptyText
    port: int = Field(ge=1, le=65535)
    timeout: float = Field(10.0, gt=0, description="Seconds to wait for the platform's answer")
    retries: int = Field(3, ge=0)


class Hj212(_Model):
    """`hj212:` HJ 212 identity, for `payload: hj212` and for uplinks."""

    version: Annotated[Literal["2017"], BeforeValidator(_as_text)] = Field(
        "2017", description="Protocol version (only 2017 for now)")
    st: int = Field(ge=0, le=99, description="System code: 21 surface water, 32 water source, 39 dust, ...")
    pw: Text = Field(repr=False, description="Access password (PW=)")
    uplinks: Annotated[list[Uplink], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)


_ALARM_CHANNEL_RE = re.compile(r"\*|[a-z0-9_-]+\.(\*|[A-Za-z0-9_]+)")
_BACKGROUND_RE = re.compile(r"[a-z0-9_-]+\.[A-Za-z0-9_]+")


with warnings.catch_warnings():  # the YAML key `register` shadows ABCMeta.register; harmless
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Action(_Model):
        """`alarms[].action:` write a coil (or a register) of a Modbus device on raise, back on clear."""

        device: NonEmptyText
        coil: int | None = Field(None, ge=0, le=65535, description="Coil address (0-based)")
        register: int | None = Field(None, ge=0, le=65535, description="Holding register address (0-based)")
        on: int | None = Field(None, description="Value written on raise (register: required; coil: 1)")
        off: int | None = Field(None, description="Value written on clear (register: required; coil: 0)")
        min_on: float = Field(0.0, ge=0, description="Keep it on at least this many seconds")

        @model_validator(mode="after")
        def _rules(self) -> Action:
            if self.coil is None and self.register is None:
                raise _err("missing required key 'coil' (or 'register')", section=True)
            if self.coil is not None and self.register is not None:
                raise _err("give either coil or register, not both", at="register")
            if self.register is not None:
                for key in ("on", "off"):
                    value = getattr(self, key)
                    if value is None:
                        raise _err(f"missing required key '{key}' (the value to write into the register)", section=True)
                    if not 0 <= value <= 65535:
                        raise _err("must be from 0 to 65535", at=key)
            else:
                for key in ("on", "off"):
                    if getattr(self, key) not in (None, 0, 1):
                        raise _err("a coil is on or off: use true/false (or 1/0)", at=key)
            return self


class Alarm(_Model):
    """One alarm rule (`alarms[]`); see SPEC §2 for the semantics."""

    channel: Text = Field(description='"device.channel", "device.*" or "*"')
    above: float | None = None
    below: float | None = None
    hysteresis: float = Field(0.0, ge=0)
    delay: float = Field(0.0, ge=0, description="Seconds beyond the limit before raising")
    clear_delay: float | None = Field(None, ge=0, description="Seconds back within before clearing; default: delay")
    window: float | None = Field(None, gt=0, description="Apply the rule to the rolling mean over this many seconds")
    preset: Text | None = Field(None, json_schema_extra={"enum": list(PRESETS)},
                                description="Limit and window from a standard")
    stale: float | None = Field(None, gt=0, description="Raise when no valid reading for this many seconds")
    fault: float | None = Field(None, gt=0, description="Raise when the device is in fault this many seconds")
    background: Text | None = Field(None, description="device.channel to subtract (background station)")
    action: Action | None = None

    @field_validator("channel")
    @classmethod
    def _check_channel(cls, value: str) -> str:
        if not _ALARM_CHANNEL_RE.fullmatch(value):
            raise _err(f"channel {value!r} must be \"device.channel\", \"device.*\" or \"*\"")
        return value

    @field_validator("background")
    @classmethod
    def _check_background(cls, value: str) -> str:
        if not _BACKGROUND_RE.fullmatch(value):
            raise _err(f"background {value!r} must be \"device.channel\"")
        return value

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise _err(f"unknown preset {value!r}{_suggest(value, PRESETS)}; presets: {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _rules(self) -> Alarm:
        if all(getattr(self, k) is None for k in ("above", "below", "preset", "stale", "fault")):
            raise _err("a rule needs at least one of above, below, preset, stale or fault", section=True)
        if self.preset is not None:
            for key in ("above", "below", "window"):
                if getattr(self, key) is not None:
                    raise _err(f"the preset sets the limit and window: remove {key}", at=key)
        if self.above is not None and self.below is not None and self.above <= self.below:
            raise _err("above must be greater than below (the rule raises above 'above' or below 'below')",
                       at="above")
        return self

    def effective_clear_delay(self) -> float:
        """`clear_delay`, defaulting to `delay`."""
        return self.delay if self.clear_delay is None else self.clear_delay


# --------------------------------------------------------------------------------------------------
# console

_LISTEN_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>[0-9]{1,5})")


def _split_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` -> (host, port); raises ValueError with a readable reason."""
    m = _LISTEN_RE.fullmatch(value.strip())
    if m is None and value.count(":") > 1 and not value.strip().startswith("["):
        raise ValueError("put an IPv6 address in brackets: [::1]:8080")
    if m is None:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError("the port must be a number from 1 to 65535")
    host = m.group("v6") or m.group("host")
    if host.lower() == "localhost":
        return "localhost", port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address: use an address of this gateway (e.g. 192.168.1.10), "
                         "0.0.0.0 for every interface, or localhost") from None
    return host, port


def _check_listen(value: str) -> str:
    try:
        _split_listen(value)
    except ValueError as exc:
        raise _err(str(exc)) from None
    return value.strip()


class Console(_Model):
    """`console:` the local web console for technicians (read-only; off unless this section exists)."""

    listen: Annotated[Text, AfterValidator(_check_listen)] = Field(
        "127.0.0.1:8080", description="HOST:PORT to serve on; any address other than loopback needs password_file")
    password_file: FilePath | None = Field(
        None, description="File holding the console password (one line); HTTP basic auth, any user name")

    @model_validator(mode="after")
    def _rules(self) -> Console:
        if self.password_file is None and not self.is_loopback():
            raise _err(f"{self.listen} is reachable from other machines: set password_file (or listen on "
                       "127.0.0.1)", at="listen")
        return self

    def address(self) -> tuple[str, int]:
        """(host, port) to bind; the host is an IP literal or `localhost`."""
        return _split_listen(self.listen)

    def is_loopback(self) -> bool:
        """True when only this machine can connect (127.0.0.0/8, ::1, localhost)."""
        host, _ = self.address()
        return host == "localhost" or ipaddress.ip_address(host).is_loopback


# --------------------------------------------------------------------------------------------------
# the whole file


class Config(_Model):
    """The whole configuration file. Build it with `load_config` (locations, env, paths)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="edge-agent configuration")

    station: Station
    storage: Storage
    mqtt: Mqtt
    buses: Annotated[dict[BusName, Bus], BeforeValidator(_none_to_empty_dict)] = Field(
        default_factory=dict, description="One entry per physical link")
    devices: Annotated[dict[DeviceId, Device], Field(min_length=1)] = Field(
        description="One entry per instrument; the key is the device id")
    aggregate: Annotated[Aggregate, BeforeValidator(_none_to_empty_dict)] = Field(
        default_factory=lambda: Aggregate.model_validate({}))
    hj212: Hj212 | None = None
    alarms: Annotated[list[Alarm], BeforeValidator(_none_to_empty_list)] = Field(default_factory=list)
    console: Annotated[Console | None, BeforeValidator(_none_to_empty_dict)] = Field(
        None, description="Local web console (read-only); off unless this section is present")

    _source_path: Path | None = PrivateAttr(default=None)
    _marks: dict[tuple[str | int, ...], tuple[int, int]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _finish(self, info: ValidationInfo) -> Config:
        context = info.context or {}
        if not context.get("_cross_checked"):
            problems = _cross_check(self.model_dump(mode="python"))
            if problems:
                raise _err("; ".join(f"{_dotted(p)}: {m}" for p, m, _ in problems))
        # Resolve the default driver: modbus on an rtu/tcp bus.
        for dev_id, dev in list(self.devices.items()):
            if dev.driver is None and dev.bus in self.buses and self.buses[dev.bus].type in MODBUS_BUS_TYPES:
                self.devices[dev_id] = dev.model_copy(update={"driver": "modbus"})
        return self

    @property
    def source_path(self) -> Path | None:
        """The file this configuration was loaded from (None when built from data)."""
        return self._source_path

    def client_id(self) -> str:
        """The MQTT client id: `mqtt.client_id`, default `station.id`."""
        return self.mqtt.client_id or self.station.id

    def topic_base(self) -> str:
        """`{topic_prefix}/{station.id}`: the P of SPEC §4."""
        return f"{self.mqtt.topic_prefix}/{self.station.id}"

    def bus_of(self, device_id: str) -> RtuBus | TcpBus | SerialBus | None:
        """The bus a device is on (None for simulated devices)."""
        dev = self.devices[device_id]
        return self.buses.get(dev.bus) if dev.bus is not None else None


# --------------------------------------------------------------------------------------------------
# Checks across sections, on plain data (so that they run even when some section is invalid)

_Cross = tuple[tuple[str | int, ...], str, str]  # (path, message, where: "value" | "key" | "missing")


def _text_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    raw = getattr(value, "_yaml_raw", None)
    if raw is not None:
        return str(raw)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _mapping(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _cross_check(data: Mapping[str, Any]) -> list[_Cross]:
    """Problems in references between sections: device -> bus, alarm -> device/channel,
    payload -> hj212, one bus per port. Tolerates any shape of `data` (invalid parts are skipped)."""
    out: list[_Cross] = []
    buses = _mapping(data.get("buses"))
    bus_types: dict[str, str | None] = {}
    port_owner: dict[str, str] = {}
    for name, bus in buses.items():
        bus = _mapping(bus)
        btype = bus.get("type") if isinstance(bus.get("type"), str) else None
        bus_types[str(name)] = btype
        port = _text_of(bus.get("port"))
        if btype in ("rtu", "serial") and port:
            if port in port_owner:
                out.append((("buses", name, "port"),
                            f"port {port!r} is already used by bus '{port_owner[port]}' (one bus per port)",
                            "value"))
            else:
                port_owner[port] = str(name)

    devices = _mapping(data.get("devices"))
    effective: dict[str, str | None] = {}
    for dev_id, dev in devices.items():
        if not isinstance(dev, dict):
            continue
        base = ("devices", dev_id)
        driver = dev.get("driver") if dev.get("driver") in DRIVERS else None
        bus_name = _text_of(dev.get("bus"))
        eff: str | None = None
        if dev.get("driver") is not None and driver is None:
            pass  # invalid driver: reported by the model
        elif driver == "simulated":
            eff = "simulated"
        elif dev.get("bus") is None:
            out.append((base + ("bus",), "missing required key 'bus' (or set driver: simulated)", "missing"))
        elif bus_name is None:
            pass  # wrong type: reported by the model
        elif bus_name not in bus_types:
            out.append((base + ("bus",), f"unknown bus {bus_name!r}{_suggest(bus_name, bus_types)}"
                        f"{_known(bus_types, 'buses')}", "value"))
        else:
            btype = bus_types[bus_name]
            if driver is None:
                if btype in MODBUS_BUS_TYPES:
                    eff = "modbus"
                elif btype == "serial":
                    out.append((base + ("driver",), f"missing required key 'driver': bus '{bus_name}' is a "
                                "serial bus; set driver: pms5003, sds011 or hj212", "missing"))
            elif driver == "modbus" and btype == "serial":
                out.append((base + ("driver",), f"driver modbus needs an rtu or tcp bus; bus '{bus_name}' "
                            "is serial", "value"))
            elif driver in SERIAL_DRIVERS and btype in MODBUS_BUS_TYPES:
                out.append((base + ("driver",), f"driver {driver} needs a serial bus; bus '{bus_name}' "
                            f"is {btype}", "value"))
            else:
                eff = driver
            if eff == "modbus":
                if dev.get("slave") is None:
                    out.append((base + ("slave",), "missing required key 'slave' (the Modbus unit id)",
                                "missing"))
                elif btype == "rtu" and dev.get("slave") == 0 and not isinstance(dev.get("slave"), bool):
                    out.append((base + ("slave",), "slave 0 is the RTU broadcast address and never "
                                "answers; use 1..247", "value"))
                if dev.get("profile") is None and dev.get("registers") is None:
                    out.append((base + ("profile",), "missing required key 'profile' (or inline "
                                "'registers'): a Modbus device needs a register map", "missing"))
        effective[str(dev_id)] = eff

    mqtt = _mapping(data.get("mqtt"))
    if mqtt.get("payload") == "hj212" and data.get("hj212") is None:
        out.append((("mqtt", "payload"), "payload: hj212 needs an hj212: section (st, pw)", "value"))

    def known_channels(dev_id: str) -> list[str] | None:
        dev = _mapping(devices.get(dev_id))
        if isinstance(dev.get("channels"), dict):
            return [str(c) for c in dev["channels"]]
        if effective.get(dev_id) in ("pms5003", "sds011"):
            fixed = _serial_channels(str(effective[dev_id]))
            return list(fixed) if fixed else None
        inline: list[Any] = dev["registers"] if isinstance(dev.get("registers"), list) else []
        entries = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) and not isinstance(r, type)
                   else _mapping(r) for r in inline]
        profile = _text_of(dev.get("profile"))
        roles: dict[str, Any] = {}
        if profile is not None:
            specs = _profile_specs(profile)
            if specs is None:
                return None
            roles = {s.channel: s.role for s in specs}
        elif not inline:
            return None
        for entry in entries:
            name = _text_of(entry.get("channel"))
            if name is not None:
                roles[name] = entry.get("role") or roles.get(name) or "value"
        return [name for name, role in roles.items() if role == "value"]

    def check_ref(ref: str, path: tuple[str | int, ...]) -> None:
        if ref == "*" or "." not in ref:
            return
        dev_id, channel = ref.split(".", 1)
        if dev_id not in devices:
            out.append((path, f"unknown device {dev_id!r}{_suggest(dev_id, map(str, devices))}"
                        f"{_known(map(str, devices), 'devices')}", "value"))
            return
        channels = known_channels(dev_id)
        if channel != "*" and channels is not None and channel not in channels:
            out.append((path, f"device '{dev_id}' has no channel {channel!r}{_suggest(channel, channels)}"
                        f"{_known(channels, 'channels')}", "value"))

    alarms = data.get("alarms")
    for i, rule in enumerate(alarms if isinstance(alarms, list) else []):
        if not isinstance(rule, dict):
            continue
        for key in ("channel", "background"):
            ref = rule.get(key)
            if isinstance(ref, str):
                check_ref(ref, ("alarms", i, key))
        action = _mapping(rule.get("action"))
        target = _text_of(action.get("device"))
        if target is not None:
            path = ("alarms", i, "action", "device")
            if target not in devices:
                out.append((path, f"unknown device {target!r}{_suggest(target, map(str, devices))}", "value"))
            elif effective.get(target) not in (None, "modbus"):
                out.append((path, f"an action writes to a Modbus device; '{target}' is "
                            f"{effective[target]}", "value"))
    return out


# --------------------------------------------------------------------------------------------------
# YAML -> data, with marks

_Path = tuple[str | int, ...]
_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_MAX_NODES = 200_000


class _TooComplex(Exception):
    pass


class _TreeBuilder:
    """Builds plain data from a composed YAML node tree, remembering where each key and value is."""

    def __init__(self, file: str, env: Mapping[str, str]):
        self.file = file
        self.env = env
        self.problems: list[tuple[_Path, yaml.Mark, str]] = []
        self.marks: dict[_Path, tuple[yaml.Mark | None, yaml.Mark]] = {}
        self.substituted: dict[_Path, dict[str, str]] = {}
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolver = yaml.resolver.Resolver()
        self._active: set[int] = set()
        self._count = 0

    def build(self, node: yaml.Node, path: _Path) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise _TooComplex
        if id(node) in self._active:
            self.problems.append((path, node.start_mark, "a YAML alias refers to itself"))
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.ScalarNode):
                return self._scalar(node, path)
            if isinstance(node, yaml.SequenceNode):
                if node.tag != "tag:yaml.org,2002:seq":
                    self.problems.append((path, node.start_mark, f"unsupported YAML tag {node.tag!r}"))
                items = []
                for i, child in enumerate(node.value):
                    self.marks[path + (i,)] = (None, child.start_mark)
                    items.append(self.build(child, path + (i,)))
                return items
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return None
        finally:
            self._active.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: _Path) -> Any:
        if node.tag == _STR_TAG:
            text = node.value
            if "${" not in text:
                return text
            try:
                result = substitute(text, self.env)
            except SubstitutionError as exc:
                self.problems.append((path, node.start_mark, str(exc)))
                return text
            if result.used:
                self.substituted[path] = result.used
            if node.style is None:  # plain scalar: `port: ${PORT}` is a number, as if written there
                tag = self._resolver.resolve(yaml.ScalarNode, result.text, (True, False))
                if tag in _NUMBER_TAGS:
                    value = self._constructor.construct_object(yaml.ScalarNode(tag, result.text))
                    return _with_raw(value, result.text)
            return result.text
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value
        try:
            value = self._constructor.construct_object(node)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            self.problems.append((path, node.start_mark, problem))
            return None
        return _with_raw(value, node.value)

    def _mapping(self, node: yaml.MappingNode, path: _Path) -> dict[str, Any]:
        if node.tag not in ("tag:yaml.org,2002:map",):
            self.problems.append((path, node.start_mark, f"unsupported YAML tag {node.tag!r}"))
        result: dict[str, Any] = {}
        first: dict[str, yaml.Mark] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append((path, key_node.start_mark, "a key must be a plain name, not a list or "
                                      "mapping"))
                continue
            key = key_node.value
            if key in first:
                self.problems.append((path + (key,), key_node.start_mark,
                                      f"duplicate key '{key}' (first defined at line {first[key].line + 1})"))
                continue
            first[key] = key_node.start_mark
            self.marks[path + (key,)] = (key_node.start_mark, value_node.start_mark)
            result[key] = self.build(value_node, path + (key,))
        for key_node, value_node in self._merged_pairs(merges, path):
            key = key_node.value
            if key not in result:
                self.marks[path + (key,)] = (key_node.start_mark, value_node.start_mark)
                result[key] = self.build(value_node, path + (key,))
        return result

    def _merged_pairs(self, sources: list[yaml.Node], path: _Path, depth: int = 0) -> list[tuple[Any, Any]]:
        """`<<: *anchor` pairs, earlier sources first (so that they win, as YAML says)."""
        pairs: list[tuple[Any, Any]] = []
        if depth > 20:
            return pairs
        flat: list[yaml.Node] = []
        for src in sources:
            if isinstance(src, yaml.SequenceNode):
                flat.extend(src.value)
            else:
                flat.append(src)
        for src in flat:
            if not isinstance(src, yaml.MappingNode):
                self.problems.append((path, src.start_mark, "'<<' must merge a mapping (or a list of them)"))
                continue
            nested = [v for k, v in src.value if k.tag == _MERGE_TAG]
            pairs.extend((k, v) for k, v in src.value if k.tag != _MERGE_TAG and isinstance(k, yaml.ScalarNode))
            pairs.extend(self._merged_pairs(nested, path, depth + 1))
        return pairs


# --------------------------------------------------------------------------------------------------
# pydantic errors -> problems


def _unwrap(tp: Any) -> tuple[str, Any]:
    """Strip Annotated/Optional. Returns ("disc", members) for a discriminated union, else ("type", tp)."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            args = typing.get_args(tp)
            if any(getattr(m, "discriminator", None) for m in args[1:]):
                inner = args[0]
                members = [a for a in typing.get_args(inner) if a is not type(None)]
                return "disc", members
            tp = args[0]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
            return "type", None
        return "type", tp


def _field_types(tp: Any) -> dict[str, Any] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        out: dict[str, Any] = {}
        for name, info in tp.model_fields.items():
            ann: Any = info.annotation
            if info.discriminator is not None:
                ann = Annotated[ann, Field(discriminator=info.discriminator)]
            out[name] = ann
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return {f.name: None for f in dataclasses.fields(tp)}
    return None


class _Walk(NamedTuple):
    path: _Path
    is_key: bool  # the error is about a mapping key, not its value
    allowed: list[str] | None  # field names where the last element sits (for "did you mean")
    here: list[str] | None  # field names of the object the path leads to


def _walk_loc(loc: tuple[str | int, ...]) -> _Walk:
    """Map a pydantic `loc` to a data path: drop union tags, note `[key]`, and tell which field
    names are allowed around it."""
    tp: Any = Config
    path: list[str | int] = []
    is_key = False
    allowed: list[str] | None = None
    for elem in loc:
        if elem == "[key]":
            is_key = True
            continue
        kind, tp2 = _unwrap(tp) if tp is not None else ("type", None)
        if kind == "disc":
            tp = None
            for member in tp2 or ():
                literal = member.model_fields["type"].annotation
                if elem in typing.get_args(literal):
                    tp = member
            continue
        fields = _field_types(tp2)
        allowed = list(fields) if fields is not None else None
        path.append(elem)
        origin = typing.get_origin(tp2)
        if fields is not None:
            tp = fields.get(str(elem))
        elif origin is dict:
            tp = typing.get_args(tp2)[1]
        elif origin is list:
            tp = typing.get_args(tp2)[0]
        else:
            tp = None
    here = None
    if tp is not None:
        kind, final = _unwrap(tp)
        fields = _field_types(final) if kind == "type" else None
        here = list(fields) if fields is not None else None
    return _Walk(tuple(path), is_key, allowed, here)


def _dotted(path: _Path) -> str:
    return ".".join(str(p) for p in path) if path else FILE_PATH


def _show(value: Any) -> str:
    raw = getattr(value, "_yaml_raw", None)
    if raw is not None:
        return str(raw)
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return repr(value)


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _message(err: Mapping[str, Any], path: _Path, allowed: list[str] | None, secret: bool) -> str:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    key = str(path[-1]) if path else ""
    got = "" if secret else f" (got {_show(value)})"
    unit = _UNITS.get(key, "")
    if etype in ("missing", "missing_argument"):
        return f"missing required key '{key}'"
    if etype in ("extra_forbidden", "unexpected_keyword_argument"):
        msg = f"unknown key '{key}'"
        if allowed:
            hint = _suggest(key, allowed)
            msg += hint if hint else f"; allowed here: {', '.join(allowed)}"
        return msg
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return "expected a whole number" + got
    if etype in ("float_type", "float_parsing", "finite_number"):
        return "expected a number" + got
    if etype in ("bool_type", "bool_parsing"):
        return "expected true or false" + got
    if etype in ("string_type", "path_type"):
        return "expected text" + got
    if etype in ("dict_type", "model_type", "model_attributes_type", "dataclass_type",
                 "dataclass_exact_type", "mapping_type"):
        return "expected a mapping (key: value lines)" + got
    if etype in ("list_type", "tuple_type"):
        return "expected a list" + got
    if etype == "literal_error":
        return f"must be {ctx.get('expected', '')}" + got
    if etype == "greater_than":
        return f"must be greater than {_num(ctx.get('gt'))}{unit}" + got
    if etype == "greater_than_equal":
        return f"must be at least {_num(ctx.get('ge'))}{unit}" + got
    if etype == "less_than":
        return f"must be less than {_num(ctx.get('lt'))}{unit}" + got
    if etype == "less_than_equal":
        return f"must be at most {_num(ctx.get('le'))}{unit}" + got
    if etype == "too_short":
        return "must not be empty"
    if etype == "union_tag_invalid":
        return f"unknown type {ctx.get('tag')!r}; use {ctx.get('expected_tags')}"
    if etype == "union_tag_not_found":
        return "missing required key 'type'"
    msg = str(err.get("msg", ""))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


class _Locator:
    """Turns paths into Problems using the marks the tree builder remembered."""

    def __init__(self, file: str, builder: _TreeBuilder, root_mark: yaml.Mark):
        self.file = file
        self.builder = builder
        self.root_mark = root_mark

    def mark(self, path: _Path, where: str) -> yaml.Mark:
        marks = self.builder.marks
        if where in ("key", "value") and path in marks:
            key_mark, value_mark = marks[path]
            return (key_mark or value_mark) if where == "key" else value_mark
        probe = path[:-1] if where == "missing" else path
        while probe:
            if probe in marks:
                key_mark, value_mark = marks[probe]
                return key_mark or value_mark
            probe = probe[:-1]
        return self.root_mark

    def is_secret(self, path: _Path) -> bool:
        if any(str(p) in _SECRET_KEYS for p in path):
            return True
        return any(path[: len(p)] == p for p in self.builder.substituted)

    def problem(self, path: _Path, where: str, message: str) -> Problem:
        m = self.mark(path, where)
        return Problem(self.file, m.line + 1, m.column + 1, _dotted(path), self._redact(path, message))

    def at_mark(self, path: _Path, mark: yaml.Mark, message: str) -> Problem:
        return Problem(self.file, mark.line + 1, mark.column + 1, _dotted(path), self._redact(path, message))

    def _redact(self, path: _Path, message: str) -> str:
        """Never let a substituted value through: replace it by its ${NAME}."""
        here = any(path[: len(p)] == p for p in self.builder.substituted)
        for used in self.builder.substituted.values():
            for name, value in used.items():
                if value and (len(value) >= 6 or (here and len(value) >= 3)):
                    message = message.replace(value, "${" + name + "}")
        return message

    def from_pydantic(self, err: Mapping[str, Any]) -> Problem:
        loc = tuple(err["loc"])
        path, is_key, allowed, here = _walk_loc(loc)
        etype = err["type"]
        ctx = err.get("ctx") or {}
        where = "value"
        if etype == "value_error" and here:
            # A dataclass's own check ("address: 70000 is outside ..."): point at the key it names.
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            m = re.match(r"([A-Za-z_]\w*)((?:\.\w+)*): (.*)", msg, re.S)
            if m and m.group(1) in here:
                sub = (m.group(1),) + tuple(p for p in m.group(2).split(".") if p)
                full = path + sub
                return self.problem(full, "value", m.group(3))
        if etype in ("missing", "missing_argument"):
            where = "missing"
        elif etype in ("extra_forbidden", "unexpected_keyword_argument") or is_key:
            where = "key"
        elif etype == "union_tag_invalid":
            path += ("type",)
        elif etype == "union_tag_not_found":
            path += ("type",)
            where = "missing"
        elif etype in ("config", "config_section"):
            at = ctx.get("at")
            if at:
                path += tuple(int(p) if p.isdigit() else p for p in str(at).split("."))
                where = "key" if path in self.builder.marks else "missing"
            elif etype == "config_section":
                where = "key"  # a rule about the whole section: point at its key
        message = _message(err, path, allowed, self.is_secret(path))
        if etype.startswith("config") and not ctx.get("at") and message.startswith("missing required key '"):
            # "missing required key 'x'" raised by a model validator: show the missing key's path.
            missing = message.split("'")[1]
            return self.problem(path + (missing,), "missing", message)
        return self.problem(path, where, message)


# --------------------------------------------------------------------------------------------------
# Public API


def parse_config(
    text: str,
    *,
    file: str = "<config>",
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate configuration `text`; `file` is only used in messages, `base_dir` anchors relative
    paths (None: they stay relative). Raises ConfigError listing every problem, in file order."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_yaml_problem(file, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, f"YAML syntax error: {exc}")]) from None
    if root is None:
        raise ConfigError([Problem(file, 1, 1, FILE_PATH,
                                   "the file is empty (expected station:, storage:, mqtt:, devices: ...)")])
    builder = _TreeBuilder(file, env)
    try:
        data = builder.build(root, ())
    except _TooComplex:
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, "the file is too large or too deeply aliased")]) from None
    locator = _Locator(file, builder, root.start_mark)
    if not isinstance(data, dict):
        line, col = root.start_mark.line + 1, root.start_mark.column + 1
        raise ConfigError([Problem(file, line, col, FILE_PATH, "expected a mapping of sections (station:, "
                                   f"storage:, mqtt:, devices: ...), got {_show(data)}")])

    problems: list[Problem] = [locator.at_mark(p, mark, m) for p, mark, m in builder.problems]
    # A value that failed substitution or parsing is reported once, by the builder.
    claimed = {p for p, _, _ in builder.problems}
    context = {"base_dir": Path(base_dir) if base_dir is not None else None, "_cross_checked": True}
    config: Config | None = None
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        for err in exc.errors():
            prob_path = _walk_loc(tuple(err["loc"])).path
            if prob_path in claimed:
                continue
            problems.append(locator.from_pydantic(err))
    for path, message, where in _cross_check(data):
        if path not in claimed:
            problems.append(locator.problem(path, where, message))
    if problems:
        unique = list(dict.fromkeys(problems))
        unique.sort(key=lambda p: (p.line, p.col))
        raise ConfigError(unique)
    assert config is not None
    config._marks = {p: (v.line + 1, v.column + 1) for p, (_, v) in builder.marks.items()}
    return config


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = False,
) -> Config:
    """Load and validate the configuration file at `path` (env: default os.environ).

    Relative paths inside it are resolved against its directory. With `check_files`, the files it
    names (password_file, TLS files) must exist too (for `check-config`). Raises ConfigError.
    """
    file = os.fspath(path)
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, f"cannot read the file: {reason}")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Problem(file, line, col, FILE_PATH,
                                   "the file is not UTF-8 text (save it as UTF-8)")]) from None
    base_dir = Path(file).absolute().parent
    config = parse_config(text, file=file, env=env, base_dir=base_dir)
    config._source_path = Path(file).absolute()
    if check_files:
        problems = _file_problems(config, file)
        if problems:
            raise ConfigError(problems)
    return config


def check_files(config: Config) -> list[Problem]:
    """Problems with the files a valid config names (missing password file, TLS files, storage
    path that is a directory). `load_config(..., check_files=True)` raises them."""
    file = str(config.source_path) if config.source_path else "<config>"
    return _file_problems(config, file)


def _file_problems(config: Config, file: str) -> list[Problem]:
    problems: list[Problem] = []

    def at(path: _Path, message: str) -> None:
        line, col = config._marks.get(path, (1, 1))
        problems.append(Problem(file, line, col, _dotted(path), message))

    named: list[tuple[_Path, Path | None]] = [(("mqtt", "password_file"), config.mqtt.password_file)]
    if config.mqtt.tls is not None:
        tls = config.mqtt.tls
        named += [(("mqtt", "tls", "ca"), tls.ca), (("mqtt", "tls", "cert"), tls.cert),
                  (("mqtt", "tls", "key"), tls.key)]
    if config.console is not None:
        named.append((("console", "password_file"), config.console.password_file))
    for path, value in named:
        if value is None:
            continue
        if not value.exists():
            at(path, f"file not found: {value}")
        elif not value.is_file():
            at(path, f"not a file: {value}")
        elif not os.access(value, os.R_OK):
            at(path, f"file not readable by this user: {value}")
    if config.storage.path.is_dir():
        at(("storage", "path"), f"is a directory, expected a database file: {config.storage.path}")
    return problems


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (for editors; `edge-agent schema`)."""
    schema = Config.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _yaml_problem(file: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    message = f"YAML syntax error: {exc.problem or exc.context or 'invalid YAML'}"
    if exc.context and exc.problem and exc.context_mark is not None:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    if exc.problem and "'\\t'" in exc.problem:
        message += "; YAML does not allow tabs for indentation, use spaces"
    return Problem(file, line, col, FILE_PATH, message)

