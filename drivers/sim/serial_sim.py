"""Simulated serial instruments (PMS5003, SDS011, an HJ 212 analyzer) writing real frames into a pty.

A `PtyLink` is a pseudo-terminal pair whose slave end is what the agent opens (optionally through a
symlink at the bus's `port` path); a `SerialSim` thread drives one link with one or more
`Instrument`s: each streams a frame every `period` seconds (PMS5003 also answers the passive-mode and
read commands), optionally with injected faults (garbage between frames, frames split into pieces,
frames with a bad checksum or length carrying poison values that must never be stored). `silent`
makes an instrument say nothing at all; `unplug()`/`plug()` make the whole port vanish and come back.
`serve_serial(config, stop_event)` starts simulators for every serial-bus device of a config (for
`edge-agent simulate`). Imports `agent.hj212` and `drivers.serial_frames`; the config is duck-typed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import random
import select
import threading
import time
import tty
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from agent import hj212
from drivers.serial_frames import (
    PMS5003_CHANNELS,
    PMS5003_CMD_MODE,
    PMS5003_CMD_READ,
    PMS5003_CMD_SLEEP,
    PMS5003_HEADER,
    encode_pms5003,
    encode_sds011,
)

__all__ = [
    "Hj212Sim",
    "Instrument",
    "Pms5003Sim",
    "PtyLink",
    "SerialSim",
    "Sds011Sim",
    "make_instrument",
    "serve_serial",
]

log = logging.getLogger(__name__)

PMS5003_POISON = 9999.0  # every word of a corrupted PMS5003 frame (good frames stay far below)
SDS011_POISON = 999.9
HJ212_POISON = 999.0


class SimulatorError(OSError):
    """A simulator cannot be set up (e.g. the port path is a real device, or not writable)."""


# --------------------------------------------------------------------------------------------------
# The pseudo-terminal
# --------------------------------------------------------------------------------------------------


class PtyLink:
    """A pty pair in raw mode. The simulator writes to and reads from the master end; the agent opens
    `slave_path` (or `link`, a symlink to it, when given). The simulator keeps the slave end open too,
    so that the agent closing and reopening the port does not tear the pty down. Writes never block:
    what the kernel buffer cannot take is dropped and counted (a sensor does not wait for its reader).
    """

    def __init__(self, link: str | os.PathLike[str] | None = None) -> None:
        self.link = Path(link) if link is not None else None
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.slave_path = os.ttyname(self.slave)
        self.dropped = 0
        self.closed = False
        if self.link is not None:
            try:
                _make_link(self.link, self.slave_path)
            except BaseException:
                self._close_fds()
                raise

    @property
    def path(self) -> str:
        """What the agent's config should name as the bus's port."""
        return str(self.link) if self.link is not None else self.slave_path

    def write(self, data: bytes) -> int:
        """Write what fits; return the number of bytes written."""
        if self.closed:
            return 0
        try:
            n = os.write(self.master, data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EAGAIN):
                raise
            n = 0
        self.dropped += len(data) - n
        return n

    def read(self) -> bytes:
        """Whatever the agent wrote (non-blocking)."""
        if self.closed:
            return b""
        try:
            return os.read(self.master, 4096)
        except (BlockingIOError, OSError):
            return b""

    def _close_fds(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Close both ends (the agent's reads then fail: the port is gone) and remove the symlink."""
        if self.closed:
            return
        self.closed = True
        self._close_fds()
        if self.link is not None:
            _remove_link(self.link, self.slave_path)


def _make_link(link: Path, target: str) -> None:
    if link.is_symlink():
        link.unlink()  # a stale link from an earlier run
    elif link.exists():
        raise SimulatorError(f"refusing to replace {link}: it exists and is not a symlink (a real serial port?)")
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    except OSError as exc:
        raise SimulatorError(f"cannot create the simulated port {link}: {exc.strerror or exc} "
                             "(use a port path in a writable directory, e.g. /tmp/edge-agent-sim/ttyPM0)") from None


