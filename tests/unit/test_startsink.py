"""`agent.startsink.StartSink`: the pollers' readings held while the buffer is opened, bounded, handed over in
order once the recorder exists."""

from __future__ import annotations

from agent.model import Reading
from agent.startsink import StartSink


def _r(i: int) -> Reading:
    return Reading("d", "c", 1_000 + i, float(i))


def test_held_readings_are_handed_over_in_order_then_forwarded():
    sink = StartSink(limit=100)
    got: list[Reading] = []
    meta: dict[str, str] = {}
    sink.submit([_r(0), _r(1)])
    sink.set_meta("device_problems", "{}")
    sink.set_meta("device_problems", '{"d":"timeout"}')
    sink.submit([_r(2)])
    assert sink.held() == 3 and got == []
    assert sink.attach(got.extend, meta.__setitem__) == 3
    sink.submit([_r(3)])
    sink.set_meta("k", "v")
    assert [r.ts_ms for r in got] == [1000, 1001, 1002, 1003]
    assert meta == {"device_problems": '{"d":"timeout"}', "k": "v"}  # the last value held, then each
    assert sink.held() == 0 and sink.dropped == 0


def test_memory_is_bounded_the_oldest_dropped_and_counted():
    sink = StartSink(limit=5)
    for i in range(8):
        sink.submit([_r(i)])
    assert sink.held() == 5 and sink.dropped == 3
    got: list[Reading] = []
    sink.attach(got.extend, lambda k, v: None)
    assert [r.ts_ms - 1000 for r in got] == [3, 4, 5, 6, 7]
