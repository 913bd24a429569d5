"""The building blocks of the configuration's section models (`agent.configsections`,
`agent.configdevices`, `agent.configroot`): `_Model`, the base of every section (unknown keys are
errors, yes/no is no number and nothing else is true/false, numbers are finite); the field types
`Text`, `NonEmptyText`, `HostName` and `FilePath` (relative to the config file's directory); `_err`, the
validation error with a technician-readable message; `_Broken` and `_raise_first`, for the rules that
combine keys of one section; how a value is shown in a message (`_show`, `_text_of`, `_suggest`,
`_known`); and whether a message may show a file key's value (`_may_show_path`: never a file's
content pasted there, nor what may be a secret typed where its file's path belongs).

Imports `agent.configyaml` (`SECRET_FILE_KEYS`) only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from agent.configyaml import SECRET_FILE_KEYS

# The longest answer timeout a bus or an uplink may have: no instrument or platform answers after an
# hour, and a slip like `timeout: 1e26` passed check-config, then failed every poll (OverflowError).
MAX_TIMEOUT_S = 3600
# The longest poll period a device may have: a day (a daily lab entry, a slow counter); `interval: 1e26`
# passed check-config and the device was then never polled, not even a null/B reading saying so.
MAX_INTERVAL_S = 86400

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


def _quoted_choice(value: Any) -> Any:
    """`qos: "1"`: a quoted whole number where one of a few numbers is expected, as any other number
    key takes one (pydantic does not read text for a Literal)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
        return int(value)
    return value


_QUOTED_CHOICE = BeforeValidator(_quoted_choice)


# `json_schema_input_type`: what the JSON Schema (for editors) accepts, here what the validator takes.
Text = Annotated[str, BeforeValidator(_as_text, json_schema_input_type=str | int | float)]


def _non_empty_text(value: str) -> str:
    if not value.strip():
        raise _err("must not be empty")
    return value


NonEmptyText = Annotated[Text, AfterValidator(_non_empty_text)]

_HOST_NAME = re.compile(r"[\w-]+(\.[\w-]+)*\.?\Z")  # labels of letters (IDN too), digits, '_' and '-'
HOST_NAME_RULE = "letters, digits, '-', '_' and '.'; an IPv6 address in [ ]"


def is_host(text: str) -> bool:
    """Whether `text` can name a host to connect to: a host name or an IP address (IPv6 in brackets or not)."""
    try:
        ipaddress.ip_address(text[1:-1] if text.startswith("[") and text.endswith("]") else text)
        return True
    except ValueError:
        return _HOST_NAME.match(text) is not None


def _check_host(value: str) -> str:
    """`host:` of a Modbus TCP bus or an HJ 212 uplink: a host name or IP address (IPv6 with or without
    brackets, taken without), without scheme or port (what a technician pastes from a browser or a manual
    is refused, said how to write it)."""
    host = value.strip()
    if not host:
        raise _err("must not be empty")
    if "://" in host:
        raise _err("a host name or IP address, not a URL (e.g. host: 192.168.1.50; the port goes in port:)")
    if "@" in host:  # never shown: what comes before it may be a password
        raise _err("a host name or IP address only: no user or password (e.g. host: 192.168.1.50)")
    if not is_host(host):
        name, _, port = host.rpartition(":")
        if port.isdigit() and is_host(name):
            raise _err("give the port in port:, not in host (e.g. host: 192.168.1.50, port: 502)")
        raise _err(f"{host!r} is not a host name or IP address ({HOST_NAME_RULE})")
    # an IPv6 address written as URLs have it, "[fe80::1]": a socket takes it without the brackets
    return host[1:-1] if host.startswith("[") else host


HostName = Annotated[Text, AfterValidator(_check_host)]


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
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # quoted, or from a ${NAME}
            return _Refused(f"the text {_show(value)}: write true or false without quotes or ${{NAME}}")
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
