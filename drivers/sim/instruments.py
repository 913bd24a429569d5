"""Simulated Modbus instruments: a device's register map served with plausible, slowly varying values.

A `SimInstrument` is a `drivers.sim.slave.DataModel` built from a register map (a built-in profile
merged with a device's inline entries): every measurement is encoded with `modbus_codec.encode` exactly
as the map says (type, word order, scale, offset), status words say "normal", and each read sees the
values of that instant. Faults for tests and demos: `fault` (a `slave.Fault`: no answer, exception,
bad CRC) and `state` (what the status words say: normal, maintenance, calibration, fault).
`SimControl` applies both from a small YAML control file (see `drivers.sim.serve`).
Imports `drivers.registers`, `drivers.modbus_codec`, `drivers.sim.slave`; nothing from `agent` but
`agent.model` (through the codec).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import yaml

from drivers.modbus_codec import encode, encode_raw
from drivers.registers import BIT_TABLES, RegisterSpec
from drivers.sim.slave import EXC_DEVICE_FAILURE, Fault, RegisterBank, Table

log = logging.getLogger(__name__)

State = Literal["normal", "maintenance", "calibration", "fault"]
STATE_FLAGS: dict[str, str] = {"normal": "N", "maintenance": "M", "calibration": "C", "fault": "D"}

# Typical level and swing of common HJ 212 channels (DOMAIN.md codes), so that a demo looks like a
# station: (mean, amplitude). Channels not listed use their range (or 10 ± 2 without one).
TYPICAL: dict[str, tuple[float, float]] = {
    "w01018": (35.0, 10.0),  # COD mg/L
    "w21003": (2.5, 1.0),  # NH3-N mg/L
    "w21011": (0.3, 0.1),  # total phosphorus mg/L
    "w21001": (12.0, 3.0),  # total nitrogen mg/L
    "w01001": (7.2, 0.3),  # pH
    "w01010": (18.0, 3.0),  # water temperature
    "w00000": (12.0, 4.0),  # flow L/s
    "a34001": (150.0, 50.0),  # TSP ug/m3
    "a34002": (70.0, 25.0),  # PM10
    "a34004": (40.0, 15.0),  # PM2.5
    "a34005": (25.0, 10.0),  # PM1.0
    "LA": (60.0, 8.0),  # noise dB(A)
    "a01001": (15.0, 8.0),  # air temperature
    "a01002": (55.0, 15.0),  # relative humidity
    "a01006": (101.3, 0.5),  # air pressure kPa
    "a01007": (3.0, 2.0),  # wind speed
    "a01008": (180.0, 90.0),  # wind direction
}
_TOTAL_EPOCH = 1767225600.0  # 2026-01-01T00:00Z: totalizers grow from here


class _Channel:
    """value(t) = mean + amplitude * sin(2 pi t / period + phase) + a little noise, kept in range; a
    function of t alone (the noise is drawn per second from a seeded generator)."""

    def __init__(self, spec: RegisterSpec, rng: random.Random):
        self.spec = spec
        mean, amp = TYPICAL.get(spec.channel, (math.nan, math.nan))
        if math.isnan(mean):
            if spec.range is not None:
                lo, hi = spec.range
                mean, amp = lo + 0.3 * (hi - lo), 0.1 * (hi - lo)
            else:
                mean, amp = 10.0, 2.0
        self.mean, self.amp = mean, amp
        self.period = rng.uniform(600.0, 3600.0)  # slowly varying: minutes to an hour per cycle
        self.phase = rng.uniform(0, 2 * math.pi)
        self.noise = 0.01 * amp
        self.total = "total" in spec.channel.lower() or (spec.unit or "").lower() == "m3"
        self.key = f"{spec.channel}:{rng.random()}"

    def value(self, t: float) -> float:
        spec = self.spec
        if spec.type == "bool":
            return 0.0
        if self.total:
            return round(50000.0 + (t - _TOTAL_EPOCH) * 0.012, 3)  # m3, a flow of 12 L/s since 2026
        v = self.mean + self.amp * math.sin(2 * math.pi * t / self.period + self.phase)
        if self.noise:  # the same within a second: every read of that second sees the same value
            v += random.Random(f"{self.key}:{int(t)}").gauss(0.0, self.noise)
        if spec.range is not None:
            lo, hi = spec.range
            v = min(max(v, lo), hi)
        if spec.type.startswith("uint") and v < spec.offset:
            v = spec.offset
        return round(v, 3)  # instruments report a few decimals


def _status_raw(spec: RegisterSpec, flag: str) -> int | None:
    """The raw status value that makes `flag_from_status` say `flag`, or None when the map cannot."""
    if spec.ascii is not None:
        letters = [k for k, f in (spec.flags or {}).items() if f == flag and isinstance(k, str)]
        if not letters:
            if spec.flags and flag in spec.flags and spec.flags[flag] != flag:
                return None  # the letter is remapped to something else and nothing maps to flag
            letters = [flag]
        code = ord(sorted(letters)[0])
        return code << 8 if spec.ascii == "high" else code
    if spec.bits is not None:
        if flag == "N":
            return 0
        bits = sorted(b for b, f in spec.bits.items() if f == flag)
        return 1 << bits[0] if bits else None
    keys = sorted(int(k) for k, f in (spec.flags or {}).items() if f == flag)
    if not keys:
        return None
    return 0 if 0 in keys else keys[0]


class SimInstrument:
    """A simulated instrument serving `specs` (see the module docstring).

    `clock` gives the time used for values (wall-clock seconds by default; tests may freeze it).
    With `strict`, reads touching registers the map does not define get exception 02, as picky
    analyzers do. Writes to coils and holding registers are accepted and read back (relay outputs).
    """

    def __init__(self, name: str, specs: Sequence[RegisterSpec], *, seed: int = 0, strict: bool = False,
                 clock: Callable[[], float] = time.time):
        self.name = name
        self.specs = list(specs)
        self.clock = clock
        self.bank = RegisterBank(strict=strict)
        self.fault: Fault | None = None
        self.state: State = "normal"
        rng = random.Random(f"{name}:{seed}")
        self._channels = [_Channel(s, rng) for s in self.specs if s.role == "value"]
        self._status = [s for s in self.specs if s.role == "status"]
        self._written: set[tuple[str, int]] = set()
        self._warned: set[str] = set()
        self.refresh()

    def values(self, t: float | None = None) -> dict[str, float]:
        """The physical value of each measurement channel at `t` (default: now)."""
        t = self.clock() if t is None else t
        return {ch.spec.channel: ch.value(t) for ch in self._channels}

    def refresh(self, t: float | None = None) -> None:
        """Encode the values at `t` and the status words of `state` into the registers."""
        t = self.clock() if t is None else t
        for ch in self._channels:
            spec = ch.spec
            if (spec.table, spec.address) in self._written:
                continue
            try:
                words = encode(ch.value(t), spec)
            except ValueError:
                words = [0] * (1 if spec.table in BIT_TABLES else spec.count)
            self.bank.set(spec.table, spec.address, words)
        flag = STATE_FLAGS[self.state]
        if flag != "N" and not self._status and "" not in self._warned:
            self._warned.add("")
            log.warning("sim %s: no status word in this map: it cannot say %s", self.name, self.state)
        for spec in self._status:
            raw = _status_raw(spec, flag)
            if raw is None:
                if spec.channel not in self._warned:
                    self._warned.add(spec.channel)
                    log.warning("sim %s: status word %s cannot say %s; left normal", self.name, spec.channel,
                                self.state)
                raw = _status_raw(spec, "N") or 0
            self.bank.set(spec.table, spec.address, encode_raw(raw, spec.type, spec.order))

    def read(self, table: Table, address: int, count: int) -> list[int] | int:
        self.refresh()
        return self.bank.read(table, address, count)

    def write(self, table: Table, address: int, values: list[int]) -> int | None:
        err = self.bank.write(table, address, values)
        if err is None:
            self._written.update((table, address + i) for i in range(len(values)))
        return err

    def written(self, table: Table, address: int) -> int:
        """The value a master last wrote (or the current value) at `address` of `table`."""
        return self.bank.get(table, address)[0]


def parse_fault(text: object) -> tuple[Fault | None, State]:
    """A control-file entry -> (fault, state). Accepted: normal | silent | badcrc | exception |
    {exception: CODE} | maintenance | calibration | fault. Raises ValueError for anything else."""
    if isinstance(text, Mapping) and set(text) == {"exception"}:
        code = text["exception"]
        if not isinstance(code, int) or isinstance(code, bool) or not 1 <= code <= 255:
            raise ValueError(f"exception code {code!r} is not a number from 1 to 255")
        return Fault("exception", code), "normal"
    if not isinstance(text, str):
        raise ValueError(f"unknown fault {text!r}")
    if text in ("silent", "badcrc"):
        return Fault(text), "normal"  # type: ignore[arg-type]
    if text == "exception":
        return Fault("exception", EXC_DEVICE_FAILURE), "normal"
    if text in STATE_FLAGS:
        return None, text  # type: ignore[return-value]
    raise ValueError(f"unknown fault {text!r}: use normal, silent, badcrc, exception, {{exception: CODE}}, "
                     "maintenance, calibration or fault")


class SimControl:
    """Applies a YAML control file `{device_id: fault}` to instruments whenever the file changes.

    A device missing from the file (or a missing file) is normal. A broken file is reported once and
    the previous faults are kept."""

    def __init__(self, path: str | Path | None, instruments: Mapping[str, SimInstrument]):
        self.path = Path(path) if path else None
        self.instruments = dict(instruments)
        self._stamp: object = object()  # never equal to a file's stamp: the first refresh applies

    def refresh(self) -> bool:
        """Re-read the file when it changed; True when the faults were (re)applied."""
        if self.path is None:
            return False
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            data = yaml.safe_load(self.path.read_text()) if stamp is not None else {}
            data = data or {}
            if not isinstance(data, dict):
                raise ValueError("the control file is a mapping {device_id: fault}")
            parsed = {str(dev): parse_fault(v) for dev, v in data.items()}
        except (OSError, yaml.YAMLError, ValueError, TypeError) as exc:
            log.error("sim control %s: %s; faults unchanged", self.path, exc)
            return False
        for dev in parsed:
            if dev not in self.instruments:
                log.warning("sim control %s: no simulated device %r", self.path, dev)
        for dev, inst in self.instruments.items():
            fault, state = parsed.get(dev, (None, "normal"))
            if (fault, state) != (inst.fault, inst.state):
                log.info("sim %s: %s", dev, state if fault is None else fault.kind +
                         (f" {fault.code:02d}" if fault.kind == "exception" else ""))
            inst.fault, inst.state = fault, state
        return True
