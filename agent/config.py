"""The configuration file (SPEC §2): YAML -> validated, immutable pydantic models, with every problem
reported as `FILE:LINE:COL: path.to.key: message` (1-based; `path` is dotted, list items by index:
`devices.cod.interval`, `alarms.2.above`; problems with the file as a whole use the path `(file)`),
on one line (control characters escaped). What makes part of a valid file do nothing (an alarm rule
or action naming a device that is not configured, a preset without a limit for the channel), and what
is valid but most likely a technician's mistake (two Modbus devices at one slave of a bus, an interval
the bus certainly cannot keep, a register number of a manual given as `address`, a serial port not on
this machine), is a warning, `FILE:LINE:COL: path: warning: message` (`Config.warnings`), not a problem.

Imports `agent.configyaml` (the YAML side), `agent.tlsfiles`, `drivers.registers`, `drivers.profiles`
(names, maps), `drivers.planner` (the reads of a poll and their RTU wire time) and, lazily,
`drivers.serial_frames` (the fixed channels of pms5003/sds011); nothing else from the project. Entry
points: `load_config`, `parse_config`, `check_files`, `check_tls` (`agent.configschema.json_schema`
makes the JSON Schema from these models).

How it works: `yaml.compose` gives a node tree with line/column marks; `agent.configyaml.TreeBuilder`
turns it into plain Python data (detecting duplicate keys, substituting `${NAME}`, remembering where every key and
value sits); pydantic validates the data (every model refuses yes/no for numbers and anything else
for true/false, and .inf/.nan); `_cross_check` validates references between sections (devices ->
buses, alarms -> devices/channels, payload -> hj212) and `_section_rules` the rules that combine
keys of one section (url vs urls, cert without key, ...) on the plain data, so they run even when
a section is invalid; with `check_files`, the files named by keys that are valid themselves are
looked at too, and whether the serial ports exist (a warning when not: never opened). Once the file is
valid, `_register_overlaps` and `_bus_overruns` look at the register maps and the buses' timing.
Every error, whatever its source, becomes a `Problem` located through the remembered marks. Messages
never show the value of a secret key (password, pw), and that value (or a variable substituted into it)
is replaced by `***` (`${NAME}`) wherever else it appears. Nor do they show a file key's value that
may be the secret itself (`_may_show_path`): a file's content pasted there (several lines, PEM text),
or a `password_file` or `tls.key` with neither '/' nor '.' (a password typed where its file's path
belongs); `Config.shown_file` tells `run`'s messages the same.
One limit remains: the checks of a register map that combine keys (an entry's status word, a value
running past register 65535, the map as a whole) run only once the entry's (the device's) keys are
valid one by one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import ipaddress
import os
import re
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.configyaml import (
    SECRET_FILE_KEYS,
    TOO_DEEP,
    YAML_LINE_BREAK,
    KeyPath,
    TooComplex,
    TreeBuilder,
    is_secret_key_path,
)
from agent.tlsfiles import TlsFilesError, tls_context
from drivers import profiles
from drivers.planner import Request, plan, rtu_char_bits, rtu_wire_s
from drivers.registers import RegisterSpec, check_map, overlaps, register_reference, value_channels

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
    "check_tls",
    "load_config",
    "parse_config",
    "read_password_file",
]

# --------------------------------------------------------------------------------------------------
# Constants

#: Path shown for problems that belong to the file as a whole (missing, unreadable, empty, syntax).
FILE_PATH = "(file)"



def _preset_codes() -> dict[str, frozenset[str]]:
    """The alarm presets in the packaged `agent/data/presets.yaml` with the channel codes each has a
    limit for (the limits themselves are read by `agent.alarms.load_presets`)."""
    text = importlib.resources.files("agent").joinpath("data/presets.yaml").read_text("utf-8")
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or not isinstance(document.get("presets"), dict):
        raise ValueError("agent/data/presets.yaml: top-level 'presets' mapping missing")
    return {str(name): frozenset(str(code) for code in _limits_of(entry))
            for name, entry in document["presets"].items()}


def _limits_of(entry: Any) -> dict[Any, Any]:
    limits = entry.get("limits") if isinstance(entry, dict) else None
    return limits if isinstance(limits, dict) else {}


PRESET_CODES: dict[str, frozenset[str]] = _preset_codes()
#: Alarm presets (DOMAIN.md "Limits for alarm presets"): names of agent/data/presets.yaml.
PRESETS: tuple[str, ...] = tuple(PRESET_CODES)

DRIVERS: tuple[str, ...] = ("modbus", "pms5003", "sds011", "hj212", "simulated")
SERIAL_DRIVERS = frozenset({"pms5003", "sds011", "hj212"})
MODBUS_BUS_TYPES = frozenset({"rtu", "tcp"})
AGGREGATE_MINUTES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30)

STATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,24}")
# HJ 212-2017 PW: at most 6 printable ASCII characters, no space nor ; , & = (as agent.hj212 encodes it)
HJ212_PW_RE = re.compile(r"[!-%'-+\--:<>-~]{0,6}")
DEVICE_ID_RE = re.compile(r"[a-z0-9_-]+")
BUS_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
CHANNEL_RE = re.compile(r"[A-Za-z0-9_]+")

# What a file key's value is when it holds a file's content instead of its path (`_looks_pasted`).
_PASTED_CONTENT = {"password_file": "password", "key": "key", "cert": "certificate", "ca": "certificate"}
_NOT_SHOWN = "(the value is not shown: it may be the secret itself; give the path of the file)"


def _looks_pasted(written: str) -> bool:
    """Whether a file key's value as written is a file's content rather than a path: several lines,
    or PEM text (`-----BEGIN PRIVATE KEY-----...`)."""
    return "\n" in written or "\r" in written or "-----BEGIN" in written


def _pasted_message(key: str) -> str:
    return (f"this is not a file path: it looks like the {_PASTED_CONTENT[key]} itself (put it in a file and "
            "give the file's path)")


def _may_show_path(key: str, written: str) -> bool:
    """Whether a message may show the path given as `written` for the file key `key` (its last part:
    `password_file`, `key`, `cert`, ...): never a file's content, and for the file of a secret
    (`password_file`, `tls.key`) only a value with a '/' or a '.' (else it may be the secret itself)."""
    if key in _PASTED_CONTENT and _looks_pasted(written):
        return False
    return key not in SECRET_FILE_KEYS or "/" in written or "." in written


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


def _one_line(text: str) -> str:
    """`text` with line breaks, control and other unprintable characters escaped (`\\n`, `\\x1b`,
    `\\u2028`), so that a problem stays on one line whatever the file's keys and values hold."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration file, located at a 1-based line and column. A warning
    (`warning=True`) does not make the file invalid: `FILE:LINE:COL: path: warning: message`."""

    file: str
    line: int
    col: int
    path: str  # dotted key path (`devices.cod.interval`, `alarms.2.above`) or FILE_PATH
    message: str
    warning: bool = False

    def __str__(self) -> str:
        kind = "warning: " if self.warning else ""
        return _one_line(f"{self.file}:{self.line}:{self.col}: {self.path}: {kind}{self.message}")


class ConfigError(Exception):
    """The configuration is invalid; `.problems` lists every problem found, in file order, and
    `.warnings` what would do nothing even once the problems are fixed (see `Config.warnings`)."""

    def __init__(self, problems: list[Problem], warnings: Iterable[Problem] = ()):
        self.problems = list(problems)
        self.warnings = list(warnings)
        super().__init__("\n".join(str(p) for p in self.problems))


def _err(message: str, at: str | None = None, *, section: bool = False) -> PydanticCustomError:
    """A validation error with a technician-readable message. It points at the value being
    validated; at the key `at` of it (dotted, relative); or, with `section`, at the key of the
    section a model-level rule is about."""
    # pydantic-core replaces `{at}` in the message by the context's value (it has no escape for
    # braces: doubling them showed `${{NAME}}`); a message never says `{at}` but a value might.
    template = message.replace("{at}", "{ at}") if at else message
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


# `json_schema_input_type`: what the JSON Schema (for editors) accepts, here what the validator takes.
Text = Annotated[str, BeforeValidator(_as_text, json_schema_input_type=str | int | float)]


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
    try:
        value = value.expanduser()
    except RuntimeError:  # `~name/...` of an unknown user, or no home directory
        shown = f" in {str(value)!r}" if _may_show_path(info.field_name or "", str(value)) else ""
        raise _err(f"cannot expand '~'{shown}: unknown user or no home directory") from None
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return Path(os.path.normpath(value))


FilePath = Annotated[Path, BeforeValidator(_check_path_text, json_schema_input_type=str | int | float),
                     AfterValidator(_resolve_path)]


# --------------------------------------------------------------------------------------------------
# Yes/no values: YAML reads true/false, yes/no and on/off as booleans, and pydantic would take one for
# a number (true = 1), and 1 or "yes" for a boolean. Every model refuses both (`_Model`), so that
# `port: true` or `hour: 1` is reported like any other wrong type.


class _Refused:
    """Stands in for a yes/no value given for a number (or another value given for true/false): no
    type accepts it, so pydantic reports the key with its usual message and `_show` gives `shown`."""

    def __init__(self, shown: str):
        self._yaml_raw = shown


def _is_number_type(tp: Any) -> bool:
    if tp in (int, float):
        return True
    return typing.get_origin(tp) is Literal and all(type(a) in (int, float) for a in typing.get_args(tp))


@functools.cache
def _dataclass_fields(tp: type) -> dict[str, Any]:
    return typing.get_type_hints(tp)


def _refuse_yes_no(annotation: Any, value: Any) -> Any:
    """`value`, with a yes/no value where `annotation` wants a number, and any other value where it
    wants true/false, replaced by a `_Refused` (in lists of numbers and in dataclass entries too;
    pydantic models check their own fields)."""
    kind, tp = _unwrap(annotation)
    if kind != "type" or tp is None:
        return value
    if tp is bool:
        return value if value is None or isinstance(value, bool) else _Refused(_show(value))
    if _is_number_type(tp):
        return _Refused("a yes/no value") if isinstance(value, bool) else value
    if typing.get_origin(tp) in (list, tuple) and isinstance(value, list):
        item = typing.get_args(tp)[0] if typing.get_args(tp) else None
        return [_refuse_yes_no(item, v) for v in value]
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and isinstance(value, dict):
        fields = _dataclass_fields(tp)
        return {k: _refuse_yes_no(fields.get(k), v) for k, v in value.items()}
    return value


class _Model(BaseModel):
    """Base of the sections: unknown keys are errors, yes/no is no number, numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        types = {name: f.annotation for name, f in cls.model_fields.items()}
        for f in cls.model_fields.values():
            if isinstance(f.validation_alias, AliasChoices):
                types.update((str(alias), f.annotation) for alias in f.validation_alias.choices)
        return {k: _refuse_yes_no(types[k], v) if k in types else v for k, v in data.items()}


