"""The checks of a configuration file on its plain data, so that they run even when some section is
invalid: `_cross_check`, the references between sections (devices -> buses, alarms -> devices and
channels, actions -> Modbus devices, payload -> hj212, one bus per port, one Modbus device per slave,
what HJ 212 cannot carry, ...), with the warnings among them (an alarm rule that does nothing, a
register number of a manual given as `address`, a baud rate no instrument uses, ...); `_section_rules`,
the rules that combine keys of one section, run on every section of the file; and `_missing_ports`,
the serial ports that are not on this machine (a warning, for `check_files`).

Imports `agent.configfields`, `agent.configsections` and `agent.configdevices` (constants, rules, the
channels of a profile or a serial driver), `agent.hj212` (its code tables) and `drivers.registers`
(`register_reference`); nothing else from the project.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from agent.configdevices import (
    DRIVERS,
    MODBUS_BUS_TYPES,
    SERIAL_DRIVERS,
    Device,
    _device_rules,
    _profile_specs,
    _serial_channels,
)
from agent.configfields import _Broken, _is_number, _known, _mapping, _suggest, _text_of
from agent.configsections import (
    PRESET_CODES,
    _action_rules,
    _alarm_rules,
    _console_rules,
    _mqtt_rules,
    _tls_rules,
)
from agent.configyaml import KeyPath
from agent.hj212 import codes as hj212_codes
from drivers.registers import register_reference

# --------------------------------------------------------------------------------------------------
# Checks across sections, on plain data (so that they run even when some section is invalid)

class _Cross(NamedTuple):
    path: tuple[str | int, ...]
    message: str
    where: str  # "value" | "key" | "missing"
    warning: bool = False  # the file is valid, but this part of it does nothing


STANDARD_BAUDRATES = (300, 600, 1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200, 230400, 460800,
                      921600)


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


def _channel_clashes(base: tuple[str | int, ...], dev: Mapping[str, Any]) -> list[_Cross]:
    """A channel written twice in one device's raw data (an invalid entry must not hide it), or two codes
    that differ only in case (`a34004`, `A34004`): HJ 212 platforms match pollutant codes without regard
    to case in practice, so the two series would be merged or overwritten, and an inline register meant
    to override a profile's entry would be a second channel instead."""
    out: list[_Cross] = []
    first: dict[str, str] = {}  # lower-case code -> the code as first written
    profile = _text_of(dev.get("profile"))
    specs = _profile_specs(profile) if profile is not None else None
    from_profile = {spec.channel.lower(): spec.channel for spec in specs or ()}
    sim = dev.get("channels") if isinstance(dev.get("channels"), dict) else {}
    written = [(base + ("channels", code), str(code), "key") for code in sim if isinstance(code, str)]
    written += [(base + ("registers", i, "channel"), code, "value") for i, code in _inline_channels(dev)]
    seen: set[str] = set()
    for where, code, kind in written:
        other = first.setdefault(code.lower(), code)
        in_profile = from_profile.get(code.lower(), code)
        if code in seen:
            out.append(_Cross(where, f"channel {code!r} appears twice in this device", kind))
        elif other != code:
            out.append(_Cross(where, f"channel {code!r} differs from channel {other!r} only in case: HJ 212 "
                              "platforms match pollutant codes without regard to case, so the two would be "
                              "merged or overwritten; write one code once", kind))
        elif in_profile != code:
            out.append(_Cross(where, f"channel {code!r} differs from the channel {in_profile!r} of profile "
                              f"{profile!r} only in case: an entry overrides the profile's entry of the same "
                              f"code, so this one would be a second channel; write {in_profile!r}", kind))
        seen.add(code)
    return out


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

# Units an instrument may report a pollutant in, by what they measure: (kind, size in the kind's base unit).
# HJ 212 packets carry no unit: a platform reads every value of a code in the code table's unit.
UNIT_SIZES: dict[str, tuple[str, float]] = {
    "ng/m3": ("air", 1e-3), "ug/m3": ("air", 1.0), "mg/m3": ("air", 1e3), "g/m3": ("air", 1e6),
    "ng/l": ("water", 1e-6), "ug/l": ("water", 1e-3), "mg/l": ("water", 1.0), "g/l": ("water", 1e3),
    "l/s": ("flow", 1.0), "l/min": ("flow", 1 / 60), "l/h": ("flow", 1 / 3600), "m3/s": ("flow", 1e3),
    "m3/min": ("flow", 1e3 / 60), "m3/h": ("flow", 1e3 / 3600), "m3/d": ("flow", 1e3 / 86400),
    "pa": ("pressure", 1e-3), "hpa": ("pressure", 0.1), "mbar": ("pressure", 0.1), "kpa": ("pressure", 1.0),
    "mpa": ("pressure", 1e3), "bar": ("pressure", 100.0),
    "m/s": ("speed", 1.0), "km/h": ("speed", 1 / 3.6),
    "°c": ("temperature", 1.0), "k": ("temperature", 1.0), "°f": ("temperature", 1.0),
}


def _unit_key(unit: str) -> str:
    return (unit.strip().lower().replace("µ", "u").replace("μ", "u").replace("³", "3").replace("℃", "°c")
            .replace(" ", ""))


