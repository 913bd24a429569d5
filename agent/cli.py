"""The `edge-agent` command line (SPEC §1): run, check-config, status, simulate, tail, schema.

It wires and reports; the work is done by the modules it calls.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from agent import __version__
from agent.logutil import setup_logging

EXIT_OK = 0
EXIT_INVALID = 2
EXIT_FAILED = 1  # run could not start (another agent runs with the same buffer), or one of its loops died
EXIT_NEWER_BUFFER = 3  # run refused a buffer written by a newer edge-agent (a downgrade); the unit does not restart

log = logging.getLogger("edge-agent")


def _load_or_report(path: str, check_files: bool = False, warnings: bool = False,
                    for_status: bool = False, warnings_if_invalid: bool = False, check_tls: bool = False):
    """The config at `path`, or None after printing its problems (and, with `warnings`, its
    warnings) to stderr, one `FILE:LINE:COL: path: [warning: ]message` line each, in file order.
    `warnings_if_invalid`: the warnings too, but only beside problems (`run` logs those of a valid
    file itself)."""
    from agent.config import ConfigError, load_config

    try:
        config = load_config(path, check_files=check_files, check_tls=check_tls, for_status=for_status)
    except ConfigError as exc:
        shown = exc.problems + (exc.warnings if warnings or warnings_if_invalid else [])
        for problem in sorted(shown, key=lambda p: (p.line, p.col)):
            print(problem, file=sys.stderr)
        return None
    if warnings:
        for warning in config.warnings:
            print(warning, file=sys.stderr)
    return config


def cmd_check_config(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.config_file is None):
        args.usage_error("give the config file once: check-config FILE (or check-config -c FILE)")
    args.file = args.file or args.config_file
    config = _load_or_report(args.file, check_files=True, check_tls=True, warnings=True)
    if config is None:
        return EXIT_INVALID
    print(f"{args.file}: OK — station {config.station.id}, {len(config.devices)} devices, "
          f"{len(config.buses)} buses, {len(config.alarms)} alarm rules")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.configschema import json_schema

    json.dump(json_schema(), sys.stdout, indent=2, ensure_ascii=False)
    print()
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    # A SIGHUP while starting (a reload sent right after `systemctl start`) must not end the process
    # (the default action): it is remembered and acted on once the station runs.
    hup_while_starting: list[bool] = []
    signal.signal(signal.SIGHUP, lambda *_: hup_while_starting.append(True))
    from agent.bufferschema import NewerBuffer
    from agent.config import ConfigError
    from agent.instance import AlreadyRunning
    from agent.runtime import Station, UnsupportedConfig, check_supported, log_config_warnings

    setup_logging(args.log_level)
    # As check-config: a missing TLS file too, and the warnings of a file that does not load.
    config = _load_or_report(args.config, check_files=True, warnings_if_invalid=True)
    if config is None:
        return EXIT_INVALID
    try:
        check_supported(config)
    except UnsupportedConfig as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        config.read_mqtt_password()
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    log.info("edge-agent %s starting with %s", __version__, args.config)
    log_config_warnings(config)
    station = Station(args.config, config)
    # From here a SIGHUP goes to the station (before its check below: one arriving between the check and
    # Station.run installing its handlers was appended to a list nobody read again).
    signal.signal(signal.SIGHUP, lambda *_: station.request_reload())
    if hup_while_starting:
        station.request_reload()
    try:
        code = station.run()
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except NewerBuffer as exc:
        log.critical("%s", exc)
        station.notifier.notify(f"STATUS={exc}")
        return EXIT_NEWER_BUFFER
    # Everything is committed and closed: leave now, so that a second SIGTERM arriving during the
    # interpreter's teardown cannot turn a clean stop into a kill.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_status(args: argparse.Namespace) -> int:
    import sqlite3

    from agent.buffer import Buffer
    from agent.model import STREAM_READINGS
    from agent.runtime import device_channels, device_intervals
    from agent.seqmark import SeqMark, mark_path
    from agent.status import (
        agent_state,
        collect,
        missing_buffer,
        render_text,
        unopened_buffer,
        unreadable,
        unreadable_buffer,
        uplink_names,
    )

    config = _load_or_report(args.config, for_status=True)  # it never connects
    if config is None:
        print(f"edge-agent status: {args.config} has the problems above, so the buffer it names is not read; "
              "a running agent keeps the configuration it last loaded (a reload of this file is refused)",
              file=sys.stderr)
        return EXIT_INVALID
    path = config.storage.path
    reader = None
    why = hint = None
    recorded = None  # what the agent that wrote the file noted of itself (meta `agent`)
    stored = False  # a buffer with its tables is there
    # Read before the buffer: a first start reserves its first seqs as it creates the file meanwhile.
    seqmark = SeqMark(mark_path(path))
    issued_before = seqmark.path.exists() and bool(seqmark.read().get("readings"))
    try:
        reader = Buffer.open_reader(path) if path.exists() else None
        status = collect(reader, device_intervals(config), device_channels(config), uplink_names(config))
        stored = reader is not None and reader.has_schema()
        recorded = reader.meta_value("agent") if stored else None
    except (sqlite3.Error, OSError) as exc:  # a damaged file, or one this user may not read
        why, hint = unreadable_buffer(path, exc, args.config)
        status = unreadable(device_intervals(config), why)
    finally:
        if reader is not None:
            reader.close()
    status["station"] = config.station.id
    status["agent"] = agent_state(path, recorded)
    if why is None and not stored and status["agent"]["running"]:  # its readings wait in its memory
        why, hint = unopened_buffer(path)
        status.update(unreadable(device_intervals(config), why))
        if not issued_before:
            status["last_seq"] = 0  # no seq was ever issued here (a first start): the highest stored is known
    if why is None and not stored and issued_before and status["agent"]["running"] is False:  # deleted, emptied
        marks = seqmark.read()
        why, hint = missing_buffer(path, seqmark.issued_at_clean_close(STREAM_READINGS),
                                   marks.get(STREAM_READINGS, 0), seqmark.acked().get(STREAM_READINGS, 0))
        status.update(unreadable(device_intervals(config), why))
    if status["agent"]["running"] is False:  # the broker state in the file is the one it left behind
        left = status["broker"]
        if left.get("state") == "offline":  # a clean stop: offline since it stopped
            status["broker"] = {**left, "error": "edge-agent is not running"}
        else:  # it stopped without saying so (crash, power cut): "since" was when it connected
            since = ""
            if left.get("since"):
                since = f" (it last recorded {left.get('state', 'unknown')} since {left['since']})"
            status["broker"] = {**{k: v for k, v in left.items() if k != "since"}, "state": "offline",
                                "error": f"edge-agent is not running{since}"}
    if args.json:
        json.dump(status, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        if why:
            print(f"{why} ({hint})")
        elif not path.exists():
            print(f"no buffer database at {path} yet (the agent has not run with this config)")
        print(f"station  {config.station.id}" + (f" ({config.station.name})" if config.station.name else ""))
        print(render_text(status))
    return EXIT_OK


def cmd_tail(args: argparse.Namespace) -> int:
    from agent.config import ConfigError
    from agent.runtime import broker_settings
    from agent.tail import tail

    config = _load_or_report(args.config)
    if config is None:
        return EXIT_INVALID
    try:
        s = broker_settings(config)  # the same broker, credentials and TLS files as `run`
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_INVALID
    if args.url is not None:  # checked as the config's mqtt.url (a password in it is refused, never shown)
        from agent.configsections import check_mqtt_url

        try:
            check_mqtt_url(args.url)
        except ValueError as exc:
            print(f"edge-agent tail: --url: {exc}", file=sys.stderr)
            return EXIT_INVALID
    # Stopped by SIGTERM (`timeout`, a supervisor, `kill`), tail ends as on Ctrl-C: exit 0, nothing
    # more printed; by default the signal killed it (status 143).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tail(args.url or s.urls, s.base_topic, username=s.username, password=s.password,
         tls={"ca": s.tls_ca, "cert": s.tls_cert, "key": s.tls_key})
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_INVALID
    from drivers.sim.serve import serve

    return int(serve(config) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description="Environmental monitoring station gateway.")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str, config_flag: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if config_flag:
            p.add_argument("-c", "--config", required=True, metavar="FILE", help="station configuration (YAML)")
        return p

    p = add("run", cmd_run, "Run the station until SIGTERM/SIGINT; SIGHUP reloads the config.")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p = add("check-config", cmd_check_config, "Validate a config file without touching hardware or network.",
            config_flag=False)
    p.add_argument("file", metavar="FILE", nargs="?")
    # `-c FILE` as every other command takes it (a technician types it by habit); FILE stays the spelling.
    p.add_argument("-c", "--config", dest="config_file", metavar="FILE", help="the same as FILE")
    p.set_defaults(usage_error=p.error)
    p = add("status", cmd_status, "Show backlog, devices, alarms and broker state from the buffer.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("simulate", cmd_simulate, "Serve simulated instruments for the devices of FILE that use a built-in "
            "profile or a serial driver (pms5003, sds011, hj212).")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p = add("tail", cmd_tail, "Print the station's MQTT messages as they arrive, flagging gaps and duplicates.")
    p.add_argument("--url", help="watch this broker (default: the config's mqtt.url, or its mqtt.urls in order, "
                   "going on with the next while one cannot be reached)")
    add("schema", cmd_schema, "Print the JSON Schema of the config file.", config_flag=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