# --------------------------------------------------------------------------------------------------
# Rules that combine keys of one section. Each is a function of the section's values that yields
# every rule broken; it runs both as the model's validator (which raises the first) and, by
# `parse_config`, on the file's plain data, so that a file gets them all in one go even when other
# keys of the section are invalid. On plain data a value may have any type: the functions only
# look at values of the expected kind.


class _Broken(NamedTuple):
    message: str
    at: str | None = None  # the key (relative, dotted) the problem is shown at
    section: bool = False  # shown at the section's own key


def _raise_first(broken: Iterable[_Broken]) -> None:
    for b in broken:
        raise _err(b.message, at=b.at, section=b.section)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
        if value in MACHINE_ZONES:
            raise _err(f"{value!r} {MACHINE_ZONES[value]}: name the station's zone (an IANA name such as "
                       "Asia/Shanghai)")
        try:
            ZoneInfo(value)
        except (ValueError, KeyError, OSError):
            raise _err(f"unknown time zone {value!r} (use an IANA name such as Asia/Shanghai)") from None
        if value.startswith(("posix/", "right/")):  # copies of the zones; right/ counts leap seconds
            raise _err(f"{value!r} is a copy of a zone in the system's files: write {value.split('/', 1)[1]!r}")
        return value


# Files of the system's zone database that ZoneInfo opens but that name no station's zone.
MACHINE_ZONES = {
    "localtime": "is whatever zone this machine is set to (a laptop's differs from the gateway's, and it "
                 "changes silently)",
    "posixrules": "is the system's default rule file (New York's rules), not a zone",
    "Factory": "is the placeholder zone of an unconfigured system (offset '-00')",
}


class Storage(_Model):
    """`storage:` the SQLite buffer."""

    path: FilePath = Field(description="Buffer database file; relative paths are relative to the config file")
    max_mb: float = Field(256, ge=0.1, description="Hard cap on the database size, MB (at least 0.1: the empty "
                                                   "tables alone take ~20 KB)")
    keep_sent_days: float = Field(7, ge=0, le=36500, description="Days published readings are kept for resend requests")
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


