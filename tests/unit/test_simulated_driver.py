"""The simulated instrument: its waveform and the faults a tester needs (pure logic)."""

from __future__ import annotations

import math

from drivers.simulated import SimChannelSpec, SimulatedDriver

T0 = 1_800_000_000_000  # a fixed wall-clock instant (ms)


def test_value_follows_mean_amplitude_and_period():
    ch = SimChannelSpec(code="w01018", unit="mg/L", mean=30, amplitude=10, period=100)
    drv = SimulatedDriver("cod", 1.0, [ch], seed=1)
    for offset_s in (0, 25, 50, 75):
        ts = T0 + offset_s * 1000
        (r,) = drv.poll(ts)
        expected = 30 + 10 * math.sin(2 * math.pi * ((ts / 1000) % 100) / 100)
        assert r.value is not None and abs(r.value - expected) < 1e-9
        assert (r.device, r.channel, r.unit, r.flag, r.ts_ms) == ("cod", "w01018", "mg/L", "N", ts)


def test_device_dropout_gives_null_flag_b_for_every_channel():
    chans = [SimChannelSpec(code="a"), SimChannelSpec(code="b")]
    readings = SimulatedDriver("d", 1.0, chans, dropout=1.0, seed=1).poll(T0)
    assert [(r.channel, r.value, r.flag) for r in readings] == [("a", None, "B"), ("b", None, "B")]


def test_channel_dropout_fails_only_that_channel():
    chans = [SimChannelSpec(code="a", mean=1), SimChannelSpec(code="b", mean=2, dropout=1.0)]
    a, b = SimulatedDriver("d", 1.0, chans, seed=1).poll(T0)
    assert (a.value, a.flag) == (1.0, "N") and (b.value, b.flag) == (None, "B")


def test_stuck_value_freezes_after_stuck_after():
    ch = SimChannelSpec(code="a", mean=10, amplitude=5, period=60, stuck_after=0)
    drv = SimulatedDriver("d", 1.0, [ch], seed=1)
    first = drv.poll(T0)[0].value
    assert all(drv.poll(T0 + i * 7000)[0].value == first for i in range(1, 6))


def test_spikes_and_decimals():
    ch = SimChannelSpec(code="a", mean=10, spike_chance=1.0, spike=100, decimals=1)
    (r,) = SimulatedDriver("d", 1.0, [ch], seed=1).poll(T0)
    assert r.value == 110.0


def test_same_seed_same_noise():
    ch = SimChannelSpec(code="a", mean=10, noise=2)
    one = [SimulatedDriver("d", 1.0, [ch], seed=7).poll(T0 + i)[0].value for i in range(3)]
    two = [SimulatedDriver("d", 1.0, [ch], seed=7).poll(T0 + i)[0].value for i in range(3)]
    assert one == two
