"""The models of the configuration's `buses:` (`RtuBus`, `TcpBus`, `SerialBus`: the discriminated
union `Bus`) and `devices:` (`Device`, with `SimChannel` for simulated ones) (SPEC §2): the drivers, the
patterns of bus names, device ids and channel codes, the rules that combine a device's keys
(`_device_rules`: run by the model, and on the file's plain data by `agent.configchecks._section_rules`),
and a device's register map (a profile's entries merged with the inline ones), read plan and channels.

Imports `agent.configfields` (base model, field types), `drivers.registers`, `drivers.profiles` (names,
maps), `drivers.planner` (the reads of a poll) and, lazily, `drivers.serial_frames` (the fixed channels
of pms5003/sds011); nothing else from the project.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from agent.configfields import (
    _QUOTED_CHOICE,
    MAX_INTERVAL_S,
    MAX_TIMEOUT_S,
    HostName,
    Text,
    _as_text,
    _Broken,
    _err,
    _known,
    _Model,
    _non_empty_text,
    _raise_first,
    _suggest,
    _text_of,
    _upper,
)
from drivers import profiles
from drivers.planner import Request, plan
from drivers.registers import RegisterSpec, check_map, value_channels

DRIVERS: tuple[str, ...] = ("modbus", "pms5003", "sds011", "hj212", "simulated")
SERIAL_DRIVERS = frozenset({"pms5003", "sds011", "hj212"})
MODBUS_BUS_TYPES = frozenset({"rtu", "tcp"})
DEVICE_ID_RE = re.compile(r"[a-z0-9_-]+")
BUS_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
CHANNEL_RE = re.compile(r"[A-Za-z0-9_]+")


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
    timeout: float = Field(0.5, gt=0, le=MAX_TIMEOUT_S, description="Answer timeout, seconds")
    retries: int = Field(1, ge=0, description="Retries before a device is given up for this poll")

    @field_validator("port")
    @classmethod
    def _check_port(cls, value: str) -> str:
        return _check_port_path(value, rtu=True)


class TcpBus(_Model):
    """A Modbus TCP connection (instrument or RS-485 gateway)."""

    type: Literal["tcp"]
    host: HostName
    port: int = Field(502, ge=1, le=65535)
    timeout: float = Field(1.0, gt=0, le=MAX_TIMEOUT_S, description="Answer timeout, seconds")
    retries: int = Field(1, ge=0, description="Retries before a device is given up for this poll")


class SerialBus(_Model):
    """A serial port for instruments that stream frames (PMS5003, SDS011, HJ 212 over RS-232)."""

    type: Literal["serial"]
    port: PortPath = Field(description="Serial device (absolute path), e.g. /dev/ttyAMA0")
    baudrate: int = Field(9600, gt=0)
    parity: Parity = "N"
    bytesize: Annotated[Literal[7, 8], _QUOTED_CHOICE] = 8
    stopbits: Annotated[Literal[1, 2], _QUOTED_CHOICE] = 1
    timeout: float = Field(1.0, gt=0, le=MAX_TIMEOUT_S, description="Read timeout, seconds")

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
    interval: float = Field(60.0, ge=0.1, le=MAX_INTERVAL_S, description="Poll period, seconds (0.1 to 86400)")
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