def _remove_link(link: Path, target: str) -> None:
    with contextlib.suppress(OSError):
        if link.is_symlink() and os.readlink(link) == target:
            link.unlink()


# --------------------------------------------------------------------------------------------------
# Instruments
# --------------------------------------------------------------------------------------------------


class Instrument:
    """One simulated instrument. Subclasses make good frames (recording what they sent in `sent`),
    poison frames (bad checksum or length, values that must never be stored) and answer commands.

    Fault injection, each a probability per frame: `garbage` (1-24 random bytes before the frame, often
    with a false header among them), `split` (the frame written in 2-3 pieces a few ms apart),
    `bad_checksum` (a poison frame before the good one). `silent = True`: nothing is sent or answered.
    """

    name = "instrument"

    def __init__(self, *, period: float = 1.0, garbage: float = 0.0, split: float = 0.0, bad_checksum: float = 0.0,
                 seed: int | None = None) -> None:
        self.period = float(period)
        self.garbage = garbage
        self.split = split
        self.bad_checksum = bad_checksum
        self.rng = random.Random(seed)
        self.device_id: str | None = None  # set by serve_serial
        self.silent = False
        self.n = 0  # good frames made
        self.poisoned = 0  # poison frames sent
        self.sent: list[Any] = []  # what the good frames carried (subclass-specific)
        self._lock = threading.Lock()

    def streaming(self) -> bool:
        """Whether the instrument sends frames by itself right now."""
        return True

    def frame(self) -> bytes:
        raise NotImplementedError

    def poison(self) -> bytes:
        raise NotImplementedError

    def false_header(self) -> bytes:
        return b""

    def on_bytes(self, data: bytes) -> list[bytes]:
        """Bytes written by the agent; returns the answers to send."""
        return []

    def chunks(self, good: bytes) -> list[bytes]:
        """`good` with the configured faults around it, as the pieces to write."""
        rng = self.rng
        out = bytearray()
        if self.garbage and rng.random() < self.garbage:
            junk = bytearray(rng.randbytes(rng.randint(1, 24)))
            if rng.random() < 0.5:
                at = rng.randint(0, len(junk))
                junk[at:at] = self.false_header()
            out += junk
        if self.bad_checksum and rng.random() < self.bad_checksum:
            out += self.poison()
            self.poisoned += 1
        out += good
        if self.split and rng.random() < self.split and len(out) > 2:
            cuts = sorted(rng.sample(range(1, len(out)), k=min(2, len(out) - 1)))
            pieces, last = [], 0
            for c in cuts:
                pieces.append(bytes(out[last:c]))
                last = c
            pieces.append(bytes(out[last:]))
            return [p for p in pieces if p]
        return [bytes(out)]