def _quoted_choice(value: Any) -> Any:
    """`qos: "1"`: a quoted whole number where one of a few numbers is expected, as any other number
    key takes one (pydantic does not read text for a Literal)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
        return int(value)
    return value


_QUOTED_CHOICE = BeforeValidator(_quoted_choice)

MqttUrl = Annotated[Text, AfterValidator(_check_mqtt_url),
                    Field(json_schema_extra={"pattern": r"^\s*[Mm][Qq][Tt][Tt][Ss]?://(\[[0-9A-Fa-f:.]+\]|[^@/?#:\[\]]+)"
                                                        r"(:0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}"
                                                        r"|655[0-2][0-9]|6553[0-5]))?/?\s*$"})]


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
        _raise_first(_tls_rules(dict(self)))
        return self


def _tls_rules(tls: Mapping[str, Any]) -> Iterable[_Broken]:
    if tls.get("cert") is not None and tls.get("key") is None:
        yield _Broken("cert needs key too (the client certificate's private key)", at="cert")
    if tls.get("key") is not None and tls.get("cert") is None:
        yield _Broken("key needs cert too (the client certificate)", at="key")


def _check_topic_prefix(value: str) -> str:
    if not value or value.startswith("/") or value.endswith("/") or "//" in value:
        raise _err("must be a topic like 'env' or 'prov/env' (no leading, trailing or double '/')")
    if any(c in value for c in "#+"):
        raise _err("must not contain the MQTT wildcards '#' or '+'")
    if value.startswith("$"):  # MQTT 3.1.1 §4.7.2: the broker's own ($SYS: acknowledged, then dropped)
        raise _err("must not begin with '$': such topics belong to the broker ($SYS/...), which may take "
                   "the messages and deliver them to nobody")
    if not value.isprintable():
        raise _err("must not contain line breaks, tabs or other control characters")
    return value


def _mqtt_rules(mqtt: Mapping[str, Any]) -> Iterable[_Broken]:
    url, urls = mqtt.get("url"), mqtt.get("urls")
    if url is not None and urls is not None:
        yield _Broken("give either url or urls, not both", at="urls")
    if url is None and urls is None:
        yield _Broken("missing required key 'url' (or 'urls' for failover)", section=True)
    password, password_file = mqtt.get("password"), mqtt.get("password_file")
    if password is not None and password_file is not None:
        yield _Broken("give either password or password_file, not both", at="password_file")
    if (password is not None or password_file is not None) and mqtt.get("username") is None:
        yield _Broken("a password needs a username (MQTT sends no password without a user name)",
                      at="password" if password is not None else "password_file")
    given = urls if isinstance(urls, list) else [url]
    schemes = [u.strip().split("://", 1)[0].lower() for u in given if isinstance(u, str) and "://" in u]
    if mqtt.get("tls") is not None and "mqtt" in schemes:
        yield _Broken("tls is set but the broker url is mqtt:// (plain); use mqtts://", at="tls")


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
    qos: Annotated[Literal[0, 1], _QUOTED_CHOICE] = Field(1, description="0 or 1; only 1 promises delivery")
    payload: Literal["json", "hj212"] = "json"
    max_batch: int = Field(200, ge=1, le=10000, description="Readings per data message when draining a backlog")
    reconnect_max: float = Field(30, gt=0, description="Reconnect backoff ceiling, seconds")
    shutdown_grace: float = Field(5, ge=0, le=3600, description="Seconds to go on publishing after SIGTERM")
    keepalive: int = Field(30, ge=1, le=65535, description="MQTT keepalive, seconds (extension)")

    @model_validator(mode="after")
    def _rules(self) -> Mqtt:
        _raise_first(_mqtt_rules(dict(self)))
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
            return read_password_file(self.password_file)
        except ValueError as exc:
            raise ConfigError([Problem("<config>", 1, 1, "mqtt.password_file",
                                       f"cannot read the password file: {exc}")]) from None


def read_password_file(path: Path) -> str:
    """The password held in the file at `path` (`mqtt.password_file`, `console.password_file`): its
    text without its trailing newline. The one reader of password files, for `run`, `check-config`
    and the console. Raises ValueError whose message is the reason ("Permission denied", "not UTF-8
    text"), never quoting the file nor its path, when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:  # str(exc) would quote the path
        raise ValueError(exc.strerror or exc.__class__.__name__) from None
    except UnicodeDecodeError:  # its message would quote the bytes
        raise ValueError("not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


# --------------------------------------------------------------------------------------------------
# buses

Parity = Annotated[Literal["N", "E", "O"],
                   BeforeValidator(_upper, json_schema_input_type=Literal["N", "E", "O", "n", "e", "o"])]


# `port: 502` or `port: 192.168.1.50:502` on an rtu bus: a Modbus TCP gateway taken for a serial line.
_TCP_LOOKALIKE_RE = re.compile(r"[0-9.:]+|[A-Za-z0-9.-]+:[0-9]+")


def _check_port_path(value: str, *, rtu: bool) -> str:
    """A serial port is an absolute device path: a relative one would be looked for in the working
    directory of whoever runs the agent (`/` for the service), where no device node is."""
    if value.startswith("/"):
        return value
    if rtu and _TCP_LOOKALIKE_RE.fullmatch(value.strip()):
        raise _err(f"{value!r} is not a serial device: a Modbus TCP gateway is a bus of type: tcp with host: and "
                   "port: (e.g. type: tcp, host: 192.168.1.50, port: 502)")
    hint = f" (did you mean /dev/{value}?)" if value.startswith("tty") else ""
    raise _err(f"{value!r} is not an absolute path: a serial port is a device such as /dev/ttyUSB0 or "
               f"/dev/serial/by-id/...{hint}")


# A serial device path (never a number; its pattern is for the JSON Schema, the validators give the messages).
PortPath = Annotated[str, BeforeValidator(_as_text, json_schema_input_type=str), AfterValidator(_non_empty_text),
                     Field(json_schema_extra={"pattern": "^/"})]


class RtuBus(_Model):
    """A Modbus RTU line (RS-485 / RS-232)."""

    type: Literal["rtu"]
    port: PortPath = Field(description="Serial device (absolute path), e.g. /dev/ttyUSB0")
    baudrate: int = Field(9600, gt=0)
    parity: Parity = "N"
    bytesize: Annotated[Literal[7, 8], _QUOTED_CHOICE] = 8
    stopbits: Annotated[Literal[1, 2], _QUOTED_CHOICE] = 1
    timeout: float = Field(0.5, gt=0, description="Answer timeout, seconds")
    retries: int = Field(1, ge=0, description="Retries before a device is given up for this poll")

    @field_validator("port")
    @classmethod
    def _check_port(cls, value: str) -> str:
        return _check_port_path(value, rtu=True)


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
    port: PortPath = Field(description="Serial device (absolute path), e.g. /dev/ttyAMA0")
    baudrate: int = Field(9600, gt=0)
    parity: Parity = "N"
    bytesize: Annotated[Literal[7, 8], _QUOTED_CHOICE] = 8
    stopbits: Annotated[Literal[1, 2], _QUOTED_CHOICE] = 1
    timeout: float = Field(1.0, gt=0, description="Read timeout, seconds")

    @field_validator("port")
    @classmethod
    def _check_port(cls, value: str) -> str:
        return _check_port_path(value, rtu=False)


Bus = Annotated[RtuBus | TcpBus | SerialBus, Field(discriminator="type")]
# Each key of a bus -> the types of bus that have it (for the message about a key of another type).
_BUS_MODELS = {"rtu": RtuBus, "tcp": TcpBus, "serial": SerialBus}
_BUS_KEYS: dict[str, tuple[str, ...]] = {
    key: tuple(kind for kind, other in _BUS_MODELS.items() if key in other.model_fields)
    for model in _BUS_MODELS.values() for key in model.model_fields
}


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


# The patterns are for the JSON Schema (editors); the validators give check-config's messages.
BusName = Annotated[str, AfterValidator(_check_bus_name), Field(json_schema_extra={"pattern": r"^[A-Za-z0-9_.-]+$"})]
DeviceId = Annotated[str, AfterValidator(_check_device_id), Field(json_schema_extra={"pattern": r"^[a-z0-9_-]+$"})]
ChannelCode = Annotated[str, AfterValidator(_check_channel_code),
                        Field(json_schema_extra={"pattern": r"^[A-Za-z0-9_]+$"})]


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


def _device_rules(device: Mapping[str, Any]) -> Iterable[_Broken]:
    driver = device.get("driver")
    if driver is not None and driver not in DRIVERS:
        return  # reported as a wrong value: which keys belong is unknown
    if driver == "simulated":
        for key in ("bus", "slave", "profile", "registers"):
            if device.get(key) is not None:
                yield _Broken(f"a simulated device takes no {key} (remove it, or set another driver)", at=key)
        if device.get("channels") is None:
            yield _Broken("missing required key 'channels' (a simulated device needs channels)", section=True)
        return
    for key in ("channels", "dropout", "seed"):
        if key == "channels" and driver == "hj212":
            yield from _hj212_channel_rules(device.get(key))
        elif device.get(key) is not None:
            yield _Broken(f"{key} is only for driver: simulated", at=key)
    if driver in SERIAL_DRIVERS:
        for key in ("slave", "profile", "registers"):
            if device.get(key) is not None:
                yield _Broken(f"driver {driver} takes no {key} (it is for Modbus devices)", at=key)


def _hj212_channel_rules(channels: Any) -> Iterable[_Broken]:
    """An hj212 analyzer's `channels:` name what it sends (read as null/B until its first packet, and
    whenever a poll gets none) and may give each a unit: nothing else."""
    if not isinstance(channels, dict):
        return
    for code, spec in channels.items():
        for key in (spec or {}) if isinstance(spec, dict) else ():
            if key != "unit":
                yield _Broken(f"an hj212 channel takes only unit ({key} is for driver: simulated)",
                              at=f"channels.{code}.{key}")


class Device(_Model):
    """`devices.ID:` one instrument. `driver` is always set on a Config returned by load_config."""

    bus: Text | None = Field(None, description="Name of a bus under buses: (not for driver: simulated)")
    slave: int | None = Field(None, ge=0, le=255, description="Modbus unit id (RTU: 1..247; TCP: 0..255, "
                              "255 for a device addressed by its IP address)")
    interval: float = Field(60.0, ge=0.1, description="Poll period, seconds (>= 0.1)")
    profile: Text | None = Field(None, description="Built-in register map (drivers/profiles/)")
    registers: Annotated[list[RegisterSpec], Field(min_length=1)] | None = Field(
        None, description="Inline register map; with a profile, entries override the profile's entry of "
        "the same channel (and may give only the keys to change) or add channels")
    driver: Literal["modbus", "pms5003", "sds011", "hj212", "simulated"] | None = Field(
        None, description="Default: modbus on an rtu/tcp bus")
    channels: Annotated[dict[ChannelCode, SimChannel], Field(min_length=1)] | None = Field(
        None, description="Simulated channels (driver: simulated); for driver: hj212 the channels the "
        "analyzer sends, each with at most a unit (more may appear)")
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
    def _check_profile(cls, value: str | None) -> str | None:
        if value is None:  # `profile:` with nothing after it: as if not given
            return value
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

    @model_validator(mode="after")
    def _rules(self) -> Device:
        _raise_first(_device_rules(dict(self)))
        if self.driver != "simulated" and self.registers is not None:
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

    def read_plan(self) -> list[Request] | None:
        """The reads of one poll of the register map, planned as the Modbus driver plans them (with the
        profile's max_gap/max_block); None for a device without a map. Raises ValueError for a map
        that cannot be read."""
        specs = self.register_map()
        if specs is None:
            return None
        return plan(specs, **(profiles.plan_args(profiles.load(self.profile)) if self.profile is not None else {}))

    def known_channels(self) -> list[str] | None:
        """The channel codes this device produces readings for, when the config tells them
        (simulated channels, register map, the fixed channels of pms5003/sds011); else None (an
        hj212 analyzer may send channels beyond those declared)."""
        if self.driver == "hj212":
            return None
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
    """`aggregate.min_count:` per period kind, an absolute number of valid values (replaces min_valid).
    `10m`, `1h` and `1d` are other names of minute, hour and day (the README's first spelling); `10m`
    means the minute period whatever `aggregate.minute` is."""

    minute: int | None = Field(None, ge=1, validation_alias=AliasChoices("minute", "10m"))
    hour: int | None = Field(None, ge=1, validation_alias=AliasChoices("hour", "1h"))
    day: int | None = Field(None, ge=1, validation_alias=AliasChoices("day", "1d"))


def _check_agg_channel(value: str) -> str:
    if not _AGG_CHANNEL_RE.fullmatch(value):
        raise _err(f"{value!r} must be \"device.channel\"")
    return value


AggChannel = Annotated[Text, AfterValidator(_check_agg_channel)]


class Aggregate(_Model):
    """`aggregate:` HJ 212 period statistics computed at the edge (see agent/aggregate.py)."""

    minute: Annotated[Literal[1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30], _QUOTED_CHOICE] = Field(
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

    version: Annotated[Literal["2017"],
                       BeforeValidator(_as_text, json_schema_input_type=Literal["2017", 2017])] = Field(
        "2017", description="Protocol version (only 2017 for now)")
    st: int = Field(ge=0, le=99, description="System code: 21 surface water, 32 water source, 39 dust, ...")
    pw: Text = Field(repr=False, description="Access password (PW=): at most 6 printable ASCII characters "
                     "without space or ; , & =", json_schema_extra={"pattern": f"^{HJ212_PW_RE.pattern}$"})
    uplinks: Annotated[list[Uplink], BeforeValidator(_none_to_empty_list,
                                                     json_schema_input_type=list[Uplink] | None)] = Field(
        default_factory=list)

    @field_validator("pw")
    @classmethod
    def _check_pw(cls, value: str) -> str:
        if not HJ212_PW_RE.fullmatch(value):  # never quote it: it is a password
            raise _err("the HJ 212 password must be at most 6 printable ASCII characters without space or ; , & =")
        return value


_ALARM_CHANNEL_RE = re.compile(r"\*|[a-z0-9_-]+\.(\*|[A-Za-z0-9_]+)")
_BACKGROUND_RE = re.compile(r"[a-z0-9_-]+\.[A-Za-z0-9_]+")


with warnings.catch_warnings():  # the YAML key `register` shadows ABCMeta.register; harmless
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Action(_Model):
        """`alarms[].action:` write a coil (or a register) of a Modbus device on raise, back on clear."""

        device: NonEmptyText
        coil: int | None = Field(None, ge=0, le=65535, description="Coil address (0-based)")
        register: int | None = Field(None, ge=0, le=65535, description="Holding register address (0-based)")
        on: int | bool | None = Field(None, description="Value written on raise (register: required; coil: 1)")
        off: int | bool | None = Field(None, description="Value written on clear (register: required; coil: 0)")
        min_on: float = Field(0.0, ge=0, description="Keep it on at least this many seconds")

        @model_validator(mode="after")
        def _rules(self) -> Action:
            _raise_first(_action_rules(dict(self)))
            return self


def _action_rules(action: Mapping[str, Any]) -> Iterable[_Broken]:
    coil, register = action.get("coil"), action.get("register")
    if coil is None and register is None:
        yield _Broken("missing required key 'coil' (or 'register')", section=True)
    if coil is not None and register is not None:
        yield _Broken("give either coil or register, not both", at="register")
    for key in ("on", "off"):
        value = action.get(key)
        if register is not None:
            if value is None:
                yield _Broken(f"missing required key '{key}' (the value to write into the register)", section=True)
            elif isinstance(value, bool):
                yield _Broken("a register takes a number from 0 to 65535, not a yes/no value", at=key)
            elif _is_number(value) and not 0 <= value <= 65535:
                yield _Broken("must be from 0 to 65535", at=key)
        elif _is_number(value) and value not in (0, 1):
            yield _Broken("a coil is on or off: use true/false (or 1/0)", at=key)


def _alarm_rules(alarm: Mapping[str, Any]) -> Iterable[_Broken]:
    if all(alarm.get(k) is None for k in ("above", "below", "preset", "stale", "fault")):
        yield _Broken("a rule needs at least one of above, below, preset, stale or fault", section=True)
    if alarm.get("preset") is not None:
        for key in ("above", "below", "window"):
            if alarm.get(key) is not None:
                yield _Broken(f"the preset sets the limit and window: remove {key}", at=key)
    above: Any = alarm.get("above")
    below: Any = alarm.get("below")
    if _is_number(above) and _is_number(below) and above <= below:
        yield _Broken("above must be greater than below (the rule raises above 'above' or below 'below')",
                      at="above")


class Alarm(_Model):
    """One alarm rule (`alarms[]`); see SPEC §2 for the semantics."""

    channel: Text = Field(description='"device.channel", "device.*" or "*"')
    above: float | None = None
    below: float | None = None
    hysteresis: float = Field(0.0, ge=0)
    delay: float = Field(0.0, ge=0, description="Seconds beyond the limit before raising")
    clear_delay: float | None = Field(None, ge=0, description="Seconds back within before clearing; default: delay")
    window: float | None = Field(None, gt=0, description="Apply the rule to the rolling mean over this many seconds")
    preset: Text | None = Field(None, json_schema_extra={"enum": [*PRESETS, None]},
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
    def _check_background(cls, value: str | None) -> str | None:
        if value is None:  # `background:` with nothing after it: as if not given
            return value
        if not _BACKGROUND_RE.fullmatch(value):
            raise _err(f"background {value!r} must be \"device.channel\"")
        return value

    @field_validator("preset")
    @classmethod
    def _check_preset(cls, value: str | None) -> str | None:
        if value is None:  # `preset:` with nothing after it: as if not given
            return value
        if value not in PRESETS:
            raise _err(f"unknown preset {value!r}{_suggest(value, PRESETS)}; presets: {', '.join(PRESETS)}")
        return value

    @model_validator(mode="after")
    def _rules(self) -> Alarm:
        _raise_first(_alarm_rules(dict(self)))
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


def _console_rules(console: Mapping[str, Any]) -> Iterable[_Broken]:
    listen = console.get("listen", "127.0.0.1:8080")
    try:
        host, _ = _split_listen(listen) if isinstance(listen, str) else ("localhost", 0)
    except ValueError:
        return  # reported as a wrong value
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    if console.get("password_file") is None and not loopback:
        yield _Broken(f"{listen.strip()} is reachable from other machines: set password_file (or listen on "
                      "127.0.0.1)", at="listen")


class Console(_Model):
    """`console:` the local web console for technicians (read-only; off unless this section exists)."""

    listen: Annotated[Text, AfterValidator(_check_listen)] = Field(
        "127.0.0.1:8080", description="HOST:PORT to serve on; any address other than loopback needs password_file")
    password_file: FilePath | None = Field(
        None, description="File holding the console password (one line); HTTP basic auth, any user name")

    @model_validator(mode="after")
    def _rules(self) -> Console:
        _raise_first(_console_rules(dict(self)))
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
    buses: Annotated[dict[BusName, Bus], BeforeValidator(_none_to_empty_dict,
                                                         json_schema_input_type=dict[BusName, Bus] | None)] = Field(
        default_factory=dict, description="One entry per physical link")
    devices: Annotated[dict[DeviceId, Device], Field(min_length=1)] = Field(
        description="One entry per instrument; the key is the device id")
    aggregate: Annotated[Aggregate, BeforeValidator(_none_to_empty_dict,
                                                    json_schema_input_type=Aggregate | None)] = Field(
        default_factory=lambda: Aggregate.model_validate({}))
    hj212: Hj212 | None = None
    alarms: Annotated[list[Alarm], BeforeValidator(_none_to_empty_list,
                                                   json_schema_input_type=list[Alarm] | None)] = Field(
        default_factory=list)
    console: Annotated[Console | None, BeforeValidator(_none_to_empty_dict)] = Field(
        None, description="Local web console (read-only); off unless this section is present")

    _source_path: Path | None = PrivateAttr(default=None)
    _file: str = PrivateAttr(default="<config>")  # the file name problems show
    _marks: dict[tuple[str | int, ...], tuple[int, int]] = PrivateAttr(default_factory=dict)
    _warnings: list[Problem] = PrivateAttr(default_factory=list)
    _written_files: dict[tuple[str, ...], str] = PrivateAttr(default_factory=dict)  # file keys as written

    @model_validator(mode="after")
    def _finish(self, info: ValidationInfo) -> Config:
        context = info.context or {}
        if not context.get("_cross_checked"):
            problems = [c for c in _cross_check(self.model_dump(mode="python")) if not c.warning]
            if problems:
                raise _err("; ".join(f"{_dotted(c.path)}: {c.message}" for c in problems))
        # Resolve the default driver: modbus on an rtu/tcp bus.
        for dev_id, dev in list(self.devices.items()):
            if dev.driver is None and dev.bus in self.buses and self.buses[dev.bus].type in MODBUS_BUS_TYPES:
                self.devices[dev_id] = dev.model_copy(update={"driver": "modbus"})
        return self

    @property
    def source_path(self) -> Path | None:
        """The file this configuration was loaded from (None when built from data)."""
        return self._source_path

    @property
    def warnings(self) -> list[Problem]:
        """What does not make the file invalid but does nothing (an alarm rule on a device that is not
        configured, a preset without a limit for the channel) or is most likely a mistake (see the
        module docstring), in file order."""
        return list(self._warnings)

    def read_mqtt_password(self) -> str | None:
        """`mqtt.read_password()`, with a file that cannot be read reported (ConfigError) at
        `mqtt.password_file` in this configuration file."""
        try:
            return self.mqtt.read_password()
        except ConfigError as exc:
            line, col = self._marks.get(("mqtt", "password_file"), (1, 1))
            raise ConfigError([dataclasses.replace(p, file=self._file, line=line, col=col)
                               for p in exc.problems]) from None

    def shown_file(self, key: tuple[str, ...]) -> str | None:
        """How a message may name the file of `key` (`("mqtt", "tls", "key")`, one of the keys that
        name files): its path, or None where the value as written may be the secret itself or a
        file's content (see `_may_show_path`), or when the key is not set."""
        value: Any = self
        for part in key:
            value = getattr(value, part, None)
        if value is None:
            return None
        written = self._written_files.get(key, str(value))
        return str(value) if _may_show_path(key[-1], written) else None

    def tls_file_names(self) -> dict[str, str | None]:
        """How messages about `mqtt.tls` name its files (`agent.tlsfiles.tls_context`'s `names`):
        "ca", "cert", "key" -> the file's path, or None where it is not to be shown (`shown_file`)."""
        return {part: self.shown_file(("mqtt", "tls", part)) for part in ("ca", "cert", "key")}

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

class _Cross(NamedTuple):
    path: tuple[str | int, ...]
    message: str
    where: str  # "value" | "key" | "missing"
    warning: bool = False  # the file is valid, but this part of it does nothing


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


STANDARD_BAUDRATES = (300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400, 460800,
                      921600)


def _register_overlaps(config: Config) -> Iterable[tuple[KeyPath, str]]:
    """(where, warning) for each pair of entries of a device's register map that read some of the same
    registers: valid, but almost always a misplaced address or a profile entry moved onto another."""
    for dev_id, dev in config.devices.items():
        try:
            specs = dev.register_map()
        except ValueError:
            continue  # reported as an error
        inline = {spec.channel: i for i, spec in enumerate(dev.registers or [])}
        for a, b in overlaps(specs or []):
            at = b if b.channel in inline else a
            path: KeyPath = (("devices", dev_id, "registers", inline[at.channel]) if at.channel in inline
                           else ("devices", dev_id, "profile"))
            yield path, (f"{a.channel} ({a.type} at {a.table} {a.address}) and {b.channel} ({b.type} at "
                         f"{b.table} {b.address}) read the same register(s): is an address wrong?")


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.3g} s"


def _bus_overruns(config: Config) -> Iterable[tuple[KeyPath, str]]:
    """(where, warning) for each Modbus device whose interval its bus certainly cannot keep: when a
    device on the bus is silent (its poll holds the bus timeout × (retries + 1), what the driver waits),
    and, on RTU, when the polls of all the bus's devices at their intervals need more wire time than
    there is (`drivers.planner.rtu_wire_s`: frames and gaps only, a lower bound), said once, at the
    device that takes the largest share."""
    for bus_name, bus in config.buses.items():
        if isinstance(bus, SerialBus):
            continue
        devices = {dev_id: dev for dev_id, dev in config.devices.items()
                   if dev.bus == bus_name and dev.driver == "modbus"}
        silent = bus.timeout * (bus.retries + 1)
        for dev_id, dev in devices.items():
            if silent > dev.interval:
                yield ("devices", dev_id, "interval"), (
                    f"a device that stops answering holds bus '{bus_name}' for timeout × (retries + 1) = "
                    f"{bus.timeout:g} s × {bus.retries + 1} = {silent:g} s at its first polls (then one try), "
                    "longer than this interval: polls are missed whenever a device of the bus falls silent "
                    "(lower timeout or retries, or lengthen the interval)")
        if not isinstance(bus, RtuBus):
            continue
        share: dict[str, float] = {}  # seconds of wire time per second
        for dev_id, dev in devices.items():
            try:
                requests = dev.read_plan() or []
            except ValueError:
                continue  # reported as an error
            share[dev_id] = rtu_wire_s(requests, bus.baudrate, bus.bytesize, bus.parity, bus.stopbits) / dev.interval
        if sum(share.values()) <= 1:
            continue
        worst = max(share, key=lambda dev_id: share[dev_id])
        interval = devices[worst].interval
        bits = rtu_char_bits(bus.bytesize, bus.parity, bus.stopbits)
        polled, advice = (("this device alone", "this interval (lengthen it") if len(share) == 1 else
                          (f"the {len(share)} devices of the bus at their intervals",
                           "these intervals (lengthen this one, the largest share"))
        yield ("devices", worst, "interval"), (
            f"the polls on bus '{bus_name}' need ~{_seconds(sum(share.values()) * interval)} of wire time per "
            f"{_seconds(interval)} (each read: (8 + 5 + 2 × registers) bytes × {bits:g} bits / {bus.baudrate} baud "
            f"+ 2 × 3.5 characters of silence; {polled}): the bus cannot keep {advice}, or raise the baud rate)")


def _missing_ports(data: Mapping[str, Any]) -> Iterable[tuple[KeyPath, str]]:
    """(where, warning) for each serial port (rtu, serial bus) that is not on this machine: a config is
    often checked on a laptop, so it is no error. The port is not opened."""
    for name, bus in _mapping(data.get("buses")).items():
        bus = _mapping(bus)
        port = _text_of(bus.get("port"))
        if bus.get("type") in ("rtu", "serial") and port and port.startswith("/") and not os.path.exists(port):
            yield ("buses", name, "port"), (f"{port} does not exist on this machine (fine if you are not on the "
                                            "gateway; on it, is the adapter plugged in? see ls /dev/serial/by-id/)")


def _inline_channels(dev: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(index, channel) of each inline register entry of raw device data whose channel is text."""
    entries = dev["registers"] if isinstance(dev.get("registers"), list) else []
    return [(i, channel) for i, entry in enumerate(entries)
            if (channel := _text_of(_mapping(entry).get("channel"))) is not None]


def _register_number_hints(dev: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(index, warning) for each inline register entry of raw device data whose address, written in
    decimal, is a register number of a manual (30001..39999 input, 40001..49999 holding) rather than
    the 0-based protocol address SPEC asks for. Larger numbers (400001) are errors of their own."""
    entries = dev["registers"] if isinstance(dev.get("registers"), list) else []
    out = []
    for i, entry in enumerate(entries):
        entry = _mapping(entry)
        address, table = entry.get("address"), _text_of(entry.get("table")) or "holding"
        if not isinstance(address, int) or isinstance(address, bool) or not (_text_of(address) or "").isdigit():
            continue  # hexadecimal (0x9C41) is a protocol address
        reference = register_reference(address)
        if reference is None or address > 0xFFFF or table not in ("holding", "input"):
            continue
        ref_table, ref_address = reference
        change = f"address: {ref_address}" + (f", table: {ref_table}" if ref_table != table else "")
        out.append((i, f"{address} looks like a register number as manuals count them (from 1): address is the "
                       f"0-based protocol address, and register {address} is address {ref_address} of {ref_table} "
                       f"({change})"))
    return out


HJ212_MAX_CODE = 64  # a channel code in HJ 212 packets (pollutant codes have 6 characters)


def _hj212_device_checks(devices: Mapping[str, Any]) -> list[_Cross]:
    """What HJ 212 (payload or uplinks) cannot carry: a channel code too long for a packet item (an
    error: its readings could not be sent), a poll faster than DataTime's one second (a warning:
    several packets per DataTime, a platform keeps one)."""
    out = []
    for dev_id, dev in devices.items():
        dev = _mapping(dev)
        codes: list[tuple[KeyPath, str]] = [(("devices", dev_id, "channels", code), str(code))
                                          for code in _mapping(dev.get("channels"))]
        codes += [(("devices", dev_id, "registers", i, "channel"), channel) for i, channel in _inline_channels(dev)]
        for path, code in codes:
            if len(code) > HJ212_MAX_CODE:
                out.append(_Cross(path, f"a channel code of {len(code)} characters cannot go into an HJ 212 packet "
                                  f"(at most {HJ212_MAX_CODE}; pollutant codes have 6)",
                                  "key" if path[-2] == "channels" else "value"))
        interval = dev.get("interval")
        if _is_number(interval) and interval < 1:
            out.append(_Cross(("devices", dev_id, "interval"), f"polled every {interval:g} s, but HJ 212's "
                              "DataTime counts whole seconds: several packets per DataTime, of which a platform "
                              "keeps one", "value", warning=True))
    return out


def _cross_check(data: Mapping[str, Any]) -> list[_Cross]:
    """Problems in references between sections: device -> bus, alarm -> device/channel,
    payload -> hj212, one bus per port. Tolerates any shape of `data` (invalid parts are skipped).
    An alarm rule or action on a device that is not configured, and a preset without a limit for the
    rule's channel, are warnings: the rule (or action) does nothing, as `agent.alarms` runs it."""
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
                out.append(_Cross(("buses", name, "port"),
                            f"port {port!r} is already used by bus '{port_owner[port]}' (one bus per port)",
                            "value"))
            else:
                port_owner[port] = str(name)
        baud = bus.get("baudrate")
        if (btype in ("rtu", "serial") and _is_number(baud) and baud > 0 and float(baud).is_integer()
                and baud not in STANDARD_BAUDRATES):  # a fraction is an error of its own
            out.append(_Cross(("buses", name, "baudrate"), f"{baud} is not a standard baud rate (instruments "
                        f"use {', '.join(map(str, STANDARD_BAUDRATES[3:10]))}...): a typo? It is set as a "
                        "custom rate", "value", warning=True))

    devices = _mapping(data.get("devices"))
    effective: dict[str, str | None] = {}
    slave_owner: dict[tuple[str, int], str] = {}  # (bus, slave) -> the first Modbus device with it
    for dev_id, dev in devices.items():
        if not isinstance(dev, dict):
            continue
        base = ("devices", dev_id)
        seen_channels: set[str] = set()  # checked on the raw list: an invalid entry must not hide it
        for i, channel in _inline_channels(dev):
            if channel in seen_channels:
                out.append(_Cross(base + ("registers", i, "channel"),
                                  f"channel {channel!r} appears twice in this device", "value"))
            seen_channels.add(channel)
        for i, hint in _register_number_hints(dev):
            out.append(_Cross(base + ("registers", i, "address"), hint, "value", warning=True))
        driver = dev.get("driver") if dev.get("driver") in DRIVERS else None
        bus_name = _text_of(dev.get("bus"))
        eff: str | None = None
        if dev.get("driver") is not None and driver is None:
            pass  # invalid driver: reported by the model
        elif driver == "simulated":
            eff = "simulated"
        elif dev.get("bus") is None:
            out.append(_Cross(base + ("bus",), "missing required key 'bus' (or set driver: simulated)", "missing"))
        elif bus_name is None:
            pass  # wrong type: reported by the model
        elif bus_name not in bus_types:
            out.append(_Cross(base + ("bus",), f"unknown bus {bus_name!r}{_suggest(bus_name, bus_types)}"
                        f"{_known(bus_types, 'buses')}", "value"))
        else:
            btype = bus_types[bus_name]
            if driver is None:
                if btype in MODBUS_BUS_TYPES:
                    eff = "modbus"
                elif btype == "serial":
                    out.append(_Cross(base + ("driver",), f"missing required key 'driver': bus '{bus_name}' is a "
                                "serial bus; set driver: pms5003, sds011 or hj212", "missing"))
            elif driver == "modbus" and btype == "serial":
                out.append(_Cross(base + ("driver",), f"driver modbus needs an rtu or tcp bus; bus '{bus_name}' "
                            "is serial", "value"))
            elif driver in SERIAL_DRIVERS and btype in MODBUS_BUS_TYPES:
                out.append(_Cross(base + ("driver",), f"driver {driver} needs a serial bus; bus '{bus_name}' "
                            f"is {btype}", "value"))
            else:
                eff = driver
            if eff == "modbus":
                if dev.get("slave") is None:
                    out.append(_Cross(base + ("slave",), "missing required key 'slave' (the Modbus unit id)",
                                "missing"))
                elif btype == "rtu" and dev.get("slave") == 0 and not isinstance(dev.get("slave"), bool):
                    out.append(_Cross(base + ("slave",), "slave 0 is the RTU broadcast address and never "
                                "answers; use 1..247", "value"))
                elif btype == "rtu" and _is_number(dev.get("slave")) and 247 < dev["slave"] <= 255:
                    out.append(_Cross(base + ("slave",), f"slave {dev['slave']} is reserved on RTU (addresses "
                                "248..255); use 1..247", "value"))
                elif isinstance(dev.get("slave"), int) and not isinstance(dev.get("slave"), bool):
                    other = slave_owner.setdefault((bus_name, dev["slave"]), str(dev_id))
                    if other != dev_id:  # one instrument may be split into two devices: not an error
                        out.append(_Cross(base + ("slave",), f"slave {dev['slave']} on bus '{bus_name}' is also "
                                          f"device '{other}': right only if both read one instrument (two "
                                          "instruments cannot share an address on one bus)",
                                          "value", warning=True))
                if dev.get("profile") is None and dev.get("registers") is None:
                    out.append(_Cross(base + ("profile",), "missing required key 'profile' (or inline "
                                "'registers'): a Modbus device needs a register map", "missing"))
        effective[str(dev_id)] = eff

    mqtt = _mapping(data.get("mqtt"))
    if mqtt.get("payload") == "hj212" and data.get("hj212") is None:
        out.append(_Cross(("mqtt", "payload"), "payload: hj212 needs an hj212: section (st, pw)", "value"))
    uplinks = _mapping(data.get("hj212")).get("uplinks")
    uplinks = uplinks if isinstance(uplinks, list) else []
    if mqtt.get("payload") == "hj212" or uplinks:
        out += _hj212_device_checks(devices)
    platforms: dict[tuple[str, object], int] = {}
    for i, uplink in enumerate(uplinks):
        where = (_text_of(_mapping(uplink).get("host")), _mapping(uplink).get("port"))
        if where[0] is not None and where in platforms:
            out.append(_Cross(("hj212", "uplinks", i), f"the platform {where[0]}:{where[1]} is already uplinks "
                              f"entry {platforms[where]}: every packet would go to it twice", "value"))
        platforms.setdefault(where, i)
    urls = mqtt.get("urls") if isinstance(mqtt.get("urls"), list) else [mqtt.get("url")]
    plain = [u for u in urls if isinstance(u, str) and u.strip().lower().startswith("mqtt://")]
    for key in ("password", "password_file"):
        if plain and mqtt.get(key) is not None:
            out.append(_Cross(("mqtt", key), "the password goes to the broker in clear text over mqtt://; use "
                              "mqtts:// (TLS) outside a trusted network", "value", warning=True))

    def known_channels(dev_id: str) -> list[str] | None:
        dev = _mapping(devices.get(dev_id))
        if effective.get(dev_id) == "hj212":
            return None  # declared channels are the least it sends
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

    def unknown_device(dev_id: str, consequence: str = "") -> str:
        return (f"unknown device {dev_id!r}{_suggest(dev_id, map(str, devices))}{consequence}"
                f"{_known(map(str, devices), 'devices')}")

    def check_ref(ref: str, path: tuple[str | int, ...], *, rule_does_nothing: bool) -> list[str] | None:
        """Check `device.channel` (or `device.*`); return the device's channels when known."""
        if ref == "*" or "." not in ref:
            return None
        dev_id, channel = ref.split(".", 1)
        if dev_id not in devices:
            if rule_does_nothing:
                out.append(_Cross(path, unknown_device(dev_id, ": the rule does nothing"), "value", warning=True))
            else:
                out.append(_Cross(path, unknown_device(dev_id), "value"))
            return None
        channels = known_channels(dev_id)
        if channel != "*" and channels is not None and channel not in channels:
            out.append(_Cross(path, f"device '{dev_id}' has no channel {channel!r}{_suggest(channel, channels)}"
                        f"{_known(channels, 'channels')}", "value"))
            return None
        return channels

    alarms = data.get("alarms")
    first_rule: dict[tuple[str, str], int] = {}  # (channel, rule kind) -> the rule that defines that alarm
    for i, rule in enumerate(alarms if isinstance(alarms, list) else []):
        if not isinstance(rule, dict):
            continue
        ref = rule.get("channel")
        for key in ("above", "below", "preset", "stale", "fault"):
            if rule.get(key) is None or not isinstance(ref, str):
                continue
            kind = rule[key] if key == "preset" and isinstance(rule[key], str) else key
            first = first_rule.setdefault((ref, kind), i)
            if first != i:  # one alarm id (channel:kind) per alarm: `run` applies the first rule only
                out.append(_Cross(("alarms", i, key), f"same channel and rule ({ref}:{kind}) as alarms.{first}, "
                                  "which takes precedence: this one is ignored", "key", warning=True))
        channels = check_ref(ref, ("alarms", i, "channel"), rule_does_nothing=True) if isinstance(ref, str) else None
        preset = rule.get("preset")
        if channels is not None and isinstance(preset, str) and preset in PRESET_CODES and isinstance(ref, str):
            codes = PRESET_CODES[preset]
            channel = ref.split(".", 1)[1]
            if channel != "*" and channel not in codes or channel == "*" and not codes & set(channels):
                what = f"channel code {channel!r}" if channel != "*" else "any channel of this device"
                out.append(_Cross(("alarms", i, "preset"), f"preset {preset!r} has no limit for {what}: the rule "
                                  f"does nothing{_known(codes, 'it has limits for')}", "value", warning=True))
        background = rule.get("background")
        if isinstance(background, str):
            check_ref(background, ("alarms", i, "background"), rule_does_nothing=False)
        stale = rule.get("stale")
        if isinstance(ref, str) and isinstance(stale, int | float) and not isinstance(stale, bool) and stale > 0:
            slow = _polled_every(devices, ref, stale)
            if slow:
                out.append(_Cross(("alarms", i, "stale"), f"stale {stale:g} s is not longer than the poll interval "
                                  f"of {slow}: the alarm would be raised before each poll and cleared at it; "
                                  "give a few intervals", "value", warning=True))
        action = _mapping(rule.get("action"))
        target = _text_of(action.get("device"))
        if target is not None:
            path = ("alarms", i, "action", "device")
            if target not in devices:
                out.append(_Cross(path, unknown_device(target, ": the action is skipped"), "value", warning=True))
            elif effective.get(target) not in (None, "modbus"):
                out.append(_Cross(path, f"an action writes to a Modbus device; '{target}' is "
                            f"{effective[target]}", "value"))
    return out


def _polled_every(devices: Mapping[str, Any], ref: str, seconds: float) -> str:
    """The devices of an alarm rule's `channel` polled every `seconds` or more slowly, as
    "cod (interval 600 s), ..." ("" when none is)."""
    dev_ids = list(devices) if ref == "*" else [ref.split(".", 1)[0]]
    default = Device.model_fields["interval"].default
    slow = []
    for dev_id in dev_ids:
        if dev_id not in devices:
            continue  # an unknown device has its own warning
        interval = _mapping(devices.get(dev_id)).get("interval", default)
        if _is_number(interval) and interval >= seconds:
            slow.append(f"{dev_id} (interval {interval:g} s)")
    return ", ".join(slow)


_SECTION_RULES: tuple[tuple[tuple[str, ...], Callable[[Mapping[str, Any]], Iterable[_Broken]]], ...] = (
    (("mqtt",), _mqtt_rules),
    (("mqtt", "tls"), _tls_rules),
    (("devices", "*"), _device_rules),
    (("alarms", "*"), _alarm_rules),
    (("alarms", "*", "action"), _action_rules),
    (("console",), _console_rules),
)


def _section_rules(data: Any) -> Iterable[tuple[KeyPath, _Broken]]:
    """Every rule broken in every section of plain `data` (`*`: each device, each alarm)."""

    def sections(value: Any, pattern: tuple[str, ...], path: KeyPath) -> Iterable[tuple[KeyPath, dict[str, Any]]]:
        if not pattern:
            if isinstance(value, dict):
                yield path, value
        elif pattern[0] == "*":
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for key, item in items:
                yield from sections(item, pattern[1:], path + (key,))
        elif isinstance(value, dict):
            yield from sections(value.get(pattern[0]), pattern[1:], path + (pattern[0],))

    for pattern, rules in _SECTION_RULES:
        for path, section in sections(data, pattern, ()):
            for broken in rules(section):
                yield path, broken


# --------------------------------------------------------------------------------------------------
# YAML -> data, with marks

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
    path: KeyPath
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


def _dotted(path: KeyPath) -> str:
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


def _message(err: Mapping[str, Any], path: KeyPath, allowed: list[str] | None, secret: bool) -> str:
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
        elsewhere = _BUS_KEYS.get(key, ())
        if path[:1] == ("buses",) and elsewhere and allowed and key not in allowed:
            # `parity` on a tcp bus is no typo of `port`: it belongs to another type of bus
            this = next((f"a {kind} bus" for kind, m in _BUS_MODELS.items() if set(m.model_fields) == set(allowed)),
                        "this type of bus")
            return msg + f": a key of {' and '.join(elsewhere)} buses, not of {this}"
        if allowed:
            hint = _suggest(key, allowed)
            msg += hint if hint else f"; allowed here: {', '.join(allowed)}"
        return msg
    if etype in ("int_type", "int_parsing", "int_from_float"):
        return "expected a whole number" + got
    if etype in ("float_type", "float_parsing"):
        return "expected a number" + got
    if etype == "finite_number":
        return "must be a finite number, not .inf or .nan" + got
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


def _replace_secret(message: str, secret: str, mask: str) -> str:
    """`message` with `secret` masked. A short one only where it stands alone: replaced inside words
    ("p" in "password"), it would both garble the message and show what the secret is."""
    if len(secret) >= 4:
        return message.replace(secret, mask)
    return re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", lambda _: mask, message)


class _Locator:
    """Turns paths into Problems using the marks the tree builder remembered."""

    def __init__(self, file: str, builder: TreeBuilder, root_mark: yaml.Mark):
        self.file = file
        self.builder = builder
        self.root_mark = root_mark
        # Environment variables substituted into a secret key's value: secrets wherever they are used.
        self.secret_vars = {name: value for path, used in builder.substituted.items()
                            if is_secret_key_path(path) for name, value in used.items()}

    def mark(self, path: KeyPath, where: str) -> yaml.Mark:
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

    def is_secret(self, path: KeyPath) -> bool:
        """Messages about `path` do not show its value: a secret key's, or one holding a secret variable."""
        if is_secret_key_path(path):
            return True
        return any(path[: len(p)] == p and not self.secret_vars.keys().isdisjoint(used)
                   for p, used in self.builder.substituted.items())

    def problem(self, path: KeyPath, where: str, message: str, *, warning: bool = False) -> Problem:
        m = self.mark(path, where)
        return Problem(self.file, m.line + 1, m.column + 1, _dotted(path), self._redact(path, message), warning)

    def at_mark(self, path: KeyPath, mark: yaml.Mark, message: str) -> Problem:
        return Problem(self.file, mark.line + 1, mark.column + 1, _dotted(path), self._redact(path, message))

    def _redact(self, path: KeyPath, message: str) -> str:
        """Never let a secret through: the value of a secret key (password, pw) becomes `***`, and a
        variable substituted into one `${NAME}`, wherever they appear. Short ones (that could be part
        of any word) only in messages about a secret value itself."""
        here = self.is_secret(path)
        for name, value in self.secret_vars.items():
            if value and (len(value) >= 4 or here):
                message = _replace_secret(message, value, "${" + name + "}")
        for text in sorted(self.builder.secret_texts, key=len, reverse=True):
            if text and (len(text) >= 4 or here):
                message = _replace_secret(message, text, "***")
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
            message = _message(err, path, allowed, self.is_secret(path))
            return self.broken(path, _Broken(message, ctx.get("at"), etype == "config_section"))
        message = _message(err, path, allowed, self.is_secret(path))
        return self.problem(path, where, message)

    def broken(self, path: KeyPath, broken: _Broken) -> Problem:
        """A rule of the section at `path` (a model validator's error, or `_section_rules`)."""
        where = "value"
        if broken.at:
            path += tuple(int(p) if p.isdigit() else p for p in broken.at.split("."))
            where = "key" if path in self.builder.marks else "missing"
        elif broken.message.startswith("missing required key '"):
            # "missing required key 'x'" raised by a model validator: show the missing key's path.
            return self.problem(path + (broken.message.split("'")[1],), "missing", broken.message)
        elif broken.section:
            where = "key"  # a rule about the whole section: point at its key
        return self.problem(path, where, broken.message)


# --------------------------------------------------------------------------------------------------
# Public API


def parse_config(
    text: str,
    *,
    file: str = "<config>",
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    check_files: bool = False,
    for_status: bool = False,
) -> Config:
    """Validate configuration `text`; `file` is only used in messages, `base_dir` anchors relative
    paths (None: they stay relative). Raises ConfigError listing every problem, in file order.
    With `check_files`, the files it names (password, TLS) must exist too. With
    `for_status`, an unset environment variable is no problem in a value `status` does not read
    (credentials, broker URLs, client id, buses, uplinks...: `status` never connects, and a
    technician's shell may lack the service's environment), unless the stand-in put there fails
    that value's own checks; the storage section, station id and devices must still be complete."""
    env = os.environ if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_yaml_problem(file, exc)]) from None
    except yaml.reader.ReaderError as exc:  # a control character: located by its index in `text`
        lines = YAML_LINE_BREAK.split(text[: exc.position])
        char = exc.character if isinstance(exc.character, int) else 0
        raise ConfigError([Problem(file, len(lines), len(lines[-1]) + 1, FILE_PATH, f"YAML syntax error: character "
                                   f"U+{char:04X} is not allowed (no control characters but tab and line breaks; "
                                   "remove it)")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, f"YAML syntax error: {exc}")]) from None
    except RecursionError:  # thousands of nested [ or {
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, TOO_DEEP)]) from None
    if root is None:
        raise ConfigError([Problem(file, 1, 1, FILE_PATH,
                                   "the file is empty (expected station:, storage:, mqtt:, devices: ...)")])
    builder = TreeBuilder(file, env, for_status)
    try:
        data = builder.build(root, ())
    except TooComplex:
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, "the file is too large or too deeply aliased")]) from None
    except RecursionError:
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, TOO_DEEP)]) from None
    locator = _Locator(file, builder, root.start_mark)
    if not isinstance(data, dict):
        line, col = root.start_mark.line + 1, root.start_mark.column + 1
        raise ConfigError([Problem(file, line, col, FILE_PATH, "expected a mapping of sections (station:, "
                                   f"storage:, mqtt:, devices: ...), got {_show(data)}")])

    problems: list[Problem] = [locator.at_mark(p, mark, m) for p, mark, m in builder.problems]
    # A value that failed substitution or parsing is reported once, by the builder.
    claimed = {p for p, _, _ in builder.problems}
    deferred_reported: set[KeyPath] = set()

    def stand_in_failed(path: KeyPath) -> bool:
        """A problem at a value given a stand-in for `status` is the unset variable's, said once."""
        if path not in builder.deferred:
            return False
        if path not in deferred_reported:
            deferred_reported.add(path)
            mark, message = builder.deferred[path]
            problems.append(locator.at_mark(path, mark, message))
        return True
    base = Path(base_dir) if base_dir is not None else None
    context = {"base_dir": base, "_cross_checked": True}
    config: Config | None = None
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as exc:
        for err in exc.errors():
            prob_path = _walk_loc(tuple(err["loc"])).path
            if prob_path in claimed or stand_in_failed(prob_path):
                continue
            problems.append(locator.from_pydantic(err))
    # The rules of sections with invalid keys too (a valid section's first rule is already there).
    reported = {p.path for p in problems}
    for path, broken in _section_rules(data):
        problem = locator.broken(path, broken)
        if problem.path not in reported:
            problems.append(problem)
    warnings: list[Problem] = []
    for path, message, where, warning in _cross_check(data):
        if path not in claimed and not stand_in_failed(path):
            (warnings if warning else problems).append(locator.problem(path, where, message, warning=warning))
    named = _named_files(data, base)
    if check_files:  # every file key that is valid itself, whatever else is wrong (also with that key)
        for key, value, written in named:
            trouble = _file_problem(key, value, written)
            if trouble is not None:
                problems.append(locator.problem(key, "value", trouble))
        warnings += [locator.problem(path, "value", message, warning=True)
                     for path, message in _missing_ports(data) if path not in claimed]
    if config is not None and not problems:
        warnings += [locator.problem(path, "value", message, warning=True)
                     for path, message in (*_register_overlaps(config), *_bus_overruns(config))]
    warnings.sort(key=lambda p: (p.line, p.col))
    if problems:
        unique = list(dict.fromkeys(problems))
        unique.sort(key=lambda p: (p.line, p.col))
        raise ConfigError(unique, warnings)
    assert config is not None
    config._warnings = warnings
    config._file = file
    config._written_files = {key: written for key, _, written in named}
    config._marks = {p: (v.line + 1, v.column + 1) for p, (_, v) in builder.marks.items()}
    return config


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = False,
    for_status: bool = False,
) -> Config:
    """Load and validate the configuration file at `path` (env: default os.environ).

    Relative paths inside it are resolved against its directory. With `check_files`, the files it
    names (password_file, TLS files) must exist too (for `check-config`); `for_status`:
    see `parse_config`. Raises ConfigError.
    """
    file = os.fspath(path)
    try:
        raw = Path(file).read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        if isinstance(exc, PermissionError):  # an installed gateway's config is readable by the service's user
            reason += " (run the command as a user who may read it; on a gateway: sudo -u edge-agent edge-agent ...)"
        raise ConfigError([Problem(file, 1, 1, FILE_PATH, f"cannot read the file: {reason}")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Problem(file, line, col, FILE_PATH,
                                   "the file is not UTF-8 text (save it as UTF-8)")]) from None
    base_dir = Path(file).absolute().parent
    config = parse_config(text, file=file, env=env, base_dir=base_dir, check_files=check_files,
                          for_status=for_status)
    config._source_path = Path(file).absolute()
    return config


