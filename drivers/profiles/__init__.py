"""Built-in register maps (`profile:` in a device): one YAML file per instrument family here.

A profile file holds `name` (= the file name without `.yaml`), `vendor`, `model`, `description`,
`source` (where the convention comes from and what is unconfirmed), `registers` (the same entries as a
device's inline `registers:`, see `drivers.registers`) and optionally `max_gap` / `max_block` for the
planner (`drivers.planner`). Unknown keys are errors. Imports nothing from `agent` but `agent.model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from drivers.planner import plan
from drivers.registers import RegisterSpec, check_map

PROFILE_DIR = Path(__file__).parent

REQUIRED_KEYS = ("name", "vendor", "model", "description", "source", "registers")
OPTIONAL_KEYS = ("max_gap", "max_block")
_REGISTERS = TypeAdapter(list[RegisterSpec])
_SPEC_FIELDS = frozenset(f.name for f in fields(RegisterSpec))


class ProfileError(ValueError):
    """A profile that cannot be used; the message starts with the file (or profile name)."""


@dataclass(frozen=True)
class Profile:
    """A validated built-in register map."""

    name: str
    vendor: str
    model: str
    description: str
    source: str
    registers: tuple[RegisterSpec, ...]
    max_gap: int | None = None
    max_block: int | None = None
    path: Path | None = None


def names() -> list[str]:
    """Names of the built-in profiles (file names without `.yaml`)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load(name: str) -> Profile:
    """The built-in profile `name`, validated (cached: profiles are read-only data).

    Raises ProfileError naming the file for anything wrong: unknown profile, YAML syntax, missing or
    unknown keys, an invalid register entry (with its index and field), duplicate channels, a
    map the planner cannot read.
    """
    if name not in names():
        raise ProfileError(f"unknown profile {name!r}; built-in profiles: {', '.join(names())}")
    return _load_builtin(name)


@cache
def _load_builtin(name: str) -> Profile:
    return load_file(PROFILE_DIR / f"{name}.yaml")


def load_file(path: Path | str) -> Profile:
    """A profile from any file (for tests and for vendors' maps kept outside the package); not cached."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a mapping with keys {', '.join(REQUIRED_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise ProfileError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: "
                           f"{', '.join(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ProfileError(f"{path}: missing key(s) {', '.join(missing)}")
    for key in ("name", "vendor", "model", "description", "source"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise ProfileError(f"{path}: {key}: must be a non-empty string")
    if data["name"] != path.stem:
        raise ProfileError(f"{path}: name {data['name']!r} must be the file name {path.stem!r}")
    for key in OPTIONAL_KEYS:
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ProfileError(f"{path}: {key}: must be a non-negative integer, got {value!r}")
    if not isinstance(data["registers"], list) or not data["registers"]:
        raise ProfileError(f"{path}: registers: must be a non-empty list of register entries")
    try:
        registers = tuple(_REGISTERS.validate_python(data["registers"]))
    except ValidationError as exc:
        raise ProfileError(f"{path}: {_describe(exc)}") from None
    try:
        check_map(registers)
        plan(registers, **_plan_args(data))
    except ValueError as exc:
        raise ProfileError(f"{path}: registers: {exc}") from None
    return Profile(
        name=data["name"], vendor=data["vendor"], model=data["model"], description=data["description"],
        source=data["source"], registers=registers, max_gap=data.get("max_gap"),
        max_block=data.get("max_block"), path=path,
    )


def _plan_args(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in OPTIONAL_KEYS if data.get(k) is not None}


def plan_args(profile: Profile) -> dict[str, int]:
    """The profile's planner settings as keyword arguments for `drivers.planner.plan`."""
    out: dict[str, int] = {}
    if profile.max_gap is not None:
        out["max_gap"] = profile.max_gap
    if profile.max_block is not None:
        out["max_block"] = profile.max_block
    return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        index, *rest = err["loc"] or ("?",)
        loc = f"registers[{index}]" + "".join(f".{p}" for p in rest)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "unexpected_keyword_argument":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def merge(
    profile_registers: Sequence[RegisterSpec], inline_registers: Sequence[RegisterSpec | Mapping[str, Any]]
) -> list[RegisterSpec]:
    """A device's map from its profile and its inline `registers:`: an inline entry whose channel is
    in the profile replaces that entry where it stands; other inline entries are appended in order.

    An inline entry may also be a mapping naming `channel` and only the keys to change
    (`{channel: w01018, range: [0, 500]}`): it is applied to the profile's entry of that channel (a
    mapping for a channel the profile lacks must be a complete entry). The result is checked with
    `check_map` (ValueError for duplicate channels or a dangling `applies_to`).
    """
    result = list(profile_registers)
    index = {spec.channel: i for i, spec in enumerate(result)}
    inline_seen: set[str] = set()
    for item in inline_registers:
        if isinstance(item, RegisterSpec):
            spec = item
        else:
            if "channel" not in item:
                raise ValueError(f"inline register {dict(item)!r} has no channel")
            unknown = sorted(set(item) - _SPEC_FIELDS)
            if unknown:
                raise ValueError(f"inline register {item['channel']!r}: unknown key(s) {', '.join(unknown)}")
            base = index.get(str(item["channel"]))
            if base is None:
                spec = _REGISTERS.validate_python([dict(item)])[0]
            else:
                spec = _REGISTERS.validate_python([{**_fields(result[base]), **item}])[0]
        if spec.channel in inline_seen:
            raise ValueError(f"channel {spec.channel!r} appears twice in the inline registers")
        inline_seen.add(spec.channel)
        if spec.channel in index:
            result[index[spec.channel]] = spec
        else:
            index[spec.channel] = len(result)
            result.append(spec)
    check_map(result)
    return result


def _fields(spec: RegisterSpec) -> dict[str, Any]:
    return {f.name: getattr(spec, f.name) for f in fields(RegisterSpec)}


__all__ = ["PROFILE_DIR", "Profile", "ProfileError", "load", "load_file", "merge", "names", "plan_args"]
