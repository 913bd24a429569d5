"""The alarm presets (an alarm rule's `preset:`, SPEC §2 "alarms"): `load_presets` reads the packaged
`agent/data/presets.yaml` once into `Preset`s, each with a `PresetLimit` per channel code (and its
`ColdLimit`, the limit that applies while the water temperature is low); `resolve_preset` and
`_limit_for`, the limit in force at a temperature; `_unit_factor`, what turns a preset's limit into the
channel's unit (a preset in ug/m3 applies to a channel reported in mg/m3).

Imports nothing from the project.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class ColdLimit:
    """A second limit that applies while a temperature channel reads <= `at_or_below`."""

    above: float
    channel: str  # channel code of the temperature (w01010 water temperature)
    at_or_below: float


@dataclass(frozen=True)
class PresetLimit:
    """The limit of one pollutant in a preset, in the standard's unit."""

    above: float
    unit: str | None
    cold: ColdLimit | None = None


@dataclass(frozen=True)
class Preset:
    """One entry of presets.yaml: limits per channel code and the averaging window they apply to."""

    name: str
    standard: str
    year: int
    title: str
    window: float | None
    limits: Mapping[str, PresetLimit]
    note: str | None = None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


@functools.cache
def load_presets(path: str | Path | None = None) -> Mapping[str, Preset]:
    """The alarm presets, read once from the packaged `agent/data/presets.yaml` (or `path`).
    Raises ValueError naming the entry when the file is malformed."""
    if path is None:
        text = importlib.resources.files("agent").joinpath("data/presets.yaml").read_text("utf-8")
    else:
        text = Path(path).read_text("utf-8")
    document = yaml.safe_load(text)
    if not isinstance(document, dict) or not isinstance(document.get("presets"), dict):
        raise ValueError("presets: top-level 'presets' mapping missing")
    presets: dict[str, Preset] = {}
    for name, entry in document["presets"].items():
        where = f"presets.{name}"
        if not isinstance(entry, dict) or not {"standard", "year", "limits"} <= set(entry):
            raise ValueError(f"{where}: needs standard, year and limits")
        window = entry.get("window")
        limits: dict[str, PresetLimit] = {}
        for code, lim in (entry["limits"] or {}).items():
            lw = f"{where}.limits.{code}"
            if not isinstance(lim, dict) or "above" not in lim:
                raise ValueError(f"{lw}: needs above")
            cold = lim.get("cold")
            cold_limit = None
            if cold is not None:
                if not isinstance(cold, dict) or not {"above", "channel", "at_or_below"} <= set(cold):
                    raise ValueError(f"{lw}.cold: needs above, channel and at_or_below")
                cold_limit = ColdLimit(_number(cold["above"], f"{lw}.cold.above"), str(cold["channel"]),
                                       _number(cold["at_or_below"], f"{lw}.cold.at_or_below"))
            limits[str(code)] = PresetLimit(_number(lim["above"], f"{lw}.above"),
                                            str(lim["unit"]) if lim.get("unit") else None, cold_limit)
        presets[str(name)] = Preset(
            name=str(name), standard=str(entry["standard"]), year=int(entry["year"]),
            title=str(entry.get("title") or ""),
            window=None if window is None else _number(window, f"{where}.window"),
            limits=limits, note=entry.get("note"),
        )
    return presets


def resolve_preset(name: str, code: str, temperature: float | None = None) -> tuple[float, float | None]:
    """(limit in the standard's unit, window seconds or None) of preset `name` for channel code
    `code`, given the temperature the preset's cold variant looks at. KeyError when the preset has no
    limit for that code."""
    preset = load_presets()[name]
    lim = preset.limits[code]
    return _limit_for(lim, temperature), preset.window


def _limit_for(lim: PresetLimit, temperature: float | None) -> float:
    if lim.cold is not None and temperature is not None and temperature <= lim.cold.at_or_below:
        return lim.cold.above
    return lim.above


# Mass-per-volume units: a preset in ug/m3 applies to a TSP channel reported in mg/m3.
_MASS = {"ng": 1e-3, "ug": 1.0, "mg": 1e3, "g": 1e6}
_UNIT_RE = re.compile(r"(ng|ug|mg|g)/(m3|l)")


def _unit_factor(from_unit: str | None, to_unit: str | None) -> float | None:
    """Factor turning a number in `from_unit` into `to_unit`; 1 when either is unknown; None when
    they are different kinds of unit."""
    if not from_unit or not to_unit:
        return 1.0

    def norm(u: str) -> str:
        return (u.strip().lower().replace("µ", "u").replace("μ", "u").replace("³", "3").replace(" ", ""))

    a, b = norm(from_unit), norm(to_unit)
    if a == b:
        return 1.0
    ma, mb = _UNIT_RE.fullmatch(a), _UNIT_RE.fullmatch(b)
    if ma is None or mb is None or ma.group(2) != mb.group(2):
        return None
    return _MASS[ma.group(1)] / _MASS[mb.group(1)]