def check_files(config: Config) -> list[Problem]:
    """Problems with the files a valid config names (missing or unreadable password file, TLS files,
    storage path that is a directory), shown with the file name the config was loaded with.
    `load_config(..., check_files=True)` raises them."""
    problems = []
    for key, value, written in _named_files(config.model_dump(mode="python"), None):
        message = _file_problem(key, value, config._written_files.get(key, written))
        if message is not None:
            line, col = config._marks.get(key, (1, 1))
            problems.append(Problem(config._file, line, col, _dotted(key), message))
    return problems


def check_tls(config: Config) -> list[Problem]:
    """Whether the files of `mqtt.tls` (there and readable: `check_files`) make a TLS client together
    as `run` will use them: PEM that parses, a key that matches its certificate and has no
    passphrase. Only `check-config` asks: `run` starts anyway, buffers, and says why it cannot
    connect until a SIGHUP brings usable files."""
    tls = config.mqtt.tls
    if tls is None:
        return []
    try:
        tls_context(str(tls.ca) if tls.ca else None, str(tls.cert) if tls.cert else None,
                    str(tls.key) if tls.key else None, names=config.tls_file_names())
    except TlsFilesError as exc:
        key = ("mqtt", "tls", exc.key)
        line, col = config._marks.get(key, config._marks.get(("mqtt", "tls"), (1, 1)))
        return [Problem(config._file, line, col, _dotted(key), f"cannot be used for TLS: {exc.reason}")]
    return []


