"""The independent checker of tests/hj212_strict.py (audit audhj) reproduces DOMAIN.md's own examples, and
refuses what DOMAIN.md forbids: a Modbus CRC, a wrong length, an exponent, a packet over 1036 bytes; and every
packet the agent's encoder makes (any values, flags, codes, split or not) passes it."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hj212_strict import STANDARD_ACK, STANDARD_EXAMPLE, build, check, crc_hj212
from hypothesis import given, settings
from hypothesis import strategies as st
from instruments import crc16_modbus

from agent import hj212

EXAMPLE_SEGMENT = (b"QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                   b"CP=&&RtdInterval=30&&")


def test_the_checker_reproduces_domain_md_examples_exactly():
    assert crc_hj212(EXAMPLE_SEGMENT) == 0x1C80
    for example in (STANDARD_EXAMPLE, STANDARD_ACK):
        assert check(example).problems == []
        assert build(example[6:-6].decode()) == example


def test_the_checker_refuses_what_domain_md_forbids():
    modbus = b"##0101" + EXAMPLE_SEGMENT + b"%04X\r\n" % crc16_modbus(EXAMPLE_SEGMENT)
    assert any("CRC" in p for p in check(modbus).problems)
    assert any("length" in p for p in check(STANDARD_EXAMPLE.replace(b"##0101", b"##0100")).problems)
    seg = "QN=20261201000000000;ST=32;CN=2011;PW=123456;MN=M1;Flag=4;CP=&&DataTime=20261201000000;{}&&"
    assert any("plain decimal" in p for p in check(build(seg.format("w01018-Rtd=1e-07,w01018-Flag=N"))).problems)
    assert any("data flag" in p for p in check(build(seg.format("w01018-Rtd=1,w01018-Flag=X"))).problems)
    assert any("exceeds" in p for p in check(build(seg.format("x-Rtd=" + "1" * 1000))).problems)
    assert check(build(seg.format("w01018-Rtd=-0.5,w01018-Flag=N"))).problems == []


codes = st.from_regex(r"[A-Za-z0-9_]{1,20}", fullmatch=True)
numbers = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-2**70, 2**70))
data_flags = st.sampled_from(list("NFMSDCTB"))
SHANGHAI = ZoneInfo("Asia/Shanghai")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(codes, st.tuples(numbers, data_flags), max_size=80),
       st.from_regex(r"[A-Za-z0-9_-]{1,24}", fullmatch=True), st.integers(1_600_000_000_000, 4_000_000_000_000))
def test_every_realtime_packet_the_agent_encodes_passes_the_independent_checker(items, mn, ts_ms):
    packet = hj212.realtime_packet(mn, "32", "123456", datetime.fromtimestamp(ts_ms / 1000, UTC), items,
                                   "20261201000000001", 5, tz=SHANGHAI)
    got: dict[str, dict[str, str]] = {}
    for frame in hj212.encode(packet):
        checked = check(frame)
        assert checked.problems == [], (checked.problems, frame[:200])
        for code, fields in checked.codes().items():
            got.setdefault(code, {}).update(fields)
    for code, (value, flag) in items.items():
        assert got[code]["Flag"] == flag
        assert ("Rtd" in got[code]) == (value is not None)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(codes, st.fixed_dictionaries(
    {"avg": numbers, "min": numbers, "max": numbers, "cou": numbers, "flag": data_flags}), min_size=1, max_size=60),
    st.sampled_from(["2051", "2061", "2031"]))
def test_every_period_packet_the_agent_encodes_passes_the_independent_checker(items, cn):
    packet = hj212.period_packet(cn, "MN1", "32", "123456", datetime(2026, 12, 1, tzinfo=UTC), items,
                                 "20261201000000001", 5, tz=SHANGHAI)
    for frame in hj212.encode(packet):
        checked = check(frame)
        assert checked.problems == [], (checked.problems, frame[:200])
        assert checked.item("DataTime") == "20261201080000"
