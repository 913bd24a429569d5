"""What `edge-agent status` and the `status` command report, read from the buffer database only.

Works while `run` writes (a read-only connection to the WAL database); `agent_state` asks the
buffer's lock whether an agent runs. Imports `agent.buffer`, `agent.instance`, `agent.model`; it
takes the loaded config for device intervals.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from agent.buffer import SALVAGE_UNFINISHED, Buffer, may_access
from agent.instance import running_pid
from agent.model import STREAM_AGGREGATES, STREAM_ALARMS, STREAM_READINGS, iso_utc_ms, now_ms, parse_iso_utc_ms

STALE_AFTER_INTERVALS = 3  # a device is "stale" when nothing was stored for this many intervals
RECENT_SCAN = 50_000  # readings after the channel snapshot that status folds in


def _iso(ts_ms: int | None) -> str | None:
    return iso_utc_ms(ts_ms) if ts_ms else None


UPLINK_META_PREFIX = "uplink:"  # agent.uplink keeps each platform's progress and state under this meta key


def uplink_names(config: Any) -> list[str]:
    """`host:port` of each HJ 212 uplink of a loaded config."""
    return [f"{u.host}:{u.port}" for u in config.hj212.uplinks] if config.hj212 is not None else []


def collect(reader: Buffer | None, device_intervals: dict[str, float],
            device_channels: dict[str, list[str] | None] | None = None,
            uplinks: list[str] | None = None) -> dict[str, Any]:
    """The status document: backlog, last_seq, devices, alarms, broker, streams (SPEC §1), and each HJ 212
    uplink's state and what its platform has not acknowledged yet.
    `device_channels`: each configured device's channels when the config tells them (None: learnt
    from the wire); a channel removed from a device is not listed under it any more. `uplinks`: the
    configured uplinks (`host:port`; None: every one with stored progress). Every figure is read in one
    transaction (`Buffer.snapshot`): the recorder commits meanwhile, and a backlog counted some commits
    after the last seq was read was larger than the seqs allowed."""
    if reader is None:
        return _collect(None, device_intervals, device_channels, uplinks)
    with reader.snapshot():
        return _collect(reader, device_intervals, device_channels, uplinks)


def _collect(reader: Buffer | None, device_intervals: dict[str, float],
             device_channels: dict[str, list[str] | None] | None, uplinks: list[str] | None) -> dict[str, Any]:
    now = now_ms()
    if reader is not None and not reader.has_schema():
        reader = None  # a first start is creating the file: nothing is stored yet
    moved = reader.meta_value(SALVAGE_UNFINISHED) if reader is not None else None
    if moved is not None:  # the rows waiting are still being copied in from the file moved aside
        return unreadable(device_intervals, f"salvaging what is readable of {moved} (the corrupt buffer, moved "
                                            "aside) into a fresh one: the backlog is known once it is done")
    if reader is None:
        return {  # the keys of a status read from a buffer, so that a script can run before the first start
            "backlog": 0, "backlog_exact": True, "last_seq": 0, "sent_upto": 0, "alarms": [],
            "broker": {"state": "unknown"},
            "devices": {d: {"channels": {}, "last_reading": None, "last_valid": None, "flags": [],
                            "health": "unknown", "problem": None} for d in device_intervals},
            "streams": {}, "pending_gaps": [], "clock": None, "buffer": None, "ts": iso_utc_ms(now),
            "uplinks": {name: {"state": "unknown"} for name in uplinks or []},
        }
    last_seq, sent = reader.stream_state(STREAM_READINGS)
    channels = {(c["device"], c["channel"]): c for c in reader.channels()}
    snapshot_top = max((c["seq"] or 0 for c in channels.values()), default=0)
    for device, channel, seq, ts_ms, value, unit, flag, valid_ms in reader.latest_per_channel(
            max(snapshot_top, last_seq - RECENT_SCAN), RECENT_SCAN):
        c = channels.setdefault((device, channel), {"good": 0, "bad": 0, "last_valid_ms": None})
        c.update(seq=seq, ts_ms=ts_ms, value=value, unit=unit, flag=flag)
        if valid_ms is not None:
            c["last_valid_ms"] = valid_ms
    devices: dict[str, dict[str, Any]] = {d: {"channels": {}} for d in device_intervals}
    configured = device_channels or {}

    def listed(device: str, channel: str) -> bool:
        known = configured.get(device)
        return known is None or channel in known

    channels = {key: c for key, c in channels.items() if listed(*key)}
    for (device, channel), c in sorted(channels.items()):
        dev = devices.setdefault(device, {"channels": {}})
        dev["channels"][channel] = {
            "value": c.get("value"), "unit": c.get("unit"), "flag": c.get("flag"), "ts": _iso(c.get("ts_ms")),
            "seq": c.get("seq"), "last_valid": _iso(c.get("last_valid_ms")),
        }
    for device, dev in devices.items():
        chans = [channels[(device, ch)] for ch in dev["channels"]]
        last_ts = max((c.get("ts_ms") or 0 for c in chans), default=0)
        last_valid = max((c.get("last_valid_ms") or 0 for c in chans), default=0)
        interval = device_intervals.get(device)
        dev["last_reading"] = _iso(last_ts)
        dev["last_valid"] = _iso(last_valid)
        latest = [c for c in chans if c.get("ts_ms") == last_ts]
        flags = sorted({str(c["flag"]) for c in latest if c.get("flag")})
        dev["flags"] = flags
        if device not in device_intervals:
            dev["health"] = "removed"  # readings stored before it left the configuration
        elif not chans:
            dev["health"] = "unknown"
        elif interval is not None and now - last_ts > STALE_AFTER_INTERVALS * interval * 1000 + 5000:
            dev["health"] = "stale"
        elif all(c.get("value") is None for c in latest):
            dev["health"] = "failing"
        elif flags != ["N"]:
            dev["health"] = "degraded"
        else:
            dev["health"] = "ok"
    meta = reader.meta()
    try:
        problems = json.loads(meta.get("device_problems") or "{}")
    except ValueError:
        problems = {}
    for device, dev in devices.items():  # why its last poll failed, as the running agent noted it
        problem = problems.get(device) if isinstance(problems, dict) else None
        dev["problem"] = problem if isinstance(problem, str) and dev["health"] in ("failing", "degraded") else None
    try:
        broker = json.loads(meta.get("broker", "")) if meta.get("broker") else {"state": "unknown"}
    except ValueError:
        broker = {"state": "unknown"}
    try:
        alarms = json.loads(meta.get("active_alarms", "[]"))
    except ValueError:
        alarms = []
    try:
        clock = json.loads(meta["clock"]) if meta.get("clock") else None
    except ValueError:
        clock = None
    streams = {}
    for stream in (STREAM_READINGS, STREAM_AGGREGATES, STREAM_ALARMS):
        top, acked = reader.stream_state(stream)
        backlog, exact = reader.backlog(stream, acked)
        streams[stream] = {"last_seq": top, "sent_upto": acked, "backlog": backlog, "backlog_exact": exact}
    gaps = [{"first_seq": g.first_seq, "last_seq": g.last_seq, "reason": g.reason} for g in reader.pending_gaps()]
    return {
        "uplinks": _uplinks(reader, meta, uplinks),
        "backlog": streams[STREAM_READINGS]["backlog"],
        "backlog_exact": streams[STREAM_READINGS]["backlog_exact"],  # past a million, worked out from the seqs
        "last_seq": last_seq,
        "sent_upto": sent,
        "devices": devices,
        "alarms": alarms,
        "broker": broker,
        "streams": streams,
        "pending_gaps": gaps,
        "clock": clock,
        "buffer": {"path": str(reader.path), "used_bytes": reader.used_bytes()},
        "ts": iso_utc_ms(now),
    }


def _uplinks(reader: Buffer, meta: dict[str, str], names: list[str] | None) -> dict[str, dict[str, Any]]:
    """Each HJ 212 uplink: its state as the running agent noted it (online, offline with the error) and the
    readings and aggregates its platform has not acknowledged (a station may deliver only over HJ 212:
    MQTT's backlog says nothing of it)."""
    if names is None:
        names = sorted(k[len(UPLINK_META_PREFIX):] for k in meta if k.startswith(UPLINK_META_PREFIX))
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            stored = json.loads(meta.get(UPLINK_META_PREFIX + name) or "{}")
        except ValueError:
            stored = {}
        stored = stored if isinstance(stored, dict) else {}
        entry: dict[str, Any] = {"state": stored.get("state", "unknown"), "error": stored.get("error"),
                                 "since": stored.get("since")}
        for stream in (STREAM_READINGS, STREAM_AGGREGATES):
            mark = stored.get(stream)
            entry[f"{stream}_backlog"] = reader.backlog(stream, mark)[0] if isinstance(mark, int) else None
        out[name] = entry
    return out


def unreadable(device_intervals: dict[str, float], error: str) -> dict[str, Any]:
    """The status document when the buffer cannot be read: `buffer_error` says why, and the figures read
    from it are unknown (null), not zero: a script must not read "nothing waits" off a file it could not read."""
    status = collect(None, device_intervals)
    status.update(backlog=None, backlog_exact=None, last_seq=None, sent_upto=None, alarms=None, buffer_error=error)
    return status


def render_text(status: dict[str, Any]) -> str:
    """The human-readable form of `edge-agent status`."""
    lines = []
    agent = status.get("agent")
    if agent:
        running = {True: f"running (pid {agent.get('pid') or 'unknown'})", False: "NOT running",
                   None: "unknown (the lock file cannot be read by this user)"}
        lines.append(f"agent    {running[agent['running']]}"
                     + (f", edge-agent {agent['version']} since {agent['started']}" if agent.get("started") else ""))
        if agent.get("config_error"):
            lines.append(f"         {agent['config_error']}")
    broker = status.get("broker") or {}
    lines.append(f"broker   {broker.get('state', 'unknown')}"
                 + (f" {broker['url']}" if broker.get("url") else "")
                 + (f" since {broker['since']}" if broker.get("since") else "")
                 + (f" — {broker['error']}" if broker.get("error") else ""))
    if "cert_expires" in broker:  # a client certificate is configured
        lines.append(f"         client certificate {_expiry(broker['cert_expires'])}")
    if status["backlog"] is None:  # the buffer could not be read (`buffer_error`)
        lines.append(f"backlog  unknown: {status.get('buffer_error')}")
    else:
        about = "" if status.get("backlog_exact", True) else "about "  # past a million, worked out from the seqs
        lines.append(f"backlog  {about}{status['backlog']} unsent readings (last seq {status['last_seq']})")
    for name, u in (status.get("uplinks") or {}).items():
        waiting = [f"{u[f'{stream}_backlog']} {stream}" for stream in (STREAM_READINGS, STREAM_AGGREGATES)
                   if u.get(f"{stream}_backlog") is not None]
        lines.append(f"uplink   {name} {u.get('state', 'unknown')}"
                     + (f" since {u['since']}" if u.get("since") else "")
                     + (f" — {u['error']}" if u.get("error") else "")
                     + (f"; not yet acknowledged: {', '.join(waiting)}" if waiting else ""))
    clock = status.get("clock")
    if clock:
        sync = {True: "synchronised", False: "NOT synchronised (no NTP yet)", None: "sync state unknown"}
        lines.append(f"clock    {sync[clock.get('synchronized')]}"
                     + (f", last step {clock['last_step_s']:+.1f} s" if clock.get("last_step_s") else ""))
    for name, s in (status.get("streams") or {}).items():
        if name != STREAM_READINGS and (s["last_seq"] or s["backlog"]):
            lines.append(f"         {name}: {s['backlog']} unsent (last seq {s['last_seq']})")
    if status.get("pending_gaps"):
        for g in status["pending_gaps"]:
            lines.append(f"gap      seq {g['first_seq']}..{g['last_seq']} dropped ({g['reason']}), not yet announced")
    buf = status.get("buffer")
    if buf:
        lines.append(f"buffer   {buf['path']} ({buf['used_bytes'] / 1048576:.1f} MB in use)")
    lines.append("devices")
    for device, dev in status["devices"].items():
        lines.append(f"  {device:<16} {dev.get('health', 'unknown'):<9} last {dev.get('last_reading') or '-'}"
                     f"  last valid {dev.get('last_valid') or '-'}")
        if dev.get("problem"):
            lines.append(f"    why: {dev['problem']}")
        for channel, c in dev["channels"].items():
            value = format_value(c["value"])
            lines.append(f"    {channel:<14} {value:>12} {c['unit'] or '':<8} {c['flag'] or '':<2} {c['ts'] or ''}")
    alarms = status.get("alarms") or []
    lines.append(f"alarms   {len(alarms)} active" if status.get("alarms") is not None else "alarms   unknown")
    for a in alarms:
        lines.append(f"  {a.get('id')} since {a.get('since')} value {a.get('value')}")
    return "\n".join(lines)


def _expiry(when: object) -> str:
    """`expires 2027-03-01T00:00:00.000Z (in 90 days)`, `EXPIRED at …`, or why it is not known."""
    try:
        left = (parse_iso_utc_ms(str(when)) - now_ms()) / 1000
    except ValueError:
        return "expiry unknown (the file cannot be read or parsed)"
    if left <= 0:
        return f"EXPIRED at {when}: the broker refuses it; renew it"
    days = left / 86400
    soon = " — renew it" if days < 30 else ""
    within = f"{days:.0f} days" if days >= 2 else f"{left / 3600:.0f} h"
    return f"expires {when} (in {within}{soon})"


def format_value(value: float | None) -> str:
    """A stored value as the technician compares it with the instrument's display: every digit a
    double holds (15 significant), whole numbers without a decimal point or exponent."""
    if value is None:
        return "null"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return f"{value:.15g}"


def agent_state(buffer_path: Path, recorded: str | None = None) -> dict[str, Any]:
    """Whether an agent runs with this buffer (its lock, `agent.instance`): `running` true/false, or
    null when this user may not read the lock file; `pid` when known. `recorded`: the buffer's meta
    `agent` (`Station.agent_record`: version, start time, a refused reload), added when the agent that
    wrote it is the one running."""
    try:
        pid = running_pid(buffer_path)
    except PermissionError:
        return {"running": None, "pid": None}
    state: dict[str, Any] = {"running": pid is not None, "pid": pid or None}
    try:
        noted = json.loads(recorded) if recorded else None
    except ValueError:
        noted = None
    if pid and isinstance(noted, dict) and noted.get("pid") == pid:
        state.update(noted)
    return state


DAMAGED_HINT = "run moves a damaged file aside when it starts, or once its own reads or writes meet the damage"


def unreadable_buffer(path: Path, error: Exception, config_file: str) -> tuple[str, str]:
    """(what, hint) for a buffer database `status` could not open or read: permission denied, with
    the command to run as the agent's user, when this user lacks an access reading it takes
    (`reader_access_denied`; the error SQLite gives then is "unable to open database file"); a lock
    another process held for all of the busy timeout (10 s); else the error, and that `run` moves a
    damaged file aside."""
    if reader_access_denied(path):
        return (f"cannot read the buffer {path}: permission denied",
                f"run status as the agent's user: sudo -u edge-agent edge-agent status -c {config_file}")
    if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):  # for all of busy_timeout
        return (f"cannot read the buffer {path}: {error}",
                "another process holds it locked (a sqlite3 shell, a backup): try again once it is done")
    return f"cannot read the buffer {path}: {error}", DAMAGED_HINT


