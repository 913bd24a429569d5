"""The local alarm engine (SPEC §2 "alarms", §4 alarm events): turns committed readings into
`raised`/`cleared` events in the buffer's alarms stream, keeps the active set in the meta table (for
`status` and for restarts) and drives alarm actions (a coil or register written on raise, back on clear).

Runs on the recorder thread: `observe` gets each committed batch, `tick` runs about once a second;
both are O(readings) / O(rules) and never do I/O (action writes run on a worker thread). This module
holds the engine, `AlarmEngine` (rules and alarms from the configuration, evaluation, events, the saved
state, when actions are written), how its events and state write numbers (`_json_number`,
`_as_published`) and the state's format (STATE_VERSION); it re-exports the names other modules import
from it, so that `from agent.alarms import X` is the way in. Its parts, from the bottom up (each module
imports only modules above it in this list):
- `agent.alarmpresets`: the presets (`load_presets`, `resolve_preset`; the limits of `preset:` come
  from `agent/data/presets.yaml`), a limit in the channel's unit.
- `agent.alarmwindow`: `_Window`, the rolling mean of `window: S`.
- `agent.alarmactions`: `ActionWriter`, `_Target` (a coil or register that actions write) and
  `_ActionWorker` (the thread of the writes).
- `agent.alarmrules`: `_Rule`, `_Channel`, `_Instance` and the arithmetic of an evaluation (which
  values count, when a delay is up, the hysteresis band).
- `agent.alarms`: this module.
Imports those modules, `agent.config`, `agent.model` and `agent.logutil`; nothing else from the project.

Decisions (the README's alarm section repeats them for technicians):

- Alarm ids are `<device.channel>:<rule>` with rule above, below, stale or fault; a preset rule has
  rule `above` and the id `<device.channel>:<preset name>` (`nh3n.w21003:gb18918-1a`), so that a
  preset and an explicit `above:` on the same channel are two alarms.
- When several rules give the same id for a channel, the most specific pattern wins (`dev.ch`, then
  `dev.*`, then `*`); among equals the first in the file wins (the others are logged at start).
- Only values flagged N or T are compared with limits and enter windows; null values and values
  flagged M, C, F, S, D or B are treated like null: they neither advance nor reset a delay.
- `delay`/`clear_delay` run on the monotonic clock from the first value beyond (back within) the
  limit; the raise (clear) happens on the first such value once the delay has passed. Each value counts
  from when it was taken (the engine's clock less the reading's age, at most READING_AGE_MAX_S), not
  from when its batch was committed, and a delay is up POLL_JITTER_S early (a poll may start a few
  milliseconds after its turn): a delay of two poll intervals raises on the third value, always.
  The readings polled while the buffer opened at a start, stored minutes later, have their age
  reckoned from the clocks read as their poll was handed over (`held_poll_times`).
- `window: S` compares the mean of the readings of the last S seconds (reading timestamps, kept in
  WINDOW_BUCKETS buckets of S/120) and is evaluated only once the readings cover MIN_WINDOW_COVERAGE
  of the window (span of the readings plus one poll interval, at most one interval per reading), so a
  restart does not alarm on a "15-minute mean" of one value, nor a dropout (failed polls: null values,
  which never enter the window) on one of 5 minutes of values and 10 minutes of gap. Windows are saved
  with the alarm state and restored on start. A reading more than S older than the newest one (the
  clock stepped back) restarts the window.
- `background: dev.ch` is subtracted: its window mean (same S, the readings of the S seconds before the
  site's reading, covering MIN_WINDOW_COVERAGE of them as the site's must) or, without a window, its last
  value while it is at most BACKGROUND_HOLD_INTERVALS of its device's intervals from the site's reading,
  both timed on this machine's clock (an `hj212` background's stamps are its analyzer's clock's).
  With no such background (its instrument dead, or not read yet) the site's value is not compared, like
  a null one: a background read hours ago is no background (a low one raised alarms when dust blew over
  the whole area, a high one hid real exceedances).
- The GB 18918 "<= 12 degC" NH3-N limit applies while the station's water temperature channel (the
  code the preset names, w01010; the same device's first, else the most recent of any device) reads
  <= 12; with no temperature reading the normal (stricter) limit applies. A batch's temperatures are
  taken before any of its values is compared (channel order in a poll does not matter), and the
  last ones are kept in the saved state with their time (a restart does not fall back to the stricter
  limit). A temperature counts for TEMPERATURE_HOLD_S after it was taken (two intervals of its device
  when longer), then the normal limit applies as with none: a thermometer that died in winter kept the
  cold limit into the summer.
  A cleared event carries the limit in force when it clears (a temperature or a reload may have
  moved it since the raise: the event then says why the value now counts as within the limit).
- `stale: S` raises in `tick` when a channel had no valid reading (a value flagged N or T, as for
  limits and the aggregates; a value flagged M, C, D, F or S is none) for S seconds of agent time
  (from start, or from the reload that added its device or register, for a channel not yet seen) and
  clears on its next valid reading; none is raised once a stop has stopped the pollers (`polling_stopped`:
  the backlog drain after SIGTERM is no instrument's silence). `fault: S` raises when a channel's
  readings have been flagged B or D for S seconds and clears after `clear_delay` of readings with other
  flags. Their `value` is the number of seconds the condition has lasted (0 when cleared) and their
  `threshold` is S.
- State across restarts: the active alarms (with action states and temperatures) are saved in meta
  `alarm_state` in the same transaction as each event; a restored alarm is not raised again and clears
  normally. That state is also kept beside the buffer file (`buffer.db.alarm_state`, after each
  event's commit), for a fresh file to start from when the old one was lost (deleted, or corrupt
  beyond salvage). The windows, up to ~120 buckets each, are saved apart in meta `alarm_windows`, at
  most once a minute and at a stop (with the state: its temperatures), never with an event: an event
  writes a few hundred bytes, not every window (~0.8 MB for 200 full windows). A state saved before
  that split holds its windows and is read as it is. A pending delay is not saved (it restarts). An
  active alarm whose rule, device or channel is gone from the config (after a restart or a reload)
  is cleared with value null.
- Readings of a channel the configuration does not have are ignored: those of a poll under way when a
  reload removed its device or register reach the engine after the reload (the `*` stale rule then
  watched the channel again, from the agent's start, and raised its stale alarm at once for good).
- A rule whose channel names a device that is not configured is not applied, and an action on such a
  device is skipped (both logged once at start and reload; `check-config` warns about them), so a
  shared list of rules can name instruments a station does not have.
- Actions: the desired state of a target (device, coil/register, address) is "on" while any alarm of
  a rule naming it is active. Writes run on a worker thread through `action_writer`; a failed write is
  retried after 2 s, doubling up to 60 s; "off" waits until the target has been on for `min_on`
  seconds (the time "on" was confirmed is saved, so this holds across a restart). At start, a target
  whose alarm is active is written "on" again; one saved as "on" whose alarm is gone is written "off"
  (also when its last write failed: its state is unknown). A reload or restart that changes a written
  target's `on`/`off` values writes its state again with them. An output whose device a reload or
  restart removed from the configuration (or made other than Modbus) is not written while it is so
  (logged at each reload and start): no bus reaches it, and its off-write was retried every minute for
  good; it is kept (in the saved state too), and switched off once the device is configured again.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent.alarmactions import ACTION_RETRY_FIRST_S, ACTION_RETRY_MAX_S, ActionWriter, _ActionWorker, _Target
from agent.alarmpresets import ColdLimit, Preset, PresetLimit, _limit_for, _unit_factor, load_presets, resolve_preset
from agent.alarmrules import (
    FAULT_FLAGS,
    RULE_ABOVE,
    RULE_BELOW,
    RULE_FAULT,
    RULE_STALE,
    _band_edge,
    _Channel,
    _Instance,
    _lasted,
    _measured,
    _Rule,
    _taken_at,
)
from agent.alarmwindow import MIN_WINDOW_COVERAGE, _Window, covered
from agent.config import Alarm, Config
from agent.logutil import RateLimitedLog
from agent.model import STREAM_ALARMS, Reading, iso_utc_ms, now_ms

__all__ = [
    "ACTION_RETRY_FIRST_S",
    "ACTION_RETRY_MAX_S",
    "MIN_WINDOW_COVERAGE",
    "AlarmEngine",
    "ActionWriter",
    "ColdLimit",
    "Preset",
    "PresetLimit",
    "load_presets",
    "resolve_preset",
]

log = logging.getLogger(__name__)

STATE_VERSION = 1
# The JSON type of each field of a saved state (`AlarmEngine._parse_state`).
_STATE_FIELDS: dict[str, type] = {"active": list, "actions": dict, "temperatures": dict, "windows": dict}
WINDOW_SAVE_EVERY_S = 60.0  # windows are saved with the alarm state at most this often
TEMPERATURE_HOLD_S = 3600.0  # a water temperature sets a preset's cold limit this long after it was taken
BACKGROUND_HOLD_INTERVALS = 2  # a background value (no window) is subtracted this many device intervals at most
BACKGROUND_UNKNOWN_INTERVAL_S = 60.0  # device interval assumed for a background device not configured


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _json_number(x: float | None) -> float | int | None:
    """A limit as written in the config: 50 rather than 50.0."""
    if x is None or not math.isfinite(x):
        return None
    x = round(float(x), 9)  # an int too: a threshold rebuilt from stored events (salvage) may be one
    return int(x) if x.is_integer() else x


def _as_published(x: float | None) -> float | None:
    """A value as the readings are published (15 significant digits: SQLite's JSON), so that an alarm
    event says 12.475 where `raw x scale` holds 12.475000000000001 and the reading itself says 12.475."""
    if x is None or not math.isfinite(x):
        return None
    rounded = float(f"{x:.15g}")
    return rounded if math.isfinite(rounded) else x  # the double max rounds up to inf: JSON cannot say it


class AlarmEngine:
    """Evaluates the config's alarm rules on committed readings (see the module docstring).

    `recorder` needs `submit_event(stream, ts_ms, body)` and `set_meta(key, value, keep_beside=...)`;
    `saved_state` is the meta value `alarm_state` of the previous run (None on a fresh buffer), or the
    copy kept beside a buffer file since lost (`resave`: it is saved into the new file at once);
    `saved_windows` is the meta value `alarm_windows` (None: the windows saved in `saved_state`, as
    before the two were split, if any). `action_writer` runs
    action writes (None: actions are logged as not executed). `clock` (monotonic seconds) and
    `wall_ms` (Unix ms) are injectable for tests; `inline_actions` runs writes synchronously inside
    `tick` instead of on the worker thread (tests).
    """

    def __init__(
        self,
        config: Config,
        recorder: Any,
        saved_state: str | None,
        action_writer: ActionWriter | None = None,
        *,
        saved_windows: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = now_ms,
        inline_actions: bool = False,
        resave: bool = False,
    ):
        self.recorder = recorder
        self.action_writer = action_writer
        self.clock = clock
        self.wall_ms = wall_ms
        self.inline_actions = inline_actions
        self._started = clock()
        self._lock = threading.Lock()
        self._pending_config: Config | None = None
        self._channels: dict[str, _Channel] = {}
        self._instances: dict[str, _Instance] = {}
        self._stale: list[_Instance] = []
        self._targets: dict[str, _Target] = {}
        self._temps: dict[str, tuple[float, float]] = {}  # device -> (temperature, monotonic time taken)
        self._cold_codes: frozenset[str] = frozenset()
        self._backgrounds: frozenset[str] = frozenset()
        self._warned: set[str] = set()
        self._windows_dirty = False
        self._windows_saved = self._started
        self._save_requested = False
        self._polling_stopped = False
        self._held_polls: Mapping[tuple[str, int], tuple[float, int]] = {}
        self._errlog = RateLimitedLog(log, every_s=300)
        self._worker: _ActionWorker | None = None
        state = self._parse_state(saved_state)
        windows = self._parse_state(saved_windows, "windows").get("windows") if saved_windows else state.get("windows")
        self._saved_windows: dict[tuple[str, float], Any] = {}
        for key, per_channel in (windows if isinstance(windows, dict) else {}).items():
            if isinstance(per_channel, dict):
                for seconds, data in per_channel.items():
                    try:
                        self._saved_windows[(str(key), float(seconds))] = data
                    except ValueError:
                        continue
        started_ms = wall_ms()
        for device, saved_temp in (state.get("temperatures") or {}).items():
            # [value, Unix ms taken]; a bare value (saved before the time was) counts as taken at this start
            value, taken_ms = saved_temp if isinstance(saved_temp, list) and len(saved_temp) == 2 else (saved_temp,
                                                                                                       started_ms)
            if (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
                    and isinstance(taken_ms, int) and not isinstance(taken_ms, bool)):
                age = max((started_ms - taken_ms) / 1000, 0.0)
                self._temps[str(device)] = (float(value), self._started - age)
        self._apply_config(config, state, restoring=True)
        if (saved_state is not None and not state) or resave:
            self._save()  # replace the unreadable state, or fill a fresh file (and the active list `status` shows)
        log.info("alarm engine: %d rules, %d alarms on %d channels, %d active", len(self._rules),
                 len(self._instances), len(self._channels), sum(i.active for i in self._instances.values()))

    # ------------------------------------------------------------------ any thread

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config (SIGHUP); applied on the recorder thread at the next tick. Alarms
        whose id still exists keep their state; those whose rule, device or channel is gone are cleared."""
        with self._lock:
            self._pending_config = config

    def active_ids(self) -> list[str]:
        """The ids of the active alarms, sorted (any thread: a copy of the instances is taken first)."""
        return sorted(i.id for i in list(self._instances.values()) if i.active)

    def active(self) -> list[dict[str, Any]]:
        """The active alarms as `status` lists them (id, channel, rule, since, value, threshold)."""
        return [
            {"id": i.id, "channel": i.channel.key, "rule": i.rule_name,
             "since": iso_utc_ms(i.since_ms) if i.since_ms is not None else None,
             "value": i.value, "threshold": _json_number(i.threshold)}
            for i in sorted((i for i in self._instances.values() if i.active), key=lambda i: (i.since_ms or 0, i.id))
        ]

    def limits(self, channel: str) -> list[dict[str, Any]]:
        """Any thread: the limits of the above/below alarms of `channel` ("device.channel") in force now,
        as the console draws them: the rule that applies to each alarm (the most specific), a preset's
        limit in the channel's unit and with the water temperature's variant."""
        ch = self._channels.get(channel)
        if ch is None:
            return []
        out = []
        for inst in list(ch.instances):
            if inst.rule_name not in (RULE_ABOVE, RULE_BELOW):
                continue
            if inst.limit is None:
                limit = inst.rule.alarm.above if inst.rule_name == RULE_ABOVE else inst.rule.alarm.below
            else:
                temperature = self._temperature(ch.device) if inst.limit.cold is not None else None
                limit = _limit_for(inst.limit, temperature) * (_unit_factor(inst.limit.unit, ch.unit) or 1.0)
            out.append({"rule": inst.rule_name, "value": _json_number(limit)})
        return out

    def finish_actions(self, timeout: float) -> None:
        """Any thread, at a stop: wait up to `timeout` for the action writes under way (an alarm that
        the last readings cleared switches its output off before the buses close)."""
        if self._worker is not None:
            self._worker.wait_idle(timeout)

    def close(self) -> None:
        """Stop the action worker (pending writes are dropped; they are retried at the next start)."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    # ------------------------------------------------------------------ recorder thread

    def observe(self, readings: Iterable[Reading]) -> None:
        """A committed batch of readings (recorder thread)."""
        self._take_config()
        if not self._rules:
            return  # nothing to evaluate (a rule added by a reload starts from the reload)
        now = self.clock()
        wall = self.wall_ms()
        if self._cold_codes:
            readings = list(readings)
            for r in readings:
                if r.channel in self._cold_codes and _measured(r):
                    assert r.value is not None
                    self._temps[r.device] = (r.value, self._taken(r, now, wall))
        for r in readings:
            key = f"{r.device}.{r.channel}"
            ch = self._channels.get(key)
            if ch is None:
                if not self._configured(key):
                    continue  # polled before a reload removed its device or register (the poll was under way)
                ch = self._channel(key)
            try:
                self._observe_one(ch, r, self._taken(r, now, wall))
            except Exception:  # noqa: BLE001 - a bug met by one reading must not skip the rest of the batch
                self._errlog.error("alarm evaluation failed on a reading of %s (%s, flag %s); the other readings "
                                   "are evaluated", key, r.value, r.flag, key=key, exc_info=True)

    def _taken(self, r: Reading, now: float, wall: int) -> float:
        """When `r` was taken on the monotonic clock (`_taken_at`): from the clocks read as its poll was
        handed over when it waited for the buffer to open, else from the clocks read now."""
        polled = self._held_polls.get((r.device, r.ts_ms)) if self._held_polls else None
        return _taken_at(*polled, r.ts_ms) if polled is not None else _taken_at(now, wall, r.ts_ms)

    def tick(self) -> None:
        """About once a second (recorder thread): stale rules, action writes, saving windows."""
        self._take_config()
        now = self.clock()
        for inst in () if self._polling_stopped else self._stale:
            if inst.active:
                continue
            limit = inst.rule.alarm.stale
            assert limit is not None
            age = now - inst.channel.last_valid_mono
            if age >= limit:
                self._raise(inst, round(age, 1), limit, self.wall_ms())
        self._run_actions(now)
        if self._save_requested or (self._windows_dirty and now - self._windows_saved >= WINDOW_SAVE_EVERY_S):
            self._save_requested = False
            self._windows_saved = now
            self._windows_dirty = False
            self.recorder.set_meta("alarm_state", _dumps(self._state()))  # the temperatures, with the windows
            self.recorder.set_meta("alarm_windows", self._windows_json())

    def held_poll_times(self, polls: Mapping[tuple[str, int], tuple[float, int]]) -> None:
        """Any thread, at the start: when the polls whose readings waited in memory while the buffer opened
        were taken, (device, ts_ms) -> (monotonic s, Unix ms) as the pollers handed them over; {} once they
        are stored. Their delays count from then: taken as at most READING_AGE_MAX_S old when stored, after
        a long opening (the start after a power cut), an exceedance of that time was squeezed into one
        instant, and never lasted a rule's `delay`."""
        self._held_polls = polls

    def polling_stopped(self) -> None:
        """Any thread, at a stop, as the pollers are stopped: no reading comes any more, so the stale rules
        stop counting (the agent's own stop, whose backlog drain lasts up to `shutdown_grace`, is no
        instrument's silence: it raised every channel stale, cleared by the first poll after the restart)."""
        self._polling_stopped = True

    def save_at_next_tick(self) -> None:
        """Any thread: save the state (windows included) at the next tick, so that the recorder's last
        commit holds the windows as they stand at a stop (a restart then misses no stored reading)."""
        self._save_requested = True

    # ------------------------------------------------------------------ configuration

    def _take_config(self) -> None:
        if self._pending_config is None:
            return
        with self._lock:
            config, self._pending_config = self._pending_config, None
        if config is not None:
            if config.alarms != self.config.alarms:
                log.info("alarm rules reloaded (%d rules)", len(config.alarms))
            self._apply_config(config, self._state(), restoring=False)

    def _apply_config(self, config: Config, state: Mapping[str, Any], *, restoring: bool) -> None:
        """(Re)build rules and instances from `config`; restore active alarms and action states from
        `state`; clear (value null) saved active alarms that no rule produces any more."""
        self.config = config
        self._intervals = {dev_id: dev.interval for dev_id, dev in config.devices.items()}
        presets = load_presets()
        targets: dict[str, _Target] = {}
        self._rules: list[_Rule] = []
        pattern_kinds: dict[tuple[str, str], int] = {}
        for index, alarm in enumerate(config.alarms):
            device = alarm.channel.split(".", 1)[0]
            if alarm.channel != "*" and device not in config.devices:
                self._warn_once(f"nodev:{index}:{device}", "alarms.%d: no device %s is configured: rule not applied",
                                index, device)
                continue
            preset = presets.get(alarm.preset) if alarm.preset else None
            kinds: list[tuple[str, str]] = []
            if alarm.above is not None:
                kinds.append((RULE_ABOVE, RULE_ABOVE))
            if alarm.below is not None:
                kinds.append((RULE_BELOW, RULE_BELOW))
            if preset is not None:
                kinds.append((RULE_ABOVE, preset.name))
            if alarm.stale is not None:
                kinds.append((RULE_STALE, RULE_STALE))
            if alarm.fault is not None:
                kinds.append((RULE_FAULT, RULE_FAULT))
            for _, suffix in kinds:
                first = pattern_kinds.setdefault((alarm.channel, suffix), index)
                if first != index:
                    self._warn_once(f"dup:{index}:{suffix}", "alarms.%d: same channel and rule (%s %s) as "
                                    "alarms.%d, which takes precedence: ignored", index, alarm.channel, suffix, first)
            pattern = alarm.channel
            specificity = 0 if pattern == "*" else 1 if pattern.endswith(".*") else 2
            window = preset.window if preset is not None else alarm.window
            self._rules.append(_Rule(index, alarm, specificity, kinds, preset, window,
                                     self._target(alarm, index, targets)))
        self._cold_codes = frozenset(lim.cold.channel for r in self._rules if r.preset
                                     for lim in r.preset.limits.values() if lim.cold)
        self._backgrounds = frozenset(r.alarm.background for r in self._rules if r.alarm.background)

        saved_targets: dict[str, Any] = state.get("actions") or {}
        if not isinstance(saved_targets, dict):
            saved_targets = {}
        if self.action_writer is not None:
            known = dict(self._targets) if not restoring else {
                key: t for key, data in saved_targets.items()
                if isinstance(data, dict) and (t := _Target.from_json(key, data, self.clock(), self.wall_ms()))
                is not None}
            for key, prev in known.items():
                target = targets.get(key)
                if target is not None:  # keep what is known of the device
                    target.written, target.touched, target.on_since = prev.written, prev.touched, prev.on_since
                    target.inflight, target.retry_at, target.failures = prev.inflight, prev.retry_at, prev.failures
                    if (prev.on_value, prev.off_value) != (target.on_value, target.off_value) and target.touched:
                        # The device holds (or is being written) the old value: write the state with the new
                        # one, after the write under way (the result of which then changes nothing).
                        target.written = target.inflight = None
                elif prev.written is not False and prev.touched:
                    # No rule names it any more, and it may be on: switch it off (min_on respected).
                    prev.orphan = True
                    prev.active_ids.clear()
                    targets[key] = prev
        self._targets = targets
        for target in targets.values():
            if not self._writable(target.device):
                log.warning("alarm action output %s %s %d: device %s is no longer configured (as a Modbus device): "
                            "it is not written (switched off) while it is not, and may have been left on",
                            target.device, target.kind, target.address, target.device)

        # Rebind every channel known (config, saved state, seen so far) that is still configured: the
        # alarms of a removed device or channel are cleared below, and no stale rule watches it.
        self._known = {dev_id: dev.known_channels() for dev_id, dev in config.devices.items()}
        configured = self._configured
        self._channels = {key: ch for key, ch in self._channels.items() if configured(key)}
        existing = set(self._channels)
        ignored = {key for key, ch in self._channels.items() if ch.passive and not ch.instances and not ch.windows}
        old_instances = self._instances
        self._instances = {}
        self._stale = []
        for ch in self._channels.values():
            ch.instances = []
        keys: list[str] = []
        for dev_id, dev in config.devices.items():
            keys += [f"{dev_id}.{code}" for code in dev.known_channels() or ()]
        for rule in self._rules:
            for ref in (rule.alarm.channel, rule.alarm.background):
                if ref and not ref.endswith("*"):
                    keys.append(ref)
        saved_active = [a for a in state.get("active") or () if isinstance(a, dict) and isinstance(a.get("id"), str)
                        and isinstance(a.get("channel"), str) and "." in a["channel"]]
        keys += [a["channel"] for a in saved_active if configured(a["channel"])]
        keys += list(self._channels)
        for ch in self._channels.values():
            ch.passive = self._is_passive(ch)
        for key in dict.fromkeys(keys):
            ch = self._channels.get(key) or self._new_channel(key)
            self._bind(ch)
        reloaded = self.clock()
        for key in ignored:
            ch = self._channels[key]
            if ch.instances or ch.windows or not ch.passive:
                # Its readings were skipped until now: what a new rule knows of it starts here.
                ch.last_valid_mono, ch.fault_since = reloaded, None
                ch.last_value = ch.last_value_ms = ch.last_value_mono = None
        if not restoring:
            for key in self._channels.keys() - existing:
                # New to the config (a device or register added): not polled yet, it goes stale from now.
                self._channels[key].last_valid_mono = reloaded

        # Carry over live state (reload) or restore saved state (start).
        for inst in self._instances.values():
            old = old_instances.get(inst.id)
            if old is not None and old.active:
                inst.active, inst.since_ms, inst.value, inst.threshold = True, old.since_ms, old.value, old.threshold
                if old.rule.alarm == inst.rule.alarm:
                    inst.clearing = old.clearing
            elif old is not None and old.rule.alarm == inst.rule.alarm:
                inst.pending = old.pending
        orphans: list[dict[str, Any]] = []
        if restoring:
            for a in saved_active:
                restored_inst = self._instances.get(a["id"])
                if restored_inst is None:
                    orphans.append(a)
                    continue
                restored_inst.active = True
                restored_inst.since_ms = a.get("since_ms") if isinstance(a.get("since_ms"), int) else None
                restored_inst.value = a.get("value")
                restored_inst.threshold = a.get("threshold")
        else:
            orphans = [{"id": i.id, "channel": i.channel.key, "rule": i.rule_name, "threshold": i.threshold}
                       for i in old_instances.values() if i.active and i.id not in self._instances]
        for inst in self._instances.values():
            if inst.active and inst.rule.target is not None:
                inst.rule.target.active_ids.add(inst.id)
        if restoring:
            for target in self._targets.values():
                if target.desired:
                    target.written = None  # write "on" again: the device may have been restarted too
        restored = [i.id for i in self._instances.values() if i.active]
        if restoring and restored:
            log.info("alarm state restored: %d active (%s)", len(restored), ", ".join(sorted(restored)))
        for a in orphans:
            self._clear_orphan(a)
        if orphans or not restoring:
            self._save()

    def _writable(self, device: str) -> bool:
        """Whether action writes can reach `device`: a Modbus device of the configuration."""
        dev = self.config.devices.get(device)
        return dev is not None and dev.driver in (None, "modbus")

    def _configured(self, key: str) -> bool:
        """Whether the configuration has channel `key` ("device.channel")."""
        dev_id, _, code = key.partition(".")
        codes = self._known.get(dev_id, [])
        return codes is None or code in codes  # None: channels learnt from the wire (hj212)

    def _target(self, alarm: Alarm, index: int, targets: dict[str, _Target]) -> _Target | None:
        action = alarm.action
        if action is None:
            return None
        kind = "coil" if action.coil is not None else "register"
        address = action.coil if action.coil is not None else action.register
        assert address is not None
        if action.device not in self.config.devices:
            self._warn_once(f"nodevact:{index}:{action.device}", "alarms.%d: action (%s %s %d) skipped: no device %s "
                            "is configured", index, action.device, kind, address, action.device)
            return None
        if self.action_writer is None:
            self._warn_once(f"noact:{index}", "alarms.%d: action (%s %s %d) is not executed: this agent has no "
                            "Modbus write support yet", index, action.device, kind, address)
            return None
        if kind == "coil":
            on: int | bool = bool(1 if action.on is None else action.on)
            off: int | bool = bool(0 if action.off is None else action.off)
        else:
            assert action.on is not None and action.off is not None
            on, off = action.on, action.off
        key = f"{action.device}|{kind}|{address}"
        target = targets.get(key)
        if target is None:
            target = targets[key] = _Target(key, action.device, kind, address, on, off, action.min_on)
        else:
            if (target.on_value, target.off_value) != (on, off):
                self._warn_once(f"actconf:{index}", "alarms.%d: action on %s %s %d uses other on/off values than "
                                "an earlier rule; the earlier rule's values are used", index, action.device, kind,
                                address)
            target.min_on = max(target.min_on, action.min_on)
        return target

    def _is_passive(self, ch: _Channel) -> bool:
        return ch.code not in self._cold_codes and ch.key not in self._backgrounds

    def _new_channel(self, key: str) -> _Channel:
        ch = _Channel(key, self._started)
        ch.passive = self._is_passive(ch)
        self._channels[key] = ch
        return ch

    def _channel(self, key: str) -> _Channel:
        """A channel seen for the first time: create it and apply the rules (wildcards) to it."""
        ch = self._new_channel(key)
        self._bind(ch)
        return ch

    def _bind(self, ch: _Channel) -> None:
        """Create the alarm instances of `ch`: for each id the most specific rule, the first on ties."""
        chosen: dict[str, tuple[_Rule, str, PresetLimit | None]] = {}
        for rule in self._rules:
            if not rule.matches(ch.key):
                continue
            for rule_name, suffix in rule.kinds:
                limit = None
                if rule.preset is not None and rule_name == RULE_ABOVE and suffix == rule.preset.name:
                    limit = rule.preset.limits.get(ch.code)
                    if limit is None:
                        if rule.specificity == 2:
                            self._warn_once(f"nolimit:{rule.index}:{ch.key}", "alarms.%d: preset %s (%s) has no "
                                            "limit for channel code %s: rule not applied", rule.index,
                                            rule.preset.name, rule.preset.standard, ch.code)
                        continue
                id_ = f"{ch.key}:{suffix}"
                prev = chosen.get(id_)
                if prev is None or rule.specificity > prev[0].specificity:
                    chosen[id_] = (rule, rule_name, limit)
        for id_, (rule, rule_name, limit) in chosen.items():
            inst = _Instance(id_, rule_name, rule, ch, limit)
            ch.instances.append(inst)
            self._instances[id_] = inst
            if rule_name == RULE_STALE:
                self._stale.append(inst)
            if rule.window is not None and rule_name in (RULE_ABOVE, RULE_BELOW):
                self._window(ch, rule.window)
                bg = rule.alarm.background
                if bg:
                    self._window(self._channels.get(bg) or self._new_channel(bg), rule.window)
            elif rule.alarm.background and rule.alarm.background not in self._channels:
                self._new_channel(rule.alarm.background)

    def _window(self, ch: _Channel, seconds: float) -> _Window:
        w = ch.windows.get(seconds)
        if w is None:
            saved = self._saved_windows.pop((ch.key, seconds), None)
            w = ch.windows[seconds] = _Window.from_json(seconds, saved) if saved is not None else _Window(seconds)
        return w

    # ------------------------------------------------------------------ evaluation

    def _observe_one(self, ch: _Channel, r: Reading, now: float) -> None:
        if ch.passive and not ch.instances and not ch.windows:
            return  # no rule looks at this channel
        if r.unit is not None:
            ch.unit = r.unit
        in_fault = r.flag in FAULT_FLAGS
        if in_fault:
            if ch.fault_since is None:
                ch.fault_since = now
        else:
            ch.fault_since = None
        measured = valid = _measured(r)  # SPEC: stale is "no valid reading"; M, C, D… values are not valid
        if valid:
            ch.last_valid_mono = now
        if measured:
            assert r.value is not None
            ch.last_value, ch.last_value_ms, ch.last_value_mono = r.value, r.ts_ms, now
            for w in ch.windows.values():
                w.add(r.ts_ms, r.value)
                self._windows_dirty = True
        for inst in ch.instances:
            name = inst.rule_name
            if name == RULE_STALE:
                if valid and inst.active:
                    self._clear(inst, 0, r.ts_ms)
            elif name == RULE_FAULT:
                self._eval_fault(inst, in_fault, now, r.ts_ms)
            elif measured:
                x = self._input_value(inst, r, now)
                limit = self._limit(inst)
                if x is not None and limit is not None:
                    self._eval_limit(inst, x, limit, now, r.ts_ms)

    def _input_value(self, inst: _Instance, r: Reading, taken: float) -> float | None:
        """The number compared with the limit: the value or its window mean, minus the background
        (`taken`: when `r` was taken, on the monotonic clock)."""
        rule = inst.rule
        ch = inst.channel
        if rule.window is not None:
            w = ch.windows[rule.window]
            interval_ms = self._intervals.get(ch.device, 0.0) * 1000
            have = covered(w.covered_ms(), w.count, interval_ms)
            if have < MIN_WINDOW_COVERAGE * w.span_ms:
                if w.covered_ms() + interval_ms >= MIN_WINDOW_COVERAGE * w.span_ms:
                    # The readings span the window but are too few (polls missed or failed): not a window
                    # still filling after a start. Said, or a rule that used to raise stops without a word.
                    self._errlog.warning(
                        "alarm rule alarms.%d on %s: its %g s window mean is not compared: the readings of the "
                        "window cover %d %% of it, %d %% needed (polls missed or failed)", rule.index, ch.key,
                        rule.window, int(100 * have / w.span_ms), round(100 * MIN_WINDOW_COVERAGE),
                        key=f"sparse:{rule.index}:{ch.key}")
                return None
            x = w.mean()
        else:
            x = r.value
        if x is None:
            return None
        bg_key = rule.alarm.background
        if bg_key:
            bg = self._channels.get(bg_key)
            if bg is None:
                return None
            b = self._background(bg, rule.window, r.ts_ms, taken)
            if b is None:
                return None
            x -= b
        return x if rule.window is None and not bg_key else round(x, 6)

    def _background(self, bg: _Channel, window: float | None, ts_ms: int, taken: float) -> float | None:
        """What is subtracted from a reading taken at `ts_ms` (`taken` on the monotonic clock): the
        background's mean of the same S seconds (covering the window as the site's mean must), or without
        a window its last value when taken within BACKGROUND_HOLD_INTERVALS of its device's intervals; None
        when the background instrument gave no such value (dead, or not yet read): the reading is then not
        compared. How long ago the background's readings were taken is counted on this machine's clock, its
        window read from the site's time as the background's own clock gives it: an `hj212` analyzer stamps
        its readings by its own clock, which may be minutes off this machine's (or the site instrument's),
        and its readings then never counted as current: the rule compared nothing, for good."""
        interval_ms = (self._intervals.get(bg.device) or BACKGROUND_UNKNOWN_INTERVAL_S) * 1000
        since_ms = None if bg.last_value_mono is None else (taken - bg.last_value_mono) * 1000
        if window is not None:
            w = bg.windows[window]
            # The site's reading's time on the background's clock; windows restored at a start, before the
            # background's first reading of this run, by the site's own time.
            at = ts_ms if since_ms is None or bg.last_value_ms is None else bg.last_value_ms + round(since_ms)
            mean, span, count = w.since(at - w.span_ms)
            return mean if covered(span, count, interval_ms) >= MIN_WINDOW_COVERAGE * w.span_ms else None
        if since_ms is None or abs(since_ms) > BACKGROUND_HOLD_INTERVALS * interval_ms:
            return None
        return bg.last_value

    def _limit(self, inst: _Instance) -> float | None:
        alarm = inst.rule.alarm
        if inst.limit is None:
            return alarm.above if inst.rule_name == RULE_ABOVE else alarm.below
        temperature = None
        if inst.limit.cold is not None:
            temperature = self._temperature(inst.channel.device)
        unit = inst.channel.unit
        if unit != inst._unit_seen:
            inst._unit_seen = unit
            factor = _unit_factor(inst.limit.unit, unit)
            if factor is None:
                self._warn_once(f"unit:{inst.id}", "%s: the channel's unit %r is not the preset's %r and cannot be "
                                "converted; comparing the numbers as they are", inst.id, unit, inst.limit.unit)
                factor = 1.0
            inst._factor = factor
        return _limit_for(inst.limit, temperature) * inst._factor

    def _temperature(self, device: str) -> float | None:
        """The water temperature a preset's cold limit looks at: the device's own, else the most recent
        of any device; only one taken within TEMPERATURE_HOLD_S (or two intervals of its device, when
        longer): a thermometer dead since winter must not keep the cold limit through the summer."""
        now = self.clock()
        fresh = {d: t for d, t in self._temps.items()
                 if now - t[1] <= max(TEMPERATURE_HOLD_S, 2 * self._intervals.get(d, 0.0))}
        own = fresh.get(device)
        if own is not None:
            return own[0]
        latest = max(fresh.values(), key=lambda t: t[1], default=None)
        return latest[0] if latest is not None else None

    def _eval_limit(self, inst: _Instance, x: float, limit: float, now: float, ts_ms: int) -> None:
        alarm = inst.rule.alarm
        above = inst.rule_name == RULE_ABOVE
        if not inst.active:
            if (x > limit) if above else (x < limit):
                if inst.pending is None:
                    inst.pending = now
                if _lasted(inst.pending, now, alarm.delay):
                    self._raise(inst, x, limit, ts_ms)
            else:
                inst.pending = None
            return
        edge = _band_edge(limit, alarm.hysteresis, above)
        if (x < edge) if above else (x > edge):
            if inst.clearing is None:
                inst.clearing = now
            if _lasted(inst.clearing, now, alarm.effective_clear_delay()):
                self._clear(inst, x, ts_ms, limit)
        else:
            inst.clearing = None

    def _eval_fault(self, inst: _Instance, in_fault: bool, now: float, ts_ms: int) -> None:
        limit = inst.rule.alarm.fault
        assert limit is not None
        ch = inst.channel
        if not inst.active:
            if in_fault and ch.fault_since is not None and _lasted(ch.fault_since, now, limit):
                self._raise(inst, round(now - ch.fault_since, 1), limit, ts_ms)
            return
        if in_fault:
            inst.clearing = None
            return
        if inst.clearing is None:
            inst.clearing = now
        if _lasted(inst.clearing, now, inst.rule.alarm.effective_clear_delay()):
            self._clear(inst, 0, ts_ms, limit)

    # ------------------------------------------------------------------ events and state

    def _raise(self, inst: _Instance, value: float, threshold: float, ts_ms: int) -> None:
        value = _as_published(value)
        inst.active = True
        inst.since_ms = ts_ms
        inst.value = value
        inst.threshold = threshold
        inst.pending = inst.clearing = None
        if inst.rule.target is not None:
            inst.rule.target.active_ids.add(inst.id)
        self._emit(inst.id, inst.channel.key, inst.rule_name, "raised", value, threshold, ts_ms)

    def _clear(self, inst: _Instance, value: float, ts_ms: int, threshold: float | None = None) -> None:
        if threshold is None:
            threshold = self._rule_threshold(inst)
        inst.active = False
        inst.since_ms = None
        inst.value = None
        inst.threshold = None
        inst.pending = inst.clearing = None
        if inst.rule.target is not None:
            inst.rule.target.active_ids.discard(inst.id)
        self._emit(inst.id, inst.channel.key, inst.rule_name, "cleared", _as_published(value), threshold, ts_ms)

    def _rule_threshold(self, inst: _Instance) -> float | None:
        if inst.rule_name == RULE_STALE:
            return inst.rule.alarm.stale
        if inst.rule_name == RULE_FAULT:
            return inst.rule.alarm.fault
        return self._limit(inst)

    def _clear_orphan(self, saved: Mapping[str, Any]) -> None:
        threshold = saved.get("threshold")
        log.warning("alarm %s: its rule, device or channel is no longer configured; clearing it", saved["id"])
        self._emit(saved["id"], saved["channel"], str(saved.get("rule") or saved["id"].rsplit(":", 1)[-1]),
                   "cleared", None, threshold if isinstance(threshold, int | float) else None, self.wall_ms())

    def _emit(self, id_: str, channel: str, rule: str, state: str, value: float | None, threshold: float | None,
              ts_ms: int) -> None:
        body = {"id": id_, "channel": channel, "rule": rule, "state": state, "value": value,
                "threshold": _json_number(threshold), "ts": iso_utc_ms(ts_ms)}
        self.recorder.submit_event(STREAM_ALARMS, ts_ms, body)
        self._save()
        log.log(logging.WARNING if state == "raised" else logging.INFO, "alarm %s %s: value %s, threshold %s",
                id_, state, value, body["threshold"])
        self._run_actions(self.clock())

    def _state(self) -> dict[str, Any]:
        """What meta `alarm_state` holds: active alarms, action states, last temperatures."""
        active = [{"id": i.id, "channel": i.channel.key, "rule": i.rule_name, "since_ms": i.since_ms,
                   "value": i.value, "threshold": i.threshold}
                  for i in self._instances.values() if i.active]
        now, wall = self.clock(), self.wall_ms()
        actions = {t.key: t.to_json(now, wall) for t in self._targets.values() if t.touched}
        temperatures = {device: [value, wall - round((now - taken) * 1000)]
                        for device, (value, taken) in self._temps.items()}
        return {"v": STATE_VERSION, "active": active, "actions": actions, "temperatures": temperatures}

    def _windows_json(self) -> str:
        """What meta `alarm_windows` holds, written one window at a time: the lists of a window's
        buckets exist only while that window is written (all of them at once were ~8 MB for 200
        windows of 300 s)."""
        per_channel = []
        for ch in self._channels.values():
            written = [f"{_dumps(repr(seconds))}:{_dumps(w.to_json())}" for seconds, w in ch.windows.items() if len(w)]
            if written:
                per_channel.append(f"{_dumps(ch.key)}:{{{','.join(written)}}}")
        return f'{{"v":{STATE_VERSION},"windows":{{{",".join(per_channel)}}}}}'

    def _save(self) -> None:
        """Alarm state and the active list for `status`; the recorder commits them with the events
        submitted before them, in one transaction, and keeps the state beside the buffer file too (a
        fresh file, should this one be lost, does not raise the active alarms again). The windows are
        not part of it: `tick` saves them."""
        self.recorder.set_meta("alarm_state", _dumps(self._state()), keep_beside=True)
        self.recorder.set_meta("active_alarms", json.dumps(self.active(), separators=(",", ":")))

    @staticmethod
    def _parse_state(saved: str | None, what: str = "state") -> dict[str, Any]:
        """A saved state, {} (said in an ERROR line) when it is damaged: empty or cut short (a file
        truncated), not JSON, or of another format; a field of the wrong type (damage that still parses)
        is dropped alone, so that no start fails on it again and again."""
        if saved is None:
            return {}
        starting = "starting with no active alarms" if what == "state" else "windows start empty"
        if not saved.strip():
            log.error("saved alarm %s is empty (truncated); %s", what, starting)
            return {}
        try:
            state = json.loads(saved)
        except ValueError:
            log.error("saved alarm %s is not valid JSON (truncated or corrupt); %s", what, starting)
            return {}
        if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
            log.error("saved alarm %s has an unknown format; %s", what, starting)
            return {}
        wrong = [k for k, kind in _STATE_FIELDS.items() if state.get(k) is not None and not isinstance(state[k], kind)]
        if wrong:
            log.error("saved alarm %s is damaged (%s of the wrong type); %s start empty", what, ", ".join(wrong),
                      ", ".join(wrong))
            state = {k: v for k, v in state.items() if k not in wrong}
        return state

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------------ actions

    def _run_actions(self, now: float) -> None:
        if not self._targets:
            return
        changed = False
        if self._worker is not None:
            for key, on, value, error in self._worker.results():
                changed |= self._write_done(key, on, value, error, now)
        for target in self._targets.values():
            if target.inflight is not None or target.written == target.desired:
                continue
            if not self._writable(target.device):
                continue  # its device was removed (reload, restart): no bus reaches it; kept in case it comes back
            if target.written is None and not target.desired and not target.touched:
                continue  # never written and not wanted: leave the device alone
            if now < target.retry_at:
                continue
            if (not target.desired and target.on_since is not None
                    and now - target.on_since < target.min_on):
                continue  # minimum on-time not reached yet
            changed |= self._dispatch(target, target.desired, now)
        for key in [k for k, t in self._targets.items() if t.orphan and t.written is False and t.inflight is None]:
            del self._targets[key]  # switched off: forget it
        if changed:
            self._save()

    def _dispatch(self, target: _Target, on: bool, now: float) -> bool:
        assert self.action_writer is not None
        target.inflight = on
        target.touched = True
        value = target.on_value if on else target.off_value
        if self.inline_actions:
            try:
                self.action_writer(target.device, target.kind, target.address, value)
            except Exception as exc:  # noqa: BLE001 - any failure of the write is retried
                return self._write_done(target.key, on, value, exc, now)
            return self._write_done(target.key, on, value, None, now)
        if self._worker is None:
            self._worker = _ActionWorker(self.action_writer)
            self._worker.start()
        self._worker.submit(target.key, on, target.device, target.kind, target.address, value)
        return False

    def _write_done(self, key: str, on: bool, value: int | bool, error: BaseException | None, now: float) -> bool:
        """A write of `value` finished; True when the confirmed state changed (to be saved). One of a value
        that a reload has changed since says nothing of the target's state: the write of the new value
        follows it."""
        target = self._targets.get(key)
        if target is None or target.inflight != on or value != (target.on_value if on else target.off_value):
            return False
        target.inflight = None
        what = f"{target.device} {target.kind} {target.address} {'on' if on else 'off'}"
        if error is not None:
            target.written = None  # the write may have reached the device: its state is unknown
            target.failures += 1
            delay = min(ACTION_RETRY_MAX_S, ACTION_RETRY_FIRST_S * 2 ** (target.failures - 1))
            target.retry_at = now + delay
            self._errlog.warning("alarm action %s failed (%s); retrying in %.0f s", what, error, delay)
            return False
        if target.failures:
            log.info("alarm action %s written after %d failed attempts", what, target.failures)
        else:
            log.info("alarm action %s written", what)
        target.failures = 0
        target.retry_at = 0.0
        target.written = on
        target.on_since = now if on else None
        return True