#: The keys that name files, checked by `check-config` (`load_config(..., check_files=True)`).
_FILE_KEYS: tuple[KeyPath, ...] = (("storage", "path"), ("mqtt", "password_file"), ("mqtt", "tls", "ca"),
                                 ("mqtt", "tls", "cert"), ("mqtt", "tls", "key"), ("console", "password_file"))
_FILE_PATH = TypeAdapter(FilePath)


def _file_problem(key: KeyPath, value: Path, written: str) -> str | None:
    """What is wrong with the file at `value` (given as `written`) named by `key`, or None. The buffer
    database (`storage.path`) may not exist yet; the other files must exist and be readable, and the
    MQTT password file must be read as `run` reads it. The path is shown only where `_may_show_path`."""
    name = str(key[-1])
    if key == ("storage", "path"):
        try:
            return f"is a directory, expected a database file: {value}" if value.is_dir() else None
        except OSError as exc:  # e.g. a name longer than the file system allows
            return f"cannot use this path: {exc.strerror or exc.__class__.__name__}"
    if name in _PASTED_CONTENT and _looks_pasted(written):
        return _pasted_message(name)
    shown = f": {value}" if _may_show_path(name, written) else f" {_NOT_SHOWN}"
    try:
        if not value.exists():
            return f"file not found{shown}"
        if not value.is_file():
            return f"not a file{shown}"
        if not os.access(value, os.R_OK):
            return f"file not readable by this user{shown}"
    except OSError as exc:  # e.g. a name longer than the file system allows
        return f"cannot use this path: {exc.strerror or exc.__class__.__name__}"
    if name == "password_file":  # as `run` (and the console) will read it
        try:
            read_password_file(value)
        except ValueError as exc:
            return f"cannot read the password file: {exc}"
    return None


