"""Read planner: merging rules, protocol limits, slicing responses back, and property tests that every
register is read by exactly one request with the fewest requests possible."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus_codec import decode, encode
from drivers.planner import (
    DEFAULT_MAX_GAP,
    TABLE_ORDER,
    Request,
    naive_plan,
    plan,
    rtu_char_bits,
    rtu_frame_bytes,
    rtu_wire_s,
    slice_response,
    table_limit,
)
from drivers.registers import REGISTER_COUNTS, RegisterSpec


def spec(address: int, type_: str = "uint16", table: str = "holding", channel: str | None = None) -> RegisterSpec:
    return RegisterSpec(channel or f"c{table[0]}{address}", address, type=type_, table=table)  # type: ignore[arg-type]


def spans(requests: list[Request]) -> list[tuple[str, int, int]]:
    return [(r.table, r.address, r.count) for r in requests]


def test_contiguous_registers_are_read_in_one_request():
    specs = [spec(0, "float32"), spec(2, "float32"), spec(4), spec(5, "int64")]
    assert spans(plan(specs)) == [("holding", 0, 9)]


def test_holes_up_to_max_gap_are_read_through():
    assert DEFAULT_MAX_GAP == 8
    assert spans(plan([spec(0), spec(9)])) == [("holding", 0, 10)]  # hole of 8 registers
    assert spans(plan([spec(0), spec(10)])) == [("holding", 0, 1), ("holding", 10, 1)]  # hole of 9
    assert spans(plan([spec(0), spec(10)], max_gap=9)) == [("holding", 0, 11)]


def test_max_gap_zero_merges_only_contiguous_registers():
    specs = [spec(0, "float32"), spec(2), spec(4, "float32")]
    assert spans(plan(specs, max_gap=0)) == [("holding", 0, 3), ("holding", 4, 2)]


def test_blocks_respect_max_block_and_the_protocol_limits():
    specs = [spec(2 * i, "float32") for i in range(100)]  # 200 contiguous registers
    assert spans(plan(specs)) == [("holding", 0, 124), ("holding", 124, 76)]
    assert spans(plan(specs, max_block=1000)) == spans(plan(specs))  # capped at 125
    assert [r.count for r in plan(specs, max_block=16)] == [16] * 12 + [8]
    coils = [spec(i, "bool", "coil") for i in range(2500)]
    assert spans(plan(coils)) == [("coil", 0, 2000), ("coil", 2000, 500)]
    assert table_limit("input") == 125 and table_limit("discrete") == 2000


def test_tables_are_planned_apart_and_requests_sorted():
    specs = [spec(3, table="discrete"), spec(0, table="input"), spec(1, table="coil"), spec(5), spec(0)]
    requests = plan(specs)
    assert [(r.table, r.address) for r in requests] == [
        ("holding", 0), ("input", 0), ("coil", 1), ("discrete", 3)]
    assert [r.function_code for r in requests] == [3, 4, 1, 2]


def test_overlapping_entries_share_one_request():
    whole = spec(0, "float32", channel="w01018")
    high_word = spec(0, "uint16", channel="hi")
    low_word = spec(1, "uint16", channel="lo")
    requests = plan([low_word, whole, high_word], max_gap=0, max_block=2)
    assert spans(requests) == [("holding", 0, 2)]
    assert {m.channel for m in requests[0].members} == {"w01018", "hi", "lo"}


def test_entries_that_cannot_fit_one_request_are_an_error():
    with pytest.raises(ValueError, match="max_block 2"):
        plan([spec(0, "float64")], max_block=2)
    with pytest.raises(ValueError, match=r"0\.\.2 .* max_block 2"):
        plan([spec(0, "float32"), spec(1, "float32")], max_block=2)  # overlap chain of 3 registers
    with pytest.raises(ValueError, match="max_gap"):
        plan([spec(0)], max_gap=-1)
    with pytest.raises(ValueError, match="max_block"):
        plan([spec(0)], max_block=0)


def test_responses_are_sliced_back_to_each_entry():
    a = RegisterSpec("a34004", 0, type="float32", order="CDAB")
    b = RegisterSpec("w01001", 4, type="int16", scale=0.01)
    c = RegisterSpec("total", 5, type="uint32")
    [request] = plan([c, a, b])
    image = {0: 0, 1: 0, 2: 0xDEAD, 3: 0xBEEF, 4: 0, 5: 0, 6: 0}
    for s, value in ((a, 35.5), (b, 7.12), (c, 123456)):
        for i, w in enumerate(encode(value, s)):
            image[s.address + i] = w
    words = [image[request.address + i] for i in range(request.count)]
    parts = slice_response(request, words)
    assert [(s.channel, decode(w, s)) for s, w in parts] == [("a34004", 35.5), ("w01001", 7.12), ("total", 123456)]
    with pytest.raises(ValueError, match="holds only"):
        slice_response(request, words[:-1])


def test_coil_responses_padded_to_a_byte_are_accepted():
    [request] = plan([spec(0, "bool", "coil"), spec(2, "bool", "coil")])
    bits = [True, False, False, False, False, False, False, False]  # pymodbus pads to 8 bits
    assert [decode(w, s) for s, w in slice_response(request, bits)] == [1.0, 0.0]


def test_rtu_frame_sizes():
    assert rtu_frame_bytes(Request("holding", 0, 2, ())) == (8, 9)
    assert rtu_frame_bytes(Request("input", 0, 125, ())) == (8, 255)
    assert rtu_frame_bytes(Request("coil", 0, 9, ())) == (8, 7)


def test_rtu_wire_time_matches_domain_figures_and_the_line_settings():
    """DOMAIN.md: at 9600 baud 2 registers cost ~25 ms of wire time, 40 contiguous ones ~100 ms (8N1:
    10 bits a character; frames plus a 3.5-character gap after each)."""
    two, forty = Request("holding", 0, 2, ()), Request("holding", 0, 40, ())
    assert rtu_wire_s([two], 9600) == pytest.approx((17 + 7) * 10 / 9600)
    assert rtu_wire_s([forty], 9600) == pytest.approx((93 + 7) * 10 / 9600)  # 104 ms
    assert rtu_wire_s([two, forty], 9600) == pytest.approx(rtu_wire_s([two], 9600) + rtu_wire_s([forty], 9600))
    assert rtu_wire_s([forty], 9600, parity="E") == pytest.approx((93 + 7) * 11 / 9600)  # 8E1: 11 bits
    assert rtu_char_bits(8, "N", 2) == rtu_char_bits(8, "e", 1) == 11 and rtu_char_bits(7, "N", 1) == 9
    assert rtu_wire_s([forty], 115200) == pytest.approx(93 * 10 / 115200 + 2 * 0.00175)  # fixed gap above 19200
    assert rtu_wire_s([], 9600) == 0


def forty_point_map() -> list[RegisterSpec]:
    """A busy multi-parameter station on one slave: 24 float32 analyzer values at 0..47, a float64
    totalizer after a hole, 8 int16 raw values in the input table with small holes, 4 status words,
    2 alarm coils (also used by bench/bench_planner.py)."""
    specs = [RegisterSpec(f"v{i}", 2 * i, type="float32", order="CDAB") for i in range(24)]
    specs.append(RegisterSpec("total", 52, type="float64"))
    specs += [RegisterSpec(f"raw{i}", 3 * i, type="int16", table="input", scale=0.01) for i in range(8)]
    specs += [RegisterSpec(f"st{i}", 100 + i, role="status", flags={0: "N", 1: "M", 2: "D"}) for i in range(4)]
    specs += [RegisterSpec("status_bits", 120, role="status", bits={0: "D"})]
    specs += [RegisterSpec(f"alarm{i}", 10 + i, table="coil") for i in range(2)]
    assert len(specs) == 40
    return specs


def test_forty_point_map_needs_four_requests_instead_of_forty():
    specs = forty_point_map()
    planned = plan(specs)
    assert len(naive_plan(specs)) == 40
    assert spans(planned) == [("holding", 0, 56), ("holding", 100, 4), ("holding", 120, 1),
                              ("input", 0, 22), ("coil", 10, 2)]
    assert spans(plan(specs, max_gap=0)) == [
        ("holding", 0, 48), ("holding", 52, 4), ("holding", 100, 4), ("holding", 120, 1),
        *[("input", 3 * i, 1) for i in range(8)], ("coil", 10, 2)]
    assert sum(sum(rtu_frame_bytes(r)) for r in planned) < sum(sum(rtu_frame_bytes(r)) for r in naive_plan(specs)) / 2


# --- properties ---------------------------------------------------------------------------------

TYPES = list(REGISTER_COUNTS)


@st.composite
def register_maps(draw: st.DrawFn, overlapping: bool = False) -> list[RegisterSpec]:
    """Random maps over all four tables; without `overlapping`, entries never share a register."""
    specs: list[RegisterSpec] = []
    for table in TABLE_ORDER:
        bits = table in ("coil", "discrete")
        n = draw(st.integers(0, 25))
        address = draw(st.integers(0, 300))
        for i in range(n):
            type_ = "bool" if bits else draw(st.sampled_from(TYPES[:-1]))
            if overlapping:
                address = draw(st.integers(0, 100))
            if address + REGISTER_COUNTS[type_] > 0x10000:
                break
            specs.append(RegisterSpec(f"{table}{i}", address, type=type_, table=table))  # type: ignore[arg-type]
            if not overlapping:
                address += REGISTER_COUNTS[type_] + draw(st.integers(0, 20))
    return draw(st.permutations(specs))


def check_plan(specs: list[RegisterSpec], requests: list[Request], max_gap: int, max_block: int | None) -> None:
    # sorted, one table per request, within limits, never more requests than entries
    keys = [(TABLE_ORDER.index(r.table), r.address) for r in requests]
    assert keys == sorted(keys)
    assert len(requests) <= len(specs)
    for r in requests:
        limit = table_limit(r.table) if max_block is None else min(max_block, table_limit(r.table))
        assert 1 <= r.count <= limit
        assert all(m.table == r.table for m in r.members)
        assert all(r.address <= m.address and m.end <= r.end for m in r.members)
        assert r.members[0].address == r.address and max(m.end for m in r.members) == r.end
        # holes inside a request are at most max_gap long
        covered = sorted({a for m in r.members for a in range(m.address, m.end)})
        assert all(b - a - 1 <= max_gap for a, b in zip(covered, covered[1:], strict=False))
    # every entry in exactly one request, every register of an entry read exactly once
    membership = Counter(id(m) for r in requests for m in r.members)
    assert all(membership[id(s)] == 1 for s in specs) and sum(membership.values()) == len(specs)
    reads = Counter((r.table, a) for r in requests for a in range(r.address, r.end))
    for s in specs:
        assert all(reads[(s.table, a)] == 1 for a in range(s.address, s.end))


def fewest_requests(specs: list[RegisterSpec], max_gap: int, max_block: int | None) -> int:
    """Exhaustive minimum (dynamic programming over runs of overlap clusters), per table."""
    total = 0
    for table in TABLE_ORDER:
        entries = sorted((s for s in specs if s.table == table), key=lambda s: s.address)
        clusters: list[list[int]] = []
        for s in entries:
            if clusters and s.address < clusters[-1][1]:
                clusters[-1][1] = max(clusters[-1][1], s.end)
            else:
                clusters.append([s.address, s.end])
        limit = table_limit(table) if max_block is None else min(max_block, table_limit(table))
        best = [0] + [10**9] * len(clusters)
        for j in range(1, len(clusters) + 1):
            for i in range(j):  # clusters i..j-1 in one request?
                run = clusters[i:j]
                if run[-1][1] - run[0][0] <= limit and all(
                    b[0] - a[1] <= max_gap for a, b in zip(run, run[1:], strict=False)
                ):
                    best[j] = min(best[j], best[i] + 1)
        total += best[-1]
    return total


@given(specs=register_maps(), max_gap=st.integers(0, 20), max_block=st.none() | st.integers(4, 130))
def test_every_register_is_read_exactly_once_within_limits(specs, max_gap, max_block):
    requests = plan(specs, max_gap=max_gap, max_block=max_block)
    check_plan(specs, requests, max_gap, max_block)
    assert len(requests) <= len(naive_plan(specs))


@given(specs=register_maps(overlapping=True), max_gap=st.integers(0, 10))
def test_overlapping_entries_are_read_exactly_once(specs, max_gap):
    requests = plan(specs, max_gap=max_gap)
    check_plan(specs, requests, max_gap, None)


@given(specs=register_maps(), max_gap=st.integers(0, 12), max_block=st.none() | st.integers(4, 40))
def test_plan_uses_the_fewest_requests_possible(specs, max_gap, max_block):
    assert len(plan(specs, max_gap=max_gap, max_block=max_block)) == fewest_requests(specs, max_gap, max_block)


@given(specs=register_maps(), max_gap=st.integers(0, 12))
def test_slices_hand_each_entry_its_own_registers(specs, max_gap):
    image = {(s.table, a): (hash((s.table, a)) & 0xFFFF if s.table in ("holding", "input") else a % 2)
             for s in specs for a in range(s.address, s.end)}
    for request in plan(specs, max_gap=max_gap):
        words = [image.get((request.table, request.address + i), 0) for i in range(request.count)]
        for member, part in slice_response(request, words):
            assert part == [image[(member.table, a)] for a in range(member.address, member.end)]
