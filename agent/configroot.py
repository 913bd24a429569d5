"""The model of the whole configuration file, `Config` (its sections, the default driver resolved, the
checks across sections of `agent.configchecks` as its own validator, and what `run` asks of it: broker
password, the files' names as messages may show them, topics, a device's bus), and the warnings only
a valid file can give: `_register_overlaps` (entries of a register map reading the same registers) and
`_bus_overruns` (intervals a bus certainly cannot keep, with the RTU wire time of
`drivers.planner.rtu_wire_s`).

Imports `agent.configproblem`, `agent.configfields`, `agent.configsections`, `agent.configdevices`,
`agent.configchecks`, `agent.configyaml` (`KeyPath`), `drivers.planner` and `drivers.registers`
(`overlaps`); nothing else from the project.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationInfo, model_validator

from agent.configchecks import _cross_check
from agent.configdevices import MODBUS_BUS_TYPES, Bus, BusName, Device, DeviceId, RtuBus, SerialBus, TcpBus
from agent.configfields import _err, _may_show_path, _Model, _none_to_empty_dict, _none_to_empty_list
from agent.configproblem import ConfigError, Problem, _dotted
from agent.configsections import Aggregate, Alarm, Console, Hj212, Mqtt, Station, Storage
from agent.configyaml import KeyPath
from drivers.planner import rtu_char_bits, rtu_wire_s
from drivers.registers import overlaps

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
    _env_names: tuple[str, ...] = PrivateAttr(default=())  # the `${NAME}`s substituted, in file order
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
    def env_names(self) -> tuple[str, ...]:
        """The environment variables the file's `${NAME}`s took their values from, in file order (never
        the values: a password may be one)."""
        return self._env_names

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
# Warnings about a valid file


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