def unopened_buffer(path: Path) -> tuple[str, str]:
    """(what, hint) when an agent runs but no buffer with its tables is at `path`: it has not opened its
    buffer yet (it cannot create it: a full disk, permissions; or it is putting back a file that was moved
    away), and its readings wait in its memory: nothing is known of a backlog, which is not 0."""
    return (f"the running agent has no buffer at {path} yet: its readings wait in its memory",
            "it cannot create the file, a full disk or permissions: see its log; or it is putting back one moved away")


def missing_buffer(path: Path, issued: int | None, reserved: int, acked: int) -> tuple[str, str]:
    """(what, hint) when no agent runs and no buffer with its tables is at `path` although its seq mark
    says seqs were issued there: the file was deleted or lost (emptied), not yet created. `issued`: the
    readings' last seq at the last clean close (None after a crash: up to `reserved` may have been),
    `acked`: the acknowledged watermark noted beside it."""
    upto = f"seqs up to {issued} were issued here" if issued is not None else \
        f"seqs up to {reserved} may have been issued here"
    return (f"the buffer {path} is missing (deleted, lost with its card, or left behind at another storage.path): "
            f"{upto}, readings acknowledged up to seq {acked}; the unacknowledged ones went with it",
            "the next start numbers on above them and announces the lost ones as a buffer_missing gap")


def reader_access_denied(path: Path) -> bool:
    """Whether this user lacks an access that reading the WAL database at `path` takes (os.access):
    search on its directory; read on the file, and on its -wal and -shm files where they are; write
    on the directory where a -wal is but not its -shm (the reader creates it; with no -wal the file is
    read as immutable, `Buffer.open_reader`)."""
    directory = path.parent
    if not may_access(directory, os.X_OK):
        return True
    shm = path.with_name(path.name + "-shm")
    wal = path.with_name(path.name + "-wal")
    needed = [(path, os.R_OK)] + [(f, os.R_OK) for f in (wal, shm) if os.path.lexists(f)]
    if os.path.lexists(wal) and not os.path.lexists(shm):
        needed.append((directory, os.W_OK))
    return not all(may_access(f, mode) for f, mode in needed)
