"""The configuration file (SPEC §2): YAML -> validated, immutable pydantic models, with every problem
reported as `FILE:LINE:COL: path.to.key: message` (1-based; `path` is dotted, list items by index:
`devices.cod.interval`, `alarms.2.above`; problems with the file as a whole use the path `(file)`),
on one line (control characters escaped). What makes part of a valid file do nothing (an alarm rule
or action naming a device that is not configured, a preset without a limit for the channel), and what
is valid but most likely a technician's mistake (two Modbus devices at one slave of a bus, an interval
the bus certainly cannot keep, a register number of a manual given as `address`, a serial port not on
this machine), is a warning, `FILE:LINE:COL: path: warning: message` (`Config.warnings`), not a problem.

This module holds the entry points, `load_config`, `parse_config`, `check_files`, and
the checks of the files a configuration names (`_file_problem`, `_tls_problems`); it re-exports `Problem`,
`ConfigError`, the models and the constants other modules use, so that `from agent.config import X`
is the way in (`agent.configschema.json_schema` makes the JSON Schema from these models). The
configuration layer, from the bottom up (each module imports only modules above it in this list):
- `agent.configyaml`: YAML -> plain data, with the marks of every key and value; the secret keys.
- `agent.configproblem`: `Problem`, `ConfigError`.
- `agent.configfields`: the sections' base model and field types, `_err`, how values are shown in
  messages and whether a file key's value may be.
- `agent.configsections`: station, storage, mqtt, aggregate, hj212, alarms, console (and presets).
- `agent.configdevices`: buses and devices.
- `agent.configchecks`: the checks across sections and the rules of each section, on plain data.
- `agent.configroot`: `Config`, the whole file; the warnings of a valid file (register overlaps,
  bus overruns).
- `agent.configmessages`: pydantic errors -> problems located in the file; wording; secret masking.
- `agent.config`: this module.
Imports those modules and `agent.tlsfiles`; nothing else from the project (the drivers' modules are
reached through the models: `drivers.registers`, `drivers.profiles`, `drivers.planner` and, lazily,
`drivers.serial_frames`).

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

import codecs
import dataclasses
import hmac
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from agent.configchecks import _cross_check, _missing_ports, _section_rules
from agent.configdevices import (
    CHANNEL_RE,
    DRIVERS,
    Bus,
    Device,
    RtuBus,
    SerialBus,
    SimChannel,
    TcpBus,
)
from agent.configfields import (
    _NOT_SHOWN,
    _PASTED_CONTENT,
    FilePath,
    _looks_pasted,
    _may_show_path,
    _pasted_message,
    _show,
    _text_of,
)
from agent.configmessages import _Locator, _walk_loc, _yaml_problem
from agent.configproblem import FILE_PATH, ConfigError, Problem, _dotted
from agent.configroot import Config, _bus_overruns, _register_overlaps
from agent.configsections import (
    AGGREGATE_MINUTES,
    HJ212_PW_RE,
    PRESETS,
    Action,
    Aggregate,
    Alarm,
    Broker,
    Console,
    Hj212,
    Mqtt,
    Station,
    Storage,
    Tls,
    Uplink,
    read_password_file,
)
from agent.configyaml import TOO_DEEP, YAML_LINE_BREAK, KeyPath, TooComplex, TreeBuilder
from agent.tlsfiles import CERT_WARN_DAYS, TlsFilesError, earliest_ca_expiry, not_after, tls_context

__all__ = [
    "AGGREGATE_MINUTES",
    "CHANNEL_RE",
    "DRIVERS",
    "FILE_PATH",
    "HJ212_PW_RE",
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
    "load_config",
    "parse_config",
    "read_password_file",
]


# --------------------------------------------------------------------------------------------------
# Public API


def parse_config(
    text: str,
    *,
    file: str = "<config>",
    env: Mapping[str, str] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    check_files: bool = False,
    check_tls: bool = False,
    for_status: bool = False,
) -> Config:
    """Validate configuration `text`; `file` is only used in messages, `base_dir` anchors relative
    paths (None: they stay relative). Raises ConfigError listing every problem, in file order.
    With `check_files`, the files it names (password, TLS) must exist too; with `check_tls` as well,
    the TLS files must make a client together (`_tls_problems`: only `check-config` asks). With
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
    warnings: list[Problem] = [dataclasses.replace(locator.at_mark(p, mark, m), warning=True)
                               for p, mark, m in builder.warnings]
    for path, message, where, warning in _cross_check(data):
        if path not in claimed and not stand_in_failed(path):
            (warnings if warning else problems).append(locator.problem(path, where, message, warning=warning))
    named = _named_files(data, base)
    if check_files:  # every file key that is valid itself, whatever else is wrong (also with that key)
        for key, value, written in named:
            trouble = _file_problem(key, value, written)
            if trouble is not None:
                problems.append(locator.problem(key, "value", trouble))
            elif (exposed := _exposed_secret(key, value)) is not None:
                warnings.append(locator.problem(key, "value", exposed, warning=True))
        warnings += [locator.problem(path, "value", message, warning=True)
                     for path, message in _missing_ports(data) if path not in claimed]
        tls_files = {_dotted(("mqtt", "tls", part)) for part in ("ca", "cert", "key")}
        if check_tls and not tls_files & {p.path for p in problems}:  # whatever else is wrong in the file
            for part, message, warning in _tls_problems({key[-1]: (path, written) for key, path, written in named
                                                         if key[:2] == ("mqtt", "tls")}):
                found = locator.problem(("mqtt", "tls", part), "value", message, warning=warning)
                (warnings if warning else problems).append(found)
    if config is not None and not problems:
        warnings += [locator.problem(path, "value", message, warning=True)
                     for path, message in (*_register_overlaps(config), *_bus_overruns(config))]
        if check_files and (reused := _console_password_reused(config)) is not None:
            warnings.append(locator.problem(("console", "password_file"), "value", reused, warning=True))
    warnings.sort(key=lambda p: (p.line, p.col))
    if problems:
        unique = list(dict.fromkeys(problems))
        unique.sort(key=lambda p: (p.line, p.col))
        raise ConfigError(unique, warnings)
    assert config is not None
    config._warnings = warnings
    config._env_names = tuple(dict.fromkeys(name for used in builder.substituted.values() for name in used))
    config._file = file
    config._written_files = {key: written for key, _, written in named}
    config._marks = {p: (v.line + 1, v.column + 1) for p, (_, v) in builder.marks.items()}
    return config


