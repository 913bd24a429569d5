"""The models of the configuration's sections other than buses and devices (SPEC §2): `station`,
`storage`, `mqtt` (with `tls`), `aggregate`, `hj212` (with its uplinks), `alarms` (with their
actions) and `console`, each with the rules that combine its keys (`_mqtt_rules`, `_tls_rules`,
`_alarm_rules`, `_action_rules`, `_console_rules`: run by the model, and on the file's plain data by
`agent.configchecks._section_rules`); the alarm presets' names and codes (read from the packaged
`agent/data/presets.yaml`); and `read_password_file`, the one reader of password files.

Imports `agent.configfields` (base model, field types) and `agent.configproblem` (`Mqtt.read_password`
raises ConfigError); nothing else from the project.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.configfields import (
    _QUOTED_CHOICE,
    HOST_NAME_RULE,
    MAX_TIMEOUT_S,
    FilePath,
    HostName,
    NonEmptyText,
    Text,
    _as_text,
    _Broken,
    _err,
    _is_number,
    _Model,
    _none_to_empty_list,
    _raise_first,
    _show,
    _suggest,
    is_host,
)
from agent.configproblem import ConfigError, Problem


def _preset_codes() -> dict[str, frozenset[str]]:
    """The alarm presets in the packaged `agent/data/presets.yaml` with the channel codes each has a
    limit for (the limits themselves are read by `agent.alarmpresets.load_presets`)."""
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

AGGREGATE_MINUTES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30)

STATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,24}")
# HJ 212-2017 PW: at most 6 printable ASCII characters, no space nor ; , & = (as agent.hj212 encodes it)
HJ212_PW_RE = re.compile(r"[!-%'-+\--:<>-~]{0,6}")
ST_SYSTEM_INTERACTION = 91  # HJ 212 ST of answers and commands (DOMAIN.md), never a station's system code


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
    if not is_host(parts.hostname):
        raise _err(f"the url's host {parts.hostname!r} is not a host name or IP address ({HOST_NAME_RULE})")
    try:
        port = parts.port
    except ValueError:
        raise _err("the url's port must be a number from 1 to 65535") from None
    if port == 0:
        raise _err("the url's port must be a number from 1 to 65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _err("a broker url has no path, query or fragment (expected mqtt://HOST[:PORT])")
    return value


def check_mqtt_url(value: str) -> None:
    """`_check_mqtt_url` for a url given outside the config (`tail --url`): ValueError with its message."""
    try:
        _check_mqtt_url(value)
    except PydanticCustomError as exc:
        raise ValueError(exc.message()) from None


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
    one line, without its line break (and without the byte order mark Windows editors may put first).
    The one reader of password files, for `run`, `check-config` and the console. Raises ValueError
    whose message is the reason ("Permission denied", "not UTF-8 text", "the file is empty"), never
    quoting the file nor its path, when it does not hold one password."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:  # str(exc) would quote the path
        raise ValueError(exc.strerror or exc.__class__.__name__) from None
    except UnicodeDecodeError:  # its message would quote the bytes
        raise ValueError("not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:  # made with `touch`: an empty password the broker refuses
        raise ValueError("the file is empty")
    if "\n" in text or "\r" in text:  # a user name above, a blank line below: not one password
        raise ValueError("it holds more than one line (it must hold the password alone, on one line)")
    return text


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

    host: HostName
    port: int = Field(ge=1, le=65535)
    timeout: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="Seconds to wait for the platform's answer")
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

    @field_validator("st")
    @classmethod
    def _check_st(cls, value: int) -> int:
        if value == ST_SYSTEM_INTERACTION:  # answers and commands: a platform neither stores nor acks data with it
            raise _err("ST 91 is the system interaction code (answers, commands), never a station's data: give the "
                       "station's system code (21 surface water, 22 ambient air, 32 water pollution source, 39 "
                       "construction-site dust, ...)")
        return value

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
    if m is None and "://" in value:
        scheme = value.strip().split("://", 1)[0]
        raise ValueError(f"give HOST:PORT, not a URL (e.g. 0.0.0.0:8080 without {scheme}://)")
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