def _named_files(data: Any, base_dir: Path | None) -> list[tuple[KeyPath, Path, str]]:
    """(key, resolved path, value as written) of each file key in `data` whose value is a valid path."""
    out = []
    for key in _FILE_KEYS:
        value: Any = data
        for part in key:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        try:
            path = _FILE_PATH.validate_python(value, context={"base_dir": base_dir})
        except ValidationError:
            continue  # reported by the model
        out.append((key, path, _text_of(value) or str(value)))
    return out


def _yaml_problem(file: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    message = f"YAML syntax error: {exc.problem or exc.context or 'invalid YAML'}"
    if exc.problem and exc.problem.startswith("found undefined alias"):  # `password: *xyz`: the name may be a secret
        message = "YAML syntax error: found undefined alias (put a value that starts with '*' in quotes)"
    if exc.context and exc.problem and exc.context_mark is not None:
        message += f" ({exc.context} at line {exc.context_mark.line + 1})"
    if exc.problem and "'\\t'" in exc.problem:
        message += "; YAML does not allow tabs for indentation, use spaces"
    elif exc.problem and exc.problem.startswith(_INDENTATION_PROBLEMS):
        message += ("; check the indentation of this line: the keys of one section start in the same column "
                    "(a value that contains ': ' goes in quotes)")
    return Problem(file, line, col, FILE_PATH, message)


#: PyYAML's words for what is, in a hand-written config, nearly always a key indented wrongly.
_INDENTATION_PROBLEMS = ("mapping values are not allowed here", "did not find expected key",
                         "expected <block end>")