def load_config(
    path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    *,
    check_files: bool = False,
    check_tls: bool = False,
    for_status: bool = False,
) -> Config:
    """Load and validate the configuration file at `path` (env: default os.environ).

    Relative paths inside it are resolved against its directory. With `check_files`, the files it
    names (password_file, TLS files) must exist too (for `check-config`); `check_tls`, `for_status`:
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
        at = exc.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)  # counted after the BOM
        line = raw[:at].count(b"\n") + 1
        before = raw[raw.rfind(b"\n", 0, at) + 1 : at].decode()  # valid UTF-8: the first bad byte follows
        col = len(before.removeprefix("\ufeff") if line == 1 else before) + 1  # in characters, as YAML's marks
        raise ConfigError([Problem(file, line, col, FILE_PATH,
                                   "the file is not UTF-8 text (save it as UTF-8)")]) from None
    base_dir = Path(file).absolute().parent
    config = parse_config(text, file=file, env=env, base_dir=base_dir, check_files=check_files,
                          check_tls=check_tls, for_status=for_status)
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


def _tls_problems(files: Mapping[str, tuple[Path, str]]) -> list[tuple[str, str, bool]]:
    """(key of `mqtt.tls`, message, warning) for what keeps its files (`files`: "ca", "cert", "key" -> the
    path and the value as written; each there and readable) from making a TLS client as `run` will use
    them: PEM that parses, a key that matches its certificate and has no passphrase; and a client
    certificate or a CA that has expired (a problem) or expires within CERT_WARN_DAYS days (a warning).
    Only `check-config` asks: `run` starts anyway, buffers, and says why it cannot connect until a
    SIGHUP brings usable files."""
    if not files:
        return []
    paths = {part: str(files[part][0]) if part in files else None for part in ("ca", "cert", "key")}
    names = {part: str(path) if _may_show_path(part, written) else None for part, (path, written) in files.items()}
    try:
        tls_context(paths["ca"], paths["cert"], paths["key"], names=names)
    except TlsFilesError as exc:
        return [(exc.key, f"cannot be used for TLS: {exc.reason}", False)]
    found = []
    for part, what, when in (("cert", "the client certificate", not_after(paths["cert"]) if paths["cert"] else None),
                             ("ca", "a CA certificate", earliest_ca_expiry(paths["ca"]) if paths["ca"] else None)):
        if when is None:
            continue
        left, stamp = when - time.time(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))
        if left <= 0:  # by this machine's clock: the broker refuses it all the same
            found.append((part, f"{what} expired on {stamp}: the broker refuses it; renew it", False))
        elif left < CERT_WARN_DAYS * 86400:
            found.append((part, f"{what} expires on {stamp}, in {left / 86400:.0f} days: renew it", True))
    return found


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


_SECRET_FILE_KEYS = (("mqtt", "password_file"), ("mqtt", "tls", "key"), ("console", "password_file"))


def _exposed_secret(key: KeyPath, value: Path) -> str | None:
    """A warning when other users of the machine may read or write the secret file at `value` (a password
    file, the client key): its mode lets 'other' in (a copy made with 0644) and so do the directories
    above it (a file kept in install.sh's /etc/edge-agent, root:edge-agent 0750, cannot be reached
    whatever its own mode). Else None. Group access is fine: install.sh makes them root:edge-agent 0640."""
    if key not in _SECRET_FILE_KEYS:
        return None
    try:
        real = value.resolve()
        mode = real.stat().st_mode
        reachable = all(parent.stat().st_mode & 0o001 for parent in real.parents)
    except OSError:
        return None  # said by `_file_problem`
    if not stat.S_ISREG(mode) or not mode & 0o006 or not reachable:
        return None
    return (f"other users of this machine may read or change it (mode {stat.S_IMODE(mode):04o}); "
            f"chmod o-rwx it (install.sh makes it root:edge-agent 0640)")


def _console_password_reused(config: Config) -> str | None:
    """A warning when a console reachable from other machines has the MQTT password: its plain HTTP
    sends it at every refresh of the page (the browser's basic auth), to anyone on the network who
    listens. Else None (also when a file cannot be read: said by `_file_problem`)."""
    console = config.console
    if console is None or console.password_file is None or console.is_loopback():
        return None
    try:
        mqtt_password = config.mqtt.read_password()
        console_password = read_password_file(console.password_file)
    except (ConfigError, OSError, ValueError):
        return None
    if mqtt_password is None or not hmac.compare_digest(mqtt_password.encode(), console_password.encode()):
        return None
    return ("is the MQTT password: the console sends it unencrypted over the network at every refresh of "
            "its page; give the console a password of its own")


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