class Pms5003Sim(Instrument):
    """A Plantower PMS5003: streams in active mode (its power-on mode); `passive_support` makes it
    obey the mode command (answering `42 4D 00 04 E1 DATA CS`) and, in passive mode, answer each read
    command with one frame. `sent` holds the decoded values of every good frame."""

    name = "pms5003"

    def __init__(self, *, passive_support: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.passive_support = passive_support
        self.mode = "active"
        self.asleep = False
        self.commands: list[tuple[int, int]] = []  # (cmd, data) received with a valid checksum
        self._cmd_buf = bytearray()

    def streaming(self) -> bool:
        return self.mode == "active" and not self.asleep

    def values(self, n: int) -> dict[str, float]:
        pm25 = 10 + (n * 7) % 60
        mass = {"pm1_cf1": pm25 - 3, "pm25_cf1": pm25 + 1, "pm10_cf1": pm25 + 20,
                "a34005": pm25 - 4, "a34004": pm25, "a34002": pm25 + 18}
        counts = [3000 - 10 * (n % 50), 900, 300, 40, 9, n % 5]
        return {**{k: float(v) for k, v in mass.items()},
                **{ch: float(c) for ch, c in zip(PMS5003_CHANNELS[6:], counts, strict=True)}}

    def frame(self) -> bytes:
        with self._lock:
            self.n += 1
            values = self.values(self.n)
            self.sent.append(values)
        return encode_pms5003(values)

    def poison(self) -> bytes:
        frame = bytearray(encode_pms5003(dict.fromkeys(PMS5003_CHANNELS, PMS5003_POISON)))
        if self.rng.random() < 0.5:
            frame[-1] ^= 0x5A  # bad checksum
        else:
            frame[3] = 0x1D  # bad length
        return bytes(frame)

    def false_header(self) -> bytes:
        return PMS5003_HEADER + bytes((0x00, 0x1C))

    def on_bytes(self, data: bytes) -> list[bytes]:
        if not self.passive_support:
            return []
        buf = self._cmd_buf
        buf += data
        answers: list[bytes] = []
        while True:
            i = buf.find(PMS5003_HEADER)
            if i < 0:
                del buf[: max(0, len(buf) - 1)]
                break
            if len(buf) - i < 7:
                del buf[:i]
                break
            cmd = bytes(buf[i : i + 7])
            if sum(cmd[:5]) & 0xFFFF != int.from_bytes(cmd[5:7], "big"):
                del buf[: i + 1]
                continue
            del buf[: i + 7]
            answers += self._command(cmd[2], (cmd[3] << 8) | cmd[4])
        return answers

    def _command(self, cmd: int, data: int) -> list[bytes]:
        self.commands.append((cmd, data))
        if cmd == PMS5003_CMD_MODE:
            self.mode = "passive" if data == 0 else "active"
            return [self._reply(cmd, data & 0xFF)]
        if cmd == PMS5003_CMD_SLEEP:
            self.asleep = data == 0
            return [self._reply(cmd, data & 0xFF)]
        if cmd == PMS5003_CMD_READ and self.mode == "passive" and not self.asleep:
            return self.chunks(self.frame())
        return []

    @staticmethod
    def _reply(cmd: int, data: int) -> bytes:
        body = PMS5003_HEADER + bytes((0x00, 0x04, cmd, data))
        return body + (sum(body) & 0xFFFF).to_bytes(2, "big")


class Sds011Sim(Instrument):
    """A Nova SDS011 in its default active reporting mode (one frame a second, commands ignored).
    `sent` holds `{"a34004": pm25, "a34002": pm10}` of every good frame."""

    name = "sds011"

    def values(self, n: int) -> dict[str, float]:
        pm25 = round(5 + ((n * 13) % 80) * 0.7, 1)
        return {"a34004": pm25, "a34002": round(pm25 * 1.6 + 2.3, 1)}

    def frame(self) -> bytes:
        with self._lock:
            self.n += 1
            values = self.values(self.n)
            self.sent.append(values)
        return encode_sds011(values["a34004"], values["a34002"])

    def poison(self) -> bytes:
        frame = bytearray(encode_sds011(SDS011_POISON, SDS011_POISON))
        if self.rng.random() < 0.5:
            frame[8] = (frame[8] + 1) & 0xFF  # bad checksum
        else:
            frame[9] = 0xAC  # bad tail
        return bytes(frame)

    def false_header(self) -> bytes:
        return bytes((0xAA, 0xC0))


class Hj212Sim(Instrument):
    """A water analyzer sending HJ 212 CN 2011 packets with w01018 (COD) and w21003 (NH3-N) and their
    flags (w21003 is flagged T now and then; with `fault_every`, every that many packets w01018 comes
    as `w01018-Flag=D` without a value). DataTime is the current time in `timezone`. `answer=True`
    sets Flag=5 (answer requested); acknowledgements received are counted in `acks`.
    `sent` holds `(DataTime text, {code: (value or None, flag)})` of every good packet."""

    name = "hj212"

    def __init__(self, *, mn: str = "SIMHJ212000001", st: str = "32", pw: str = "123456",
                 timezone: str = "Asia/Shanghai", answer: bool = False, fault_every: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mn, self.st, self.pw = mn, st, pw
        self.tz = ZoneInfo(timezone)
        self.flag = hj212.FLAG_V2017 | (hj212.FLAG_ANSWER if answer else 0)
        self.fault_every = fault_every
        self.qn = hj212.QnSource(self.tz)
        self.acks = 0
        self._reader = hj212.FrameReader()

    def items(self, n: int) -> dict[str, tuple[float | None, str]]:
        cod: tuple[float | None, str] = (round(20 + (n % 20) * 0.5, 1), "N")
        if self.fault_every and n % self.fault_every == 0:
            cod = (None, "D")
        nh3n = (round(0.5 + (n % 9) * 0.25, 2), "T" if n % 4 == 3 else "N")
        return {"w01018": cod, "w21003": nh3n}

    def _packet(self, items: dict[str, tuple[float | None, str]]) -> tuple[str, bytes]:
        now = datetime.now(self.tz).replace(microsecond=0)
        packet = hj212.realtime_packet(self.mn, self.st, self.pw, now, items, qn=self.qn(), flag=self.flag)
        return hj212.format_time(now), hj212.encode_one(packet)

    def frame(self) -> bytes:
        with self._lock:
            self.n += 1
            items = self.items(self.n)
            data_time, frame = self._packet(items)
            self.sent.append((data_time, items))
        return frame

    def poison(self) -> bytes:
        _, frame = self._packet({"w01018": (HJ212_POISON, "N"), "w21003": (HJ212_POISON, "N")})
        if self.rng.random() < 0.5:
            crc = int(frame[-6:-2], 16)
            return frame[:-6] + b"%04X" % ((crc + 1) & 0xFFFF) + b"\r\n"  # bad CRC
        length = int(frame[2:6])
        return frame[:2] + b"%04d" % (length + 1) + frame[6:]  # bad length

    def false_header(self) -> bytes:
        return b"##0042QN="

    def on_bytes(self, data: bytes) -> list[bytes]:
        for item in self._reader.feed(data):
            if isinstance(item, hj212.Packet) and item.cn == hj212.CN_DATA_ACK:
                self.acks += 1
        return []


# --------------------------------------------------------------------------------------------------
# The thread that drives a pty
# --------------------------------------------------------------------------------------------------


class SerialSim(threading.Thread):
    """Drives one `PtyLink` with `instruments`: each streams a frame every `period` seconds (while
    `streaming()` and not `silent`) and answers what the agent writes. Stops when `stop_event` (or
    `close()`) is set; the pty is closed and the symlink removed on the way out."""

    def __init__(self, instruments: Sequence[Instrument], link: str | os.PathLike[str] | None = None, *,
                 stop_event: threading.Event | None = None, name: str = "serial-sim") -> None:
        super().__init__(name=name, daemon=True)
        self.instruments = list(instruments)
        self.link_path = link
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self._own_stop = threading.Event()
        self._pty_lock = threading.Lock()
        self.pty: PtyLink | None = PtyLink(link)
        _LIVE.add(self)

    @property
    def path(self) -> str:
        """The port path the agent should open."""
        if self.link_path is not None:
            return str(self.link_path)
        assert self.pty is not None
        return self.pty.slave_path

    def _stopping(self) -> bool:
        return self.stop_event.is_set() or self._own_stop.is_set()

    def unplug(self) -> None:
        """The port vanishes: pty closed, symlink removed (the agent's reads fail)."""
        with self._pty_lock:
            if self.pty is not None:
                self.pty.close()
                self.pty = None

    def plug(self) -> None:
        """The port comes back: a new pty behind the same symlink path."""
        with self._pty_lock:
            if self.pty is None:
                self.pty = PtyLink(self.link_path)

    def _write(self, data: bytes) -> None:
        with self._pty_lock:
            if self.pty is not None:
                self.pty.write(data)

    def _send(self, chunks: list[bytes]) -> None:
        for i, chunk in enumerate(chunks):
            if i:
                self._own_stop.wait(0.003 + 0.01 * random.random())  # a pause inside the frame
            self._write(chunk)

    def run(self) -> None:
        try:
            start = time.monotonic()
            due = [start + 0.05 * k for k in range(len(self.instruments))]
            while not self._stopping():
                now = time.monotonic()
                for k, inst in enumerate(self.instruments):
                    if now >= due[k]:
                        due[k] = max(due[k] + inst.period, now)
                        if inst.streaming() and not inst.silent:
                            self._send(inst.chunks(inst.frame()))
                wait = max(0.0, min(min(due) - time.monotonic(), 0.05))
                with self._pty_lock:
                    fd = self.pty.master if self.pty is not None else None
                if fd is None:
                    self._own_stop.wait(wait)
                    continue
                try:
                    ready, _, _ = select.select([fd], [], [], wait)
                except (OSError, ValueError):  # unplugged meanwhile
                    continue
                if not ready:
                    continue
                with self._pty_lock:
                    data = self.pty.read() if self.pty is not None else b""
                if not data:
                    continue
                for inst in self.instruments:
                    if not inst.silent:  # a silent instrument neither hears nor speaks (a cut cable)
                        self._send(inst.on_bytes(data))
        finally:
            self.unplug()
            _LIVE.discard(self)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (if it runs), close the pty and remove the symlink."""
        self._own_stop.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        self.unplug()
        _LIVE.discard(self)


_LIVE: set[SerialSim] = set()


@atexit.register
def _cleanup() -> None:  # pragma: no cover - runs at interpreter exit
    for sim in list(_LIVE):
        sim.unplug()


# --------------------------------------------------------------------------------------------------
# `edge-agent simulate`
# --------------------------------------------------------------------------------------------------


def make_instrument(driver: str, device_id: str, *, timezone: str = "Asia/Shanghai", station_id: str | None = None,
                    **kwargs: Any) -> Instrument:
    """A simulated instrument for a device with `driver` (pms5003, sds011, hj212)."""
    inst: Instrument
    if driver == "pms5003":
        inst = Pms5003Sim(**kwargs)
    elif driver == "sds011":
        inst = Sds011Sim(**kwargs)
    elif driver == "hj212":
        inst = Hj212Sim(mn=station_id or f"SIM{device_id}"[:24], timezone=timezone, **kwargs)
    else:
        raise ValueError(f"device {device_id}: no serial simulator for driver {driver!r}")
    inst.device_id = device_id
    return inst


def serve_serial(config: Any, stop_event: threading.Event) -> list[SerialSim]:
    """Start one simulator per serial bus of `config` that has devices (pms5003, sds011, hj212): a pty
    whose slave end is symlinked at the bus's `port` path, with one simulated instrument per device.

    Returns the started `SerialSim` threads (an empty list when the config has no serial device): they
    stop, close their pty and remove their symlink when `stop_event` is set (join them to wait for
    that) or on `close()`. `sim.instruments[k].device_id` names the device each instrument plays; set
    its `silent` to make it fall silent. Raises SimulatorError (an OSError) when a port path cannot
    be used (it is a real device, or its directory is not writable); simulators already started are
    closed first.
    """
    by_bus: dict[str, list[tuple[str, Any]]] = {}
    buses = config.buses
    for dev_id, dev in config.devices.items():
        bus_name = getattr(dev, "bus", None)
        bus = buses.get(bus_name) if bus_name is not None else None
        if bus_name is None or bus is None or getattr(bus, "type", None) != "serial":
            continue
        by_bus.setdefault(bus_name, []).append((dev_id, dev))
    tz = getattr(config.station, "timezone", "Asia/Shanghai")
    sims: list[SerialSim] = []
    try:
        for bus_name, devs in by_bus.items():
            port = buses[bus_name].port
            instruments = [make_instrument(dev.driver, dev_id, timezone=tz, station_id=config.station.id)
                           for dev_id, dev in devs]
            sim = SerialSim(instruments, port, stop_event=stop_event, name=f"sim:{bus_name}")
            sims.append(sim)
            sim.start()
            log.info("simulate: serial bus %s: %s on %s -> %s", bus_name,
                     ", ".join(f"{dev_id} ({dev.driver})" for dev_id, dev in devs), port, sim.pty.slave_path
                     if sim.pty else "?")
    except BaseException:
        for sim in sims:
            sim.close()
        raise
    return sims