def _hj212_unit_warning(code: str, unit: object) -> str | None:
    """A warning when `unit` measures what the HJ 212 code table's unit of pollutant `code` measures, but
    in another unit (mg/m3 for PM2.5 in ug/m3): the platform would read every value wrongly scaled."""
    if not isinstance(unit, str) or not unit.strip():
        return None
    try:
        entry = hj212_codes()["pollutants"].codes.get(code)
    except (OSError, ValueError, KeyError):  # the packaged table: never a reason to fail a check
        return None
    standard = entry.get("unit", "") if entry is not None else ""
    accepted = [standard, *(u for u in (entry or {}).get("also", "").split(",") if u.strip())]
    given, wanted = UNIT_SIZES.get(_unit_key(unit)), UNIT_SIZES.get(_unit_key(standard))
    if given is None or wanted is None or given[0] != wanted[0] or _unit_key(unit) in map(_unit_key, accepted):
        return None
    ratio = given[1] / wanted[1]
    off = (f", {ratio:.6g} times too small" if ratio > 1 else f", {1 / ratio:.6g} times too large") \
        if given[0] != "temperature" else ""
    return (f"{code} is in {unit}, but the {hj212_codes()['pollutants'].standard} code table gives {code} in "
            f"{' or '.join(accepted)} and packets carry no unit: a platform would read these values as {standard}"
            f"{off}; convert them (a register's scale) or use another channel code")


def _hj212_device_checks(devices: Mapping[str, Any]) -> list[_Cross]:
    """What HJ 212 (payload or uplinks) cannot carry: a channel code too long for a packet item (an
    error: its readings could not be sent), a poll faster than DataTime's one second (a warning:
    several packets per DataTime, a platform keeps one), a pollutant in another unit than the code
    table's (a warning: packets carry no unit, a platform would read the values wrongly scaled)."""
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
        units = [(("devices", dev_id, "channels", code, "unit"), str(code), _mapping(entry).get("unit"))
                 for code, entry in _mapping(dev.get("channels")).items()]
        registers = dev["registers"] if isinstance(dev.get("registers"), list) else []
        units += [(("devices", dev_id, "registers", i, "unit"), channel, _mapping(registers[i]).get("unit"))
                  for i, channel in _inline_channels(dev)]
        for path, code, unit in units:
            warning = _hj212_unit_warning(code, unit)
            if warning is not None:
                out.append(_Cross(path, warning, "value", warning=True))
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
        if btype == "rtu" and str(bus.get("bytesize")) == "7":
            out.append(_Cross(("buses", name, "bytesize"), "Modbus RTU sends 8 data bits: with 7 no answer can "
                        "be read (7 data bits are Modbus ASCII's, which the agent does not speak)", "value",
                        warning=True))
        baud = bus.get("baudrate")
        if (btype in ("rtu", "serial") and _is_number(baud) and baud > 0 and float(baud).is_integer()
                and baud not in STANDARD_BAUDRATES):  # a fraction is an error of its own
            out.append(_Cross(("buses", name, "baudrate"), f"{baud} is not a standard baud rate (instruments "
                        f"use {', '.join(map(str, STANDARD_BAUDRATES[3:10]))}...): a typo? It is set as a "
                        "custom rate", "value", warning=True))

    devices = _mapping(data.get("devices"))
    effective: dict[str, str | None] = {}
    slave_owner: dict[tuple[str, int], str] = {}  # (bus, slave) -> the first Modbus device with it
    serial_owner: dict[tuple[str, str], str] = {}  # (serial bus, driver) -> the first device with it
    for dev_id, dev in devices.items():
        if not isinstance(dev, dict):
            continue
        base = ("devices", dev_id)
        out.extend(_channel_clashes(base, dev))
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
            elif eff in SERIAL_DRIVERS:
                other = serial_owner.setdefault((bus_name, eff), str(dev_id))
                if other != dev_id:
                    article = "a" if eff == "pms5003" else "an"
                    out.append(_Cross(base + ("bus",), f"device '{other}' is {article} {eff} instrument on serial "
                                      f"bus '{bus_name}' too: its frames do not say which instrument sent them, so "
                                      "both devices would store every frame on the line (each instrument's values "
                                      "under both); give each instrument its own serial bus (its own port)",
                                      "value"))
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

    if mqtt.get("payload") == "hj212" or uplinks:  # a packet names a pollutant by its code alone, never the device
        measured_by: dict[str, tuple[str, str]] = {}  # lower-case code -> (device, code as written there)
        for dev_id in map(str, devices):
            for channel in known_channels(dev_id) or []:
                other, written = measured_by.setdefault(channel.lower(), (dev_id, channel))
                if other != dev_id:
                    spelled = f" (as {written})" if written != channel else ""
                    out.append(_Cross(("devices", dev_id), f"channel {channel} is also measured by device "
                                      f"'{other}'{spelled}: "
                                      "HJ 212 packets name a pollutant by its code alone (MN is the station), so a "
                                      f"platform cannot tell the two {channel} apart (it merges or overwrites them); "
                                      "give one of them another channel code", "key", warning=True))

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


# --------------------------------------------------------------------------------------------------
# The rules that combine keys of one section (`_Broken`), on every section of plain data

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
