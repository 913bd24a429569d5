"""`driver: simulated`: an instrument with no hardware, for demos and tests.

Each channel follows mean + amplitude * sin(2 pi t / period) + gaussian noise (t = wall-clock time,
so a daily period peaks at the same hour every day), with the faults a tester needs: dropouts
(value null, flag B), a value that freezes after a while (a hung analyzer), and spikes.
Imports `agent.model` only.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from agent.model import FLAG_COMM, FLAG_NORMAL, Reading


@dataclass(frozen=True)
class SimChannelSpec:
    """One simulated channel; the field names are those of the YAML (`channels:` of the device)."""

    code: str
    unit: str | None = None
    mean: float = 0.0
    amplitude: float = 0.0
    period: float = 86400.0
    noise: float = 0.0
    dropout: float = 0.0  # probability that this channel's reading fails (null, flag B)
    stuck_after: float | None = None  # seconds after start; the value then stays frozen
    spike_chance: float = 0.0  # probability of a spike per reading
    spike: float = 0.0  # added to the value when a spike happens
    decimals: int | None = None  # round values to this many decimals


class SimulatedDriver:
    """A device whose readings are computed; `dropout` makes a whole poll fail (no answer)."""

    def __init__(self, device_id: str, interval: float, channels: list[SimChannelSpec],
                 dropout: float = 0.0, seed: int | None = None):
        self.device_id = device_id
        self.interval = interval
        self.channels = channels
        self.dropout = dropout
        self.rng = random.Random(seed)
        self.started = time.monotonic()
        self._frozen: dict[str, float] = {}

    def poll(self, ts_ms: int) -> list[Reading]:
        if self.dropout and self.rng.random() < self.dropout:
            return [Reading(self.device_id, ch.code, ts_ms, None, ch.unit, FLAG_COMM) for ch in self.channels]
        elapsed = time.monotonic() - self.started
        return [self._read(ch, ts_ms, elapsed) for ch in self.channels]

    def _read(self, ch: SimChannelSpec, ts_ms: int, elapsed: float) -> Reading:
        if ch.dropout and self.rng.random() < ch.dropout:
            return Reading(self.device_id, ch.code, ts_ms, None, ch.unit, FLAG_COMM)
        if ch.stuck_after is not None and elapsed >= ch.stuck_after and ch.code in self._frozen:
            return Reading(self.device_id, ch.code, ts_ms, self._frozen[ch.code], ch.unit, FLAG_NORMAL)
        t = ts_ms / 1000
        value = ch.mean + ch.amplitude * math.sin(2 * math.pi * (t % ch.period) / ch.period)
        if ch.noise:
            value += self.rng.gauss(0, ch.noise)
        if ch.spike_chance and self.rng.random() < ch.spike_chance:
            value += ch.spike
        if ch.decimals is not None:
            value = round(value, ch.decimals)
        if ch.stuck_after is not None:
            self._frozen[ch.code] = value
        return Reading(self.device_id, ch.code, ts_ms, value, ch.unit, FLAG_NORMAL)

    def close(self) -> None:
        pass
