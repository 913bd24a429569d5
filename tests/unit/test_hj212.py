"""Unit and property tests of the HJ 212-2017 codec (agent/hj212.py): vectors, round trips, stream fuzzing."""

from __future__ import annotations

import ast
import math
import random
import string
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hj212_platform import crc212
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import hj212
from agent.hj212 import (
    BadCrc,
    BadHeader,
    BadLength,
    BadQn,
    FrameReader,
    Hj212Error,
    Malformed,
    NotAscii,
    Packet,
    QnSource,
    Reassembler,
    ReassemblyError,
    ack_9014,
    crc16,
    decode,
    encode,
    encode_one,
    format_number,
    format_time,
    make_qn,
    parse_number,
    parse_time,
    period_items,
    period_packet,
    realtime_items,
    realtime_packet,
    reply_9011,
    reply_9012,
)
from agent.model import FLAGS

SH = ZoneInfo("Asia/Shanghai")
Stats = dict[str, dict[str, float | int | str | None]]

# The standard's own examples, as quoted in DOMAIN.md.
STD_1062 = (
    b"##0101QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
    b"CP=&&RtdInterval=30&&1C80\r\n"
)
STD_9014 = (
    b"##0087QN=20160801085000001;ST=91;CN=9014;PW=123456;MN=010000A8900016F000169DC0;Flag=4;CP=&&&&C241\r\n"
)


def frame_of(segment: str | bytes, crc: str | None = None) -> bytes:
    """A frame around `segment` with the right length and CRC (to reach the syntax checks)."""
    data = segment.encode("ascii") if isinstance(segment, str) else segment
    return b"##%04d" % len(data) + data + (crc or f"{crc16(data):04X}").encode() + b"\r\n"


def cp_items(packet: Packet) -> list[list[tuple[str, str]]]:
    """The CP groups with their item order (dict equality ignores order; the wire does not)."""
    return [list(group.items()) for group in packet.cp]


def assert_same(a: Packet, b: Packet) -> None:
    assert a == b
    assert cp_items(a) == cp_items(b)


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


# --- CRC and the standard's examples ---------------------------------------------------------------


def test_crc_of_standard_examples() -> None:
    assert crc16(STD_1062[6:-6]) == 0x1C80
    assert crc16(STD_9014[6:-6]) == 0xC241
    assert crc16(b"") == 0xFFFF


def test_crc_has_only_256_values_yet_catches_every_single_byte_change() -> None:
    # The standard's CRC keeps 8 bits of state between bytes: worth knowing when judging a frame.
    assert len({crc16(bytes([a, b, 0x41])) for a in range(256) for b in range(256)}) == 256
    segment = STD_1062[6:-6]
    for index in range(len(segment)):
        for delta in range(1, 256):
            changed = bytearray(segment)
            changed[index] ^= delta
            assert crc16(bytes(changed)) != 0x1C80


def test_crc_is_not_the_modbus_crc() -> None:
    assert crc16_modbus(STD_1062[6:-6]) != 0x1C80


@given(st.binary(max_size=300))
def test_crc_table_matches_the_bitwise_definition(data: bytes) -> None:
    assert crc16(data) == crc212(data)  # DOMAIN.md's CRC, bit by bit (the test platform's)


def test_standard_1062_example_decodes_and_encodes_byte_for_byte() -> None:
    packet = decode(STD_1062)
    assert packet == Packet(
        qn="20160801085857223",
        st="32",
        cn="1062",
        pw="100000",
        mn="010000A8900016F000169DC0",
        flag=5,
        cp=[{"RtdInterval": "30"}],
    )
    assert packet.answer_requested and packet.version == 1 and not packet.is_split
    assert encode(packet) == [STD_1062]
    assert encode_one(packet) == STD_1062


def test_standard_9014_example_is_what_ack_9014_builds() -> None:
    request = Packet(
        qn="20160801085000001",
        st="32",
        cn="2011",
        pw="123456",
        mn="010000A8900016F000169DC0",
        flag=5,
        cp=[{"DataTime": "20160801085000"}],
    )
    assert encode_one(ack_9014(request)) == STD_9014
    decoded = decode(STD_9014)
    assert decoded == ack_9014(request)
    assert decoded.cp == [] and decoded.st == "91" and decoded.cn == "9014"


def test_lower_case_crc_is_accepted_on_reading() -> None:
    assert decode(STD_1062.replace(b"1C80", b"1c80")) == decode(STD_1062)


def test_frames_from_deployed_implementations_are_accepted() -> None:
    # Frames published with public HJ 212 parsers (HJ/T 212-2005 style: no QN, no Flag), whose CRCs
    # were computed by other implementations; one is written in lower case.
    frames = [
        b"##0139ST=32;CN=2011;PW=123456;MN=LD130133000015;CP=&&DataTime=20160824003817000;B01-Rtd=36.91;"
        b"011-Rtd=231.0,011-Flag=N;060-Rtd=1.803,060-Flag=N&&4980\r\n",
        b"##0109ST=32;CN=2011;PW=123456;MN=NJGDKYYC202101q0001w0001;CP=&&DataTime=20210305003817000;"
        b"ele01-Rtd=1;ele02-Rtd=0&&8c41\r\n",
        b"##0245ST=32;CN=2051;PW=123456;MN=12091200160055;CP=&&DataTime=20150430135700;B01-Min=895.13,"
        b"B01-Avg=909.87,B01-Max=932.28,B01-Cou=54.59;011-Min=999.99,011-Avg=999.99,011-Max=999.99,"
        b"011-Cou=54.59;060-Min=30.18,060-Avg=30.18,060-Max=30.18,060-Cou=1.65&&7640\r\n",
    ]
    first, second, third = (decode(f) for f in frames)
    assert first.qn is None and first.flag is None and first.version is None
    assert realtime_items(first) == {"B01": (36.91, None), "011": (231.0, "N"), "060": (1.803, "N")}
    assert second.mn == "NJGDKYYC202101q0001w0001"
    assert second.data_time(SH) == datetime(2021, 3, 5, 0, 38, 17, tzinfo=SH)
    assert period_items(third)["B01"] == {
        "cou": 54.59,
        "min": 895.13,
        "avg": 909.87,
        "max": 932.28,
        "flag": None,
    }


# --- realistic packets -----------------------------------------------------------------------------

RT_2011 = (
    b"##0205QN=20261129100000123;ST=32;CN=2011;PW=123456;MN=14010500000017;Flag=4;CP=&&DataTime=20261129100000;"
    b"w01018-Rtd=23.4,w01018-Flag=N;w21003-Rtd=0.512,w21003-Flag=N;w00000-Rtd=12.5,w00000-Flag=N;"
    b"w01001-Flag=B&&"
)
MIN_2051 = (
    b"##0279QN=20261129101000007;ST=39;CN=2051;PW=123456;MN=14010500000039;Flag=4;CP=&&DataTime=20261129100000;"
    b"a34002-Min=60,a34002-Avg=80.5,a34002-Max=101.25,a34002-Flag=N;a34004-Min=30.1,a34004-Avg=41.2,"
    b"a34004-Max=55,a34004-Flag=N;a01007-Min=0,a01007-Avg=1.8,a01007-Max=4.2,a01007-Flag=N&&"
)


def test_realtime_2011_vector() -> None:
    items = {"w01018": (23.4, "N"), "w21003": (0.512, "N"), "w00000": (12.5, "N"), "w01001": (None, "B")}
    packet = realtime_packet(
        "14010500000017",
        32,
        "123456",
        datetime(2026, 11, 29, 2, 0, tzinfo=UTC),
        items,
        qn="20261129100000123",
        tz=SH,
    )
    frame = encode_one(packet)
    assert frame[:-6] == RT_2011
    assert frame[-6:] == b"%04X\r\n" % crc16(RT_2011[6:])
    assert int(frame[2:6]) == len(RT_2011) - 6
    decoded = decode(frame)
    assert_same(decoded, packet)
    assert realtime_items(decoded) == items
    assert decoded.data_time(SH) == datetime(2026, 11, 29, 10, 0, tzinfo=SH)
    assert decoded.get_float("w01018-Rtd") == 23.4 and decoded.get("w01001-Rtd") is None


def test_null_value_is_sent_as_flag_only() -> None:
    packet = realtime_packet("MN1", "21", "pw", datetime(2026, 1, 1), {"w01018": (None, "B")}, qn="2" * 17)
    assert packet.cp[1] == {"w01018-Flag": "B"}
    assert realtime_items(decode(encode_one(packet))) == {"w01018": (None, "B")}


def test_minute_2051_vector() -> None:
    items: Stats = {
        "a34002": {"avg": 80.5, "min": 60, "max": 101.25, "flag": "N"},
        "a34004": {"avg": 41.2, "min": 30.1, "max": 55.0, "flag": "N"},
        "a01007": {"avg": 1.8, "min": 0.0, "max": 4.2, "cou": None, "flag": "N"},
    }
    packet = period_packet(
        2051, "14010500000039", "39", "123456", datetime(2026, 11, 29, 10, 0), items, qn="20261129101000007"
    )
    frame = encode_one(packet)
    assert frame == MIN_2051 + b"%04X\r\n" % crc16(MIN_2051[6:])
    assert int(frame[2:6]) == len(MIN_2051) - 6
    back = period_items(decode(frame))
    assert back["a34002"] == {"cou": None, "min": 60.0, "avg": 80.5, "max": 101.25, "flag": "N"}
    assert back["a01007"]["min"] == 0.0


def test_hour_2061_with_cou_and_day_2031() -> None:
    items: Stats = {"w00000": {"avg": 12.5, "min": 10, "max": 15, "cou": 45.0, "flag": "N"}}
    hour = period_packet("2061", "MN1", 32, "123456", datetime(2026, 11, 29, 9), items, qn="1" * 17)
    assert hour.cp[1] == {
        "w00000-Cou": "45",
        "w00000-Min": "10",
        "w00000-Avg": "12.5",
        "w00000-Max": "15",
        "w00000-Flag": "N",
    }
    assert hour.cn == "2061" and hour.get("DataTime") == "20261129090000"
    day = period_packet("2031", "MN1", 32, "123456", datetime(2026, 11, 29), items, qn="1" * 17)
    assert decode(encode_one(day)).cn == "2031"
    with pytest.raises(ValueError):
        period_packet("2011", "MN1", 32, "123456", datetime(2026, 11, 29), items)
    with pytest.raises(ValueError):
        period_packet("2051", "MN1", 32, "123456", datetime(2026, 11, 29), {"w00000": {"mean": 1.0}})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        period_packet("2051", "MN1", 32, "123456", datetime(2026, 11, 29), {"w00000": {"avg": None}})


def test_builders_reject_bad_channels_and_flags() -> None:
    when = datetime(2026, 1, 1)
    with pytest.raises(ValueError):
        realtime_packet("MN1", 32, "pw", when, {"w01018-Rtd": (1.0, "N")})
    with pytest.raises(ValueError):
        realtime_packet("MN1", 32, "pw", when, {"w01018": (1.0, "X")})
    with pytest.raises(ValueError):
        realtime_packet("MN1", 32, "pw", when, {"w01018": (float("nan"), "N")})
    with pytest.raises(ValueError):  # naive time with a timezone to convert to is ambiguous
        realtime_packet("MN1", 32, "pw", when, {"w01018": (1.0, "N")}, tz=SH)


def test_replies_use_st_91_and_the_request_qn_pw_mn() -> None:
    request = decode(
        frame_of(
            "QN=20261129100500001;ST=32;CN=2061;PW=123456;MN=14010500000017;Flag=5;"
            "CP=&&BeginTime=20261129000000,EndTime=20261129100000&&"
        )
    )
    answer = encode_one(reply_9011(request, 1))
    assert answer == frame_of(
        "QN=20261129100500001;ST=91;CN=9011;PW=123456;MN=14010500000017;Flag=4;CP=&&QnRtn=1&&"
    )
    assert encode_one(reply_9012(request, 100)) == frame_of(
        "QN=20261129100500001;ST=91;CN=9012;PW=123456;MN=14010500000017;Flag=4;CP=&&ExeRtn=100&&"
    )
    assert reply_9012(request).get("ExeRtn") == "1"
    # An answer speaks 2017 (Flag=4), the one version spoken, also to a request of another version.
    for flag in (0b1001, 0b1101, 0b0001):
        assert reply_9011(Packet(st="32", cn="2061", pw="1", mn="M", flag=flag), 6).flag == 4
    assert ack_9014(Packet(st="32", cn="2011", pw="1", mn="M", flag=None)).flag == 4


# --- strict decoding -------------------------------------------------------------------------------

GOOD_SEGMENT = "QN=20160801085857223;ST=32;CN=2011;PW=123456;MN=MN01;Flag=4;CP=&&DataTime=20160801085857&&"


@pytest.mark.parametrize(
    ("frame", "error", "message"),
    [
        (b"#" + frame_of(GOOD_SEGMENT)[1:].replace(b"#", b"X", 1), Malformed, "'##'"),
        (b"##01a1" + frame_of(GOOD_SEGMENT)[6:], Malformed, "4 decimal digits"),
        (b"##0091" + frame_of(GOOD_SEGMENT)[6:], BadLength, "declared data segment length 91, actual 90"),
        (b"##2000" + frame_of(GOOD_SEGMENT)[6:], BadLength, "exceeds 1024"),
        (frame_of(GOOD_SEGMENT)[:-2], Malformed, "CRLF"),
        (frame_of(GOOD_SEGMENT)[:-1], Malformed, "CRLF"),
        (frame_of(GOOD_SEGMENT, crc="0000"), BadCrc, "CRC 0000 in frame"),
        (frame_of(GOOD_SEGMENT, crc="00G0"), Malformed, "4 hexadecimal digits"),
        (frame_of(GOOD_SEGMENT.replace("MN01", "MN\x01 ")), Malformed, "0x01 at data offset 50"),
        (frame_of(GOOD_SEGMENT.encode().replace(b"MN01", b"MN\xe9")), Malformed, "0xE9 at data offset 50"),
        (frame_of(GOOD_SEGMENT.replace("ST=32;", "")), Malformed, "ST is missing"),
        (frame_of(GOOD_SEGMENT.replace("ST=32;", "ST=32;ST=32;")), Malformed, "ST appears twice"),
        (frame_of(GOOD_SEGMENT.replace("ST=32;", "XX=1;ST=32;")), Malformed, "unknown header field 'XX'"),
        (frame_of(GOOD_SEGMENT.replace("ST=32;", "ST;")), Malformed, "has no '='"),
        (frame_of(GOOD_SEGMENT.replace("ST=32", "ST=320")), Malformed, "ST '320' is not 2 digits"),
        (frame_of(GOOD_SEGMENT.replace("CN=2011", "CN=211")), Malformed, "CN '211' is not 4 digits"),
        (frame_of(GOOD_SEGMENT.replace("QN=20160801085857223", "QN=2016")), BadQn, "QN '2016' is not 17 digits"),
        (frame_of(GOOD_SEGMENT.replace("MN=MN01", "MN=" + "M" * 25)), Malformed, "MN"),
        (frame_of(GOOD_SEGMENT.replace("Flag=4", "Flag=04")), Malformed, "Flag '04'"),
        (frame_of(GOOD_SEGMENT.replace("Flag=4", "Flag=256")), Malformed, "Flag 256 exceeds 255"),
        (frame_of(GOOD_SEGMENT.replace("Flag=4", "Flag=6")), Malformed, "D (split) bit"),
        (frame_of(GOOD_SEGMENT.replace("Flag=4", "Flag=4;PNUM=2;PNO=1")), Malformed, "D (split) bit"),
        (frame_of(GOOD_SEGMENT.replace("Flag=4", "Flag=6;PNUM=2")), Malformed, "PNUM and PNO"),
        (frame_of(GOOD_SEGMENT.replace("Flag=4", "Flag=6;PNUM=2;PNO=3")), Malformed, "PNO 3 exceeds PNUM 2"),
        (frame_of(GOOD_SEGMENT.replace("Flag=4", "Flag=6;PNUM=0;PNO=0")), Malformed, "PNUM '0'"),
        (frame_of(GOOD_SEGMENT.replace(";CP=&&", ";CP=&")), Malformed, "no 'CP=&&'"),
        (frame_of(GOOD_SEGMENT[:-2]), Malformed, "terminated"),
        (frame_of(GOOD_SEGMENT[:-1]), Malformed, "terminated"),
        (frame_of(GOOD_SEGMENT.replace(";CP", "CP")), Malformed, "separated by ';'"),
        (
            frame_of(GOOD_SEGMENT.replace("&&DataTime", "&&DataTime=1;;x=2&&DataTime")),
            Malformed,
            "'&' inside CP",
        ),
        (frame_of(GOOD_SEGMENT.replace("&&DataTime", "&&;DataTime")), Malformed, "CP group 1 is empty"),
        (frame_of(GOOD_SEGMENT.replace("5857&&", "5857;&&")), Malformed, "CP group 2 is empty"),
        (frame_of(GOOD_SEGMENT.replace("5857&&", "5857,x&&")), Malformed, "item 'x' has no '='"),
        (frame_of(GOOD_SEGMENT.replace("5857&&", "5857,a b=1&&")), Malformed, "key 'a b'"),
        (frame_of(GOOD_SEGMENT.replace("5857&&", "5857,a=1=2&&")), Malformed, "'=' inside the value"),
        (
            frame_of(GOOD_SEGMENT.replace("5857&&", "5857,DataTime=1&&")),
            Malformed,
            "key DataTime appears twice",
        ),
    ],
)
def test_decode_rejects_with_a_precise_error(frame: bytes, error: type[Hj212Error], message: str) -> None:
    with pytest.raises(error) as info:
        decode(frame)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_decode_errors_never_show_the_password() -> None:
    with pytest.raises(Malformed) as info:
        decode(frame_of(GOOD_SEGMENT.replace("PW=123456", "PW=s3cr3tpass")))
    assert "s3cr3t" not in str(info.value) and "PW" in str(info.value)


def test_decode_accepts_header_fields_in_any_order_and_empty_values() -> None:
    shuffled = "MN=MN01;PW=123456;ST=32;Flag=4;QN=20160801085857223;CN=2011;CP=&&w01012-Rtd=,w01012-Flag=D&&"
    packet = decode(frame_of(shuffled))
    assert packet.mn == "MN01" and packet.flag == 4
    assert realtime_items(packet) == {"w01012": (None, "D")}
    assert encode_one(packet) == frame_of(
        "QN=20160801085857223;ST=32;CN=2011;PW=123456;MN=MN01;Flag=4;CP=&&w01012-Rtd=,w01012-Flag=D&&"
    )


def test_missing_crlf_is_accepted_only_when_allowed() -> None:
    bare = STD_1062[:-2]
    with pytest.raises(Malformed):
        decode(bare)
    assert decode(bare, allow_missing_crlf=True) == decode(STD_1062)
    assert decode(STD_1062, allow_missing_crlf=True) == decode(STD_1062)


def test_get_float_rejects_non_numbers() -> None:
    packet = decode(frame_of(GOOD_SEGMENT.replace("5857&&", "5857;a-Rtd=1_0,b-Rtd=nan,c-Rtd=1e3&&")))
    with pytest.raises(Malformed):
        packet.get_float("a-Rtd")
    with pytest.raises(Malformed):
        packet.get_float("b-Rtd")
    assert packet.get_float("c-Rtd") == 1000.0
    assert packet.get_float("missing") is None


# --- encoding rules --------------------------------------------------------------------------------


def base_packet(**changes: object) -> Packet:
    fields: dict[str, object] = {
        "qn": "20260101000000000",
        "st": "32",
        "cn": "2011",
        "pw": "123456",
        "mn": "MN01",
        "flag": 4,
        "cp": [{"DataTime": "20260101000000"}],
    }
    fields.update(changes)
    return Packet(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"qn": "2026"},
        {"st": "3"},
        {"cn": "20111"},
        {"pw": "1234567"},
        {"pw": "12;4"},
        {"mn": ""},
        {"mn": "M" * 25},
        {"flag": 256},
        {"flag": 6},
        {"pnum": 2, "pno": 1},
        {"flag": 6, "pnum": 2, "pno": 3},
        {"cp": [{}]},
        {"cp": [{"a-Rtd": 1.5}]},
        {"cp": [{"a Rtd": "1"}]},
        {"cp": [{"a-Rtd": "1;2"}]},
        {"cp": [{"a-Rtd": "1&"}]},
        {"cp": [{"a-Rtd": "é"}]},
    ],
)
def test_encode_rejects_what_decode_would_not_accept(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        encode(base_packet(**changes))


def test_encode_error_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as info:
        encode(base_packet(pw="toolongsecret"))
    assert "toolongsecret" not in str(info.value)


def many_channels(count: int) -> dict[str, tuple[float | None, str]]:
    rng = random.Random(count)
    return {f"c{i:05d}": (round(rng.uniform(-1000, 1000), 3), rng.choice("NDTB")) for i in range(count)}


def test_long_packet_is_split_between_groups_and_reassembled() -> None:
    packet = realtime_packet("14010500000017", 32, "123456", datetime(2026, 11, 29, 10), many_channels(120))
    with pytest.raises(ValueError, match="use encode"):
        encode_one(packet)
    frames = encode(packet)
    assert len(frames) >= 3
    pieces = [decode(f) for f in frames]
    for number, (frame, piece) in enumerate(zip(frames, pieces, strict=True), start=1):
        assert len(frame) <= 1036 and int(frame[2:6]) <= 1024
        assert (piece.qn, piece.flag, piece.pnum, piece.pno) == (packet.qn, 4 | 2, len(frames), number)
        assert b";Flag=6;PNUM=%d;PNO=%d;CP=&&" % (len(frames), number) in frame
    # Groups are never cut: every piece holds whole <code>-Rtd,<code>-Flag groups, after the packet's
    # DataTime, which every piece repeats so that it can be read on its own.
    assert all(p.cp[0] == packet.cp[0] == {"DataTime": "20261129100000"} for p in pieces)
    assert [packet.cp[0]] + [g for p in pieces for g in p.cp[1:]] == packet.cp
    reassembler = Reassembler()
    results = [reassembler.add(p) for p in reversed(pieces)]
    assert results[:-1] == [None] * (len(pieces) - 1)
    whole = results[-1]
    assert whole is not None
    assert_same(whole, packet)
    assert realtime_items(whole) == many_channels(120)
    assert reassembler.pending == 0


def test_group_longer_than_a_packet_is_cut_between_items() -> None:
    group = {f"k{i:04d}": "v" * 20 for i in range(100)}  # ~2600 characters in one group
    packet = base_packet(cp=[{"DataTime": "20260101000000"}, group])
    frames = encode(packet)
    assert len(frames) == 3
    reassembler = Reassembler()
    whole = [r for r in (reassembler.add(decode(f)) for f in frames) if r is not None][0]
    # Same items in the same order; the long group comes back as several consecutive groups.
    assert [item for g in whole.cp for item in g.items()] == [item for g in packet.cp for item in g.items()]
    assert len(whole.cp) > 2
    with pytest.raises(ValueError, match="longer than a whole packet"):
        encode(base_packet(cp=[{"k": "v" * 2000}]))


def test_a_bad_qn_says_what_the_rest_of_the_packet_is_but_only_when_the_rest_is_good() -> None:
    """A request whose only fault is its QN can be answered QnRtn 7; one with another fault cannot."""
    with pytest.raises(BadQn) as caught:
        decode(frame_of(GOOD_SEGMENT.replace("QN=20160801085857223", "QN=2016-08-01")))
    assert caught.value.packet is not None
    assert (caught.value.packet.qn, caught.value.packet.cn, caught.value.packet.mn) == (None, "2011", "MN01")
    with pytest.raises(Malformed) as caught:
        decode(frame_of(GOOD_SEGMENT.replace("QN=20160801085857223", "QN=2016").replace("ST=32", "ST=320")))
    assert not isinstance(caught.value, BadQn)


def test_an_over_long_pw_or_mn_says_what_the_rest_of_the_packet_is_for_a_refusal() -> None:
    """A request whose PW is over 6 or MN over 24 characters (a mistyped password) can be answered QnRtn 3 / 4:
    the error carries the rest of the packet, the faulty fields named; the password never in the message."""
    segment = GOOD_SEGMENT.replace("PW=123456", "PW=s3cr3tpass").replace("MN=MN01", "MN=" + "M" * 25)
    with pytest.raises(BadHeader) as caught:
        decode(frame_of(segment))
    assert isinstance(caught.value, Malformed) and caught.value.fields == {"PW", "MN"}
    assert caught.value.packet is not None and (caught.value.packet.qn, caught.value.packet.cn) == (
        "20160801085857223", "2011")
    assert "s3cr3t" not in str(caught.value) and "PW" in str(caught.value)
    # With a bad QN as well: the QN is named and left out.
    with pytest.raises(BadHeader) as caught:
        decode(frame_of(segment.replace("QN=20160801085857223", "QN=2016")))
    assert caught.value.fields == {"PW", "MN", "QN"} and caught.value.packet.qn is None
    # Any other fault besides: no packet to answer (as for a bad QN).
    with pytest.raises(Malformed) as caught:
        decode(frame_of(segment.replace("Flag=4", "Flag=04")))
    assert not isinstance(caught.value, BadHeader)


def test_split_needs_qn_and_flag() -> None:
    big = [{f"k{i}": "v" * 50} for i in range(40)]
    with pytest.raises(ValueError, match="QN and a Flag"):
        encode(base_packet(qn=None, cp=big))
    with pytest.raises(ValueError, match="QN and a Flag"):
        encode(base_packet(flag=None, cp=big))


def test_smaller_max_data_len_gives_more_pieces() -> None:
    packet = realtime_packet("MN1", 32, "pw", datetime(2026, 1, 1), many_channels(30), qn="1" * 17)
    frames = encode(packet, max_data_len=200)
    assert all(int(f[2:6]) <= 200 for f in frames)
    reassembler = Reassembler()
    out = [reassembler.add(decode(f, max_data_len=200)) for f in frames]
    assert out[-1] == packet


def test_reassembler_ignores_repeats_and_rejects_contradictions() -> None:
    packet = realtime_packet("MN1", 32, "pw", datetime(2026, 1, 1), many_channels(60), qn="1" * 17)
    pieces = [decode(f) for f in encode(packet)]
    assert len(pieces) >= 2
    reassembler = Reassembler()
    assert reassembler.add(pieces[0]) is None
    assert reassembler.add(pieces[0]) is None  # at-least-once delivery: a repeat is harmless
    other = decode(encode_one(Packet(**{**pieces[0].__dict__, "cp": [{"x": "1"}]})))
    with pytest.raises(ReassemblyError, match="two different pieces"):
        reassembler.add(other)
    assert reassembler.pending == 0
    assert reassembler.add(pieces[0]) is None
    wrong_total = Packet(**{**pieces[1].__dict__, "pnum": 9, "pno": 2})
    with pytest.raises(ReassemblyError, match="disagrees"):
        reassembler.add(wrong_total)
    unsplit = base_packet()
    assert reassembler.add(unsplit) is unsplit
    with pytest.raises(ReassemblyError):
        reassembler.add(Packet(**{**pieces[0].__dict__, "qn": None}))


def test_reassembler_memory_is_bounded() -> None:
    reassembler = Reassembler(max_pending=3)
    for i in range(10):
        piece = base_packet(qn=f"{i:017d}", flag=6, pnum=2, pno=1)
        assert reassembler.add(piece) is None
    assert reassembler.pending == 3 and reassembler.dropped == 7


def test_reassembler_holds_a_bounded_number_of_pieces() -> None:
    """PNUM 9999 at 16 packets held 1.4 GB of pieces that a platform sent in seconds (audit Q): at most
    `max_pieces` pieces in all, the oldest packet dropped first; a PNUM above it is refused at once."""
    reassembler = Reassembler(max_pending=16, max_pieces=10)
    with pytest.raises(ReassemblyError, match="PNUM 9999"):
        reassembler.add(base_packet(qn="1" * 17, flag=6, pnum=9999, pno=1))
    for i in range(4):
        for pno in range(1, 5):
            assert reassembler.add(base_packet(qn=f"{i:017d}", flag=6, pnum=5, pno=pno)) is None
    assert reassembler.pending == 2 and reassembler.dropped == 2, "16 pieces arrived: the two oldest packets went"
    assert reassembler.add(base_packet(qn=f"{3:017d}", flag=6, pnum=5, pno=5)) is not None, "the newest completes"
    assert reassembler.pending == 1


# --- numbers and times -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decimals", "text"),
    [
        (23.4, None, "23.4"),
        (5.0, None, "5"),
        (5, None, "5"),
        (-0.0, None, "0"),
        (0.1 + 0.2, None, "0.3"),  # 15 significant digits, as the JSON payload and period statistics
        (0.12345678901234568, None, "0.123456789012346"),
        (12345678901234568.0, None, "12345678901234600"),
        (12345678901234567, None, "12345678901234567"),  # an int (a counter) stays exact
        (1e-7, None, "0.0000001"),
        (1.5e16, None, "15000000000000000"),
        (-2.5e-5, None, "-0.000025"),
        (23.399999618530273, 3, "23.4"),
        (1234.5678, 2, "1234.57"),
        (10**20, None, "100000000000000000000"),
    ],
)
def test_format_number_is_plain_decimal(value: float, decimals: int | None, text: str) -> None:
    assert format_number(value, decimals) == text


def test_format_number_refuses_what_hj212_cannot_say() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError):
            format_number(bad)
    with pytest.raises(TypeError):
        format_number(True)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_format_number_round_trips_without_exponent(value: float) -> None:
    text = format_number(value)
    assert "e" not in text and "E" not in text
    assert not ("." in text and text.endswith("0"))
    rounded = float(f"{value:.15g}")
    assert parse_number(text) == (rounded if math.isfinite(rounded) else value), "to 15 significant digits"


def test_times_are_station_local() -> None:
    utc = datetime(2026, 11, 29, 2, 0, 5, 123456, tzinfo=UTC)
    assert format_time(utc, SH) == "20261129100005"
    assert make_qn(utc, SH) == "20261129100005123"
    assert make_qn(datetime(2016, 8, 1, 8, 58, 57, 223000)) == "20160801085857223"
    assert parse_time("20261129100005", SH) == datetime(2026, 11, 29, 10, 0, 5, tzinfo=SH)
    assert parse_time("20261129100005", SH).astimezone(UTC) == utc.replace(microsecond=0)
    assert parse_time("20261129100005123", SH).microsecond == 123000
    for bad in ("2026112910000", "20261329100005", "2026-11-29 10:00", "20260230000000"):
        with pytest.raises(Malformed):
            parse_time(bad, SH)
    with pytest.raises(ValueError):
        format_time(datetime(2026, 1, 1), SH)


def test_qn_source_is_strictly_increasing_even_if_the_clock_steps_back() -> None:
    ticks = iter([1764381605.1234, 1764381605.1234, 1764381604.0, 1764381606.5])
    source = QnSource(SH, clock=lambda: next(ticks))
    qns = [source() for _ in range(4)]
    assert qns == ["20251129100005123", "20251129100005124", "20251129100005125", "20251129100006500"]


# --- code tables -----------------------------------------------------------------------------------


def test_codec_imports_only_stdlib_yaml_and_model() -> None:
    tree = ast.parse(Path(hj212.__file__).read_text("utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    allowed = set(sys.stdlib_module_names) | {"yaml", "agent.model"}
    assert {name for name in imported if name.split(".")[0] not in allowed and name not in allowed} == set()


def test_code_tables_load_from_a_given_file(tmp_path: Path) -> None:
    path = tmp_path / "codes.yaml"
    path.write_text(
        "tables:\n  commands:\n    standard: HJ 212-2025\n    year: 2025\n    codes: {9015: {meaning: x}}\n"
    )
    tables = hj212.codes(path)
    assert tables["commands"].standard == "HJ 212-2025" and tables["commands"].meaning("9015") == "x"
    path.write_text("tables:\n  commands: {codes: {}}\n")
    with pytest.raises(ValueError, match="standard, year and codes"):
        hj212.codes(str(path))


def test_code_tables_name_their_standard_and_agree_with_the_model() -> None:
    tables = hj212.codes()
    assert set(tables) >= {"pollutants", "systems", "commands", "data_flags", "qn_rtn", "exe_rtn"}
    for table in tables.values():
        assert table.standard == "HJ 212-2017" and table.year == 2017 and table.codes
    assert set(tables["data_flags"].codes) == set(FLAGS)
    assert tables["pollutants"].codes["w01018"]["unit"] == "mg/L"
    assert tables["pollutants"].meaning("a34004") == "PM2.5"
    assert tables["systems"].meaning("91") == "system interaction"
    for cn in ("2011", "2051", "2061", "2031", "9011", "9012", "9014"):
        assert cn in tables["commands"].codes
    assert tables["qn_rtn"].meaning("9") == "CRC error"
    assert tables["exe_rtn"].meaning("100") == "no data"
    assert tables["pollutants"].meaning("nope") is None


# --- property tests: round trip, corruption --------------------------------------------------------

TOKEN = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ";,&=")


def fixed_digits(n: int) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=n, max_size=n)


keys = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
values = st.text(TOKEN + " ", max_size=16)
groups = st.dictionaries(keys, values, min_size=1, max_size=6)


@st.composite
def packets(draw: st.DrawFn, min_groups: int = 0, max_groups: int = 8, splittable: bool = False) -> Packet:
    return Packet(
        qn=draw(fixed_digits(17) if splittable else st.none() | fixed_digits(17)),
        st=draw(fixed_digits(2)),
        cn=draw(fixed_digits(4)),
        pw=draw(st.text(TOKEN, max_size=6)),
        mn=draw(st.text(TOKEN, min_size=1, max_size=24)),
        flag=draw(
            st.integers(0, 255).map(lambda f: f & ~2)
            if splittable
            else st.none() | st.integers(0, 255).map(lambda f: f & ~2)
        ),
        cp=draw(st.lists(groups, min_size=min_groups, max_size=max_groups)),
    )


channel_values = st.one_of(
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.integers(-(10**9), 10**9),
)
channel_sets = st.dictionaries(
    st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=10),
    st.tuples(channel_values, st.sampled_from(sorted(FLAGS))),
    max_size=80,
)


@given(packets())
def test_decode_encode_round_trip(packet: Packet) -> None:
    frames = encode(packet)
    assert len(frames) == 1
    assert_same(decode(frames[0]), packet)


@settings(max_examples=60, deadline=None)
@given(packets(min_groups=40, max_groups=160, splittable=True))
def test_round_trip_of_packets_big_enough_to_split(packet: Packet) -> None:
    frames = encode(packet)
    reassembler = Reassembler()
    results = []
    for frame in frames:
        assert len(frame) <= 1036
        results.append(reassembler.add(decode(frame)))
    assert results[:-1] == [None] * (len(frames) - 1)
    whole = results[-1]
    assert whole is not None
    assert_same(whole, packet)


@settings(max_examples=60, deadline=None)
@given(channel_sets, st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 1, 1)))
def test_realtime_packets_of_random_channels_round_trip(
    items: dict[str, tuple[float | int | None, str]], when: datetime
) -> None:
    packet = realtime_packet("14010500000017", 32, "123456", when, items)
    reassembler = Reassembler()
    out = [reassembler.add(decode(f)) for f in encode(packet)]
    whole = out[-1]
    assert whole is not None
    assert_same(whole, packet)
    assert realtime_items(whole) == {
        code: (None if v is None else float(v if isinstance(v, int) else f"{v:.15g}"), f)
        for code, (v, f) in items.items()
    }
    assert whole.data_time(SH) == when.replace(microsecond=0, tzinfo=SH)


@pytest.mark.parametrize("frame", [STD_1062, STD_9014])
def test_every_single_byte_change_of_the_standard_examples_is_detected(frame: bytes) -> None:
    original = decode(frame)
    for index in range(len(frame)):
        for new in range(256):
            if new == frame[index]:
                continue
            changed = frame[:index] + bytes([new]) + frame[index + 1 :]
            try:
                decoded = decode(changed)
            except Hj212Error:
                continue
            assert len(frame) - 6 <= index < len(frame) - 2  # only a CRC letter's case may change
            assert decoded == original


@settings(max_examples=300)
@given(packets(max_groups=4), st.data())
def test_any_single_changed_byte_is_detected(packet: Packet, data: st.DataObject) -> None:
    frame = encode_one(packet)
    index = data.draw(st.integers(0, len(frame) - 1))
    new = data.draw(st.integers(0, 255).filter(lambda b: b != frame[index]))
    changed = frame[:index] + bytes([new]) + frame[index + 1 :]
    try:
        decoded = decode(changed)
    except Hj212Error:
        return
    # The only accepted change: the case of a CRC hex letter (same CRC, same packet).
    assert len(frame) - 6 <= index < len(frame) - 2
    assert chr(new).upper() == chr(frame[index]).upper()
    assert_same(decoded, packet)


# --- the stream reader -----------------------------------------------------------------------------


def test_reader_finds_frames_split_byte_by_byte() -> None:
    reader = FrameReader()
    out: list[Packet | Hj212Error] = []
    for byte in b"noise##" + STD_1062 + b"\x00\xff#" + STD_9014:
        out.extend(reader.feed(bytes([byte])))
    assert out == [decode(STD_1062), decode(STD_9014)]
    assert reader.frames_ok == 2 and reader.frames_bad == 0 and reader.bytes_dropped == 10
    assert reader.buffered == 0


def test_false_header_in_noise_does_not_hold_back_the_next_frame() -> None:
    reader = FrameReader()
    out = reader.feed(b"##0900\x10garbage" + STD_1062)
    assert len(out) == 2 and isinstance(out[0], Malformed) and out[1] == decode(STD_1062)
    # A printable false header is given up at the CRLF of the frame it covers.
    out = reader.feed(b"xx##0500abc" + STD_9014)
    assert isinstance(out[0], Malformed) and out[1:] == [decode(STD_9014)]


def test_reader_reports_bad_frames_and_resynchronises() -> None:
    bad_crc = STD_1062.replace(b"1C80", b"1C81")
    too_long = b"##2000" + b"x" * 50
    reader = FrameReader()
    out = reader.feed(bad_crc + too_long + STD_9014)
    assert [type(x) for x in out] == [BadCrc, BadLength, Packet]
    assert reader.frames_bad == 2 and reader.frames_ok == 1


def test_reader_memory_is_bounded() -> None:
    reader = FrameReader()
    reader.feed(b"##1024" + b"x" * 1020)  # a candidate frame waiting for its end
    assert reader.buffered == 1026
    for _ in range(100):
        reader.feed(b"y" * 1000)  # printable junk: the candidate fails, then all is dropped
    assert reader.buffered <= 1036
    reader.feed(bytes(random.Random(1).randbytes(100_000)))
    assert reader.buffered <= 1036
    assert reader.feed(STD_1062) == [decode(STD_1062)]


def test_reader_strict_and_lenient_crlf() -> None:
    strict = FrameReader()
    out = strict.feed(STD_1062[:-2] + STD_9014)
    assert [type(x) for x in out] == [Malformed, Packet]
    lenient = FrameReader(allow_missing_crlf=True)
    assert lenient.feed(STD_1062[:-2]) == [decode(STD_1062)]  # emitted at once, no waiting
    assert lenient.feed(b"\r") == [] and lenient.feed(b"\n" + STD_9014[:-2]) == [decode(STD_9014)]
    assert lenient.feed(STD_1062) == [decode(STD_1062)]
    assert lenient.frames_bad == 0 and lenient.bytes_dropped == 0


def test_reader_allowing_lf_takes_a_frame_ending_in_lf_alone_but_never_one_without_an_end() -> None:
    """Some platform software ends its packets with LF: taken, byte by byte or whole, with CRLF frames
    between; a frame ending in CR alone or in nothing (the next frame's ``##`` right after its CRC) is
    still refused, and so is a bad CRC whatever the ending."""
    reader = FrameReader(allow_lf=True)
    stream = STD_1062[:-2] + b"\n" + STD_9014 + STD_1062[:-2] + b"\n"
    out = []
    for i in range(len(stream)):
        out += reader.feed(stream[i : i + 1])
    assert out == [decode(STD_1062), decode(STD_9014), decode(STD_1062)]
    assert reader.feed(stream) == out
    assert reader.frames_bad == 0 and reader.bytes_dropped == 0
    bad_crc = STD_9014[:-6] + b"0000\n"
    assert [type(x) for x in reader.feed(STD_1062[:-2] + b"\r" + STD_9014)] == [Malformed, Packet]
    assert [type(x) for x in reader.feed(STD_1062[:-2] + STD_9014)] == [Malformed, Packet]
    assert [type(x) for x in reader.feed(bad_crc + STD_9014)] == [BadCrc, Packet]


def test_a_bad_crc_frame_holding_bytes_over_0x7f_still_says_its_header_for_a_qnrtn_9_answer() -> None:
    """Line noise flips bits, so a damaged request often holds both a bad CRC and bytes over 0x7F: its
    header (QN, MN, CN) was not read, and the request was dropped unanswered instead of answered QnRtn 9
    (send it again). The bytes over 0x7F are read as '?', as for `NotAscii`; the packet stays untrusted."""
    segment = ("QN=20261129120000031;ST=32;CN=1011;PW=123456;MN=14010500000017;Flag=5;"
               "CP=&&SystemTime=2026112912000\u00e9&&")
    for data in (segment.encode("utf-8"), segment.encode("latin-1")):
        with pytest.raises(BadCrc) as caught:
            decode(frame_of(data, crc="0000"))
        assert caught.value.packet is not None
        assert (caught.value.packet.qn, caught.value.packet.cn, caught.value.packet.mn) == (
            "20261129120000031", "1011", "14010500000017")


def test_lenient_reader_ends_a_frame_at_a_lone_cr_or_lf_or_the_next_frame_and_refuses_any_other_byte() -> None:
    lenient = FrameReader(allow_missing_crlf=True)
    stream = STD_1062[:-2] + b"\n" + STD_9014[:-2] + b"\r" + STD_1062[:-2] + STD_9014[:-2]
    out = []
    for i in range(len(stream)):  # byte by byte: a frame's end is decided whatever the reads' sizes
        out += lenient.feed(stream[i : i + 1])
    assert out == [decode(STD_1062), decode(STD_9014), decode(STD_1062), decode(STD_9014)]
    assert lenient.frames_bad == 0 and lenient.bytes_dropped == 0
    # Any other byte right after the CRC: the length field went wrong (the CRC lets 1 in 256 through).
    assert [type(x) for x in lenient.feed(STD_1062[:-2] + b"0" + STD_9014)] == [BadLength, Packet]


corruptions = st.sampled_from(["byte", "truncate"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], list[Packet]]:
    """Segments of a byte stream (good frames, garbage, corrupted frames) and the good packets in order."""
    segments: list[bytes] = []
    expected: list[Packet] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["good", "good", "garbage", "corrupt"]))
        if kind == "garbage":
            segments.append(draw(st.binary(min_size=1, max_size=80)))
            continue
        packet = draw(packets(max_groups=4))
        frame = encode_one(packet)
        if kind == "good":
            segments.append(frame)
            expected.append(packet)
        elif draw(corruptions) == "truncate":
            # Cut at least into the CRC: a frame missing only its CRLF would be completed by any
            # CRLF that follows, and would rightly be a good frame of the stream.
            segments.append(frame[: draw(st.integers(1, len(frame) - 3))])
        else:
            index = draw(st.integers(0, len(frame) - 1))
            new = (frame[index] + draw(st.integers(1, 255))) % 256
            if len(frame) - 6 <= index < len(frame) - 2 and chr(new).upper() == chr(frame[index]).upper():
                new = ord("g")  # a case flip of a CRC letter is the same frame: make it non-hex
            segments.append(frame[:index] + bytes([new]) + frame[index + 1 :])
    return segments, expected


def fed_in_chunks(reader: FrameReader, data: bytes, chunk_sizes: list[int]) -> list[Packet | Hj212Error]:
    """What `reader` yields for `data` fed in reads of `chunk_sizes` (in turn, again and again)."""
    out: list[Packet | Hj212Error] = []
    pos = 0
    sizes = iter(chunk_sizes * (len(data) // len(chunk_sizes) + 1))
    while pos < len(data):
        size = next(sizes)
        out.extend(reader.feed(data[pos : pos + size]))
        pos += size
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.lists(st.integers(1, 200), min_size=1, max_size=50))
def test_reader_yields_exactly_the_good_packets_in_order(
    stream: tuple[list[bytes], list[Packet]], chunk_sizes: list[int]
) -> None:
    segments, expected = stream
    data = b"".join(segments)
    reader = FrameReader()
    out = fed_in_chunks(reader, data, chunk_sizes)
    # A truncated or length-corrupted frame at the very end may still wait for bytes: close the
    # stream with bytes that cannot be part of any frame.
    out.extend(reader.feed(b"\x00" * 1100))
    assert reader.buffered == 0
    got = [x for x in out if isinstance(x, Packet)]
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert_same(a, b)
    assert all(isinstance(x, Packet | Hj212Error) for x in out)

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(packets(max_groups=3), st.sampled_from([b"\r\n", b"\n", b"\r", b""])), min_size=1, max_size=8),
    st.lists(st.integers(1, 120), min_size=1, max_size=30),
)
def test_lenient_reader_takes_every_packet_once_whatever_its_ending_and_the_reads(
    items: list[tuple[Packet, bytes]], chunk_sizes: list[int]
) -> None:
    """Valid packets ending in CRLF, LF, CR or nothing, split at any points: each decoded exactly once,
    in order, nothing counted as garbage or refused."""
    data = b"".join(encode_one(packet)[:-2] + ending for packet, ending in items)
    reader = FrameReader(allow_missing_crlf=True)
    out = fed_in_chunks(reader, data, chunk_sizes)
    assert all(isinstance(x, Packet) for x in out), out
    assert len(out) == len(items)
    for got, (packet, _ending) in zip(out, items, strict=True):
        assert_same(got, packet)
    assert reader.frames_bad == 0 and reader.bytes_dropped == 0


# --- fuzz ------------------------------------------------------------------------------------------


def test_fuzz_reader_and_decode_raise_nothing_but_hj212_errors() -> None:
    rng = random.Random(20171)
    started = time.monotonic()
    base = [
        STD_1062,
        STD_9014,
        encode_one(realtime_packet("14010500000017", 32, "123456", datetime(2026, 1, 1), many_channels(12))),
        encode_one(base_packet()),
        *encode(realtime_packet("14010500000017", 32, "123456", datetime(2026, 1, 1), many_channels(40))),
    ]
    printable = bytes(range(0x20, 0x7F))
    outcomes: dict[str, int] = {}

    def try_decode(candidate: bytes) -> None:
        try:
            result = decode(candidate, allow_missing_crlf=rng.random() < 0.3)
        except Hj212Error as exc:  # anything else fails the test
            name = type(exc).__name__
        else:
            assert isinstance(result, Packet)
            name = "ok"
        outcomes[name] = outcomes.get(name, 0) + 1

    def feed_all(reader: FrameReader, stream: bytes) -> int:
        packets_out = pos = 0
        while pos < len(stream):
            size = rng.choice((1, 7, 64, 512, 4096, 65536))
            for item in reader.feed(stream[pos : pos + size]):
                assert isinstance(item, Packet | Hj212Error)
                packets_out += isinstance(item, Packet)
            pos += size
            assert reader.buffered <= 1036
        return packets_out

    def mutated(frame: bytes) -> bytes:
        data = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            i = rng.randrange(len(data))
            if action < 0.5:
                data[i] = rng.randrange(256) if rng.random() < 0.5 else rng.choice(printable)
            elif action < 0.75:
                del data[i]
            else:
                data.insert(i, rng.choice(b"#;,=&\r\n0123456789"))
        return bytes(data)

    def resealed(frame: bytes) -> bytes:
        """Mutate the data segment and recompute length and CRC, to drive the syntax parser."""
        segment = bytearray(frame[6:-6])
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(segment))
            segment[i] = rng.choice(b";,=&#-_ aZ09\x00\xff")
        return b"##%04d" % len(segment) + bytes(segment) + b"%04X\r\n" % crc16(bytes(segment))

    # 1. 1,000,000 purely random bytes through the reader, and random windows of them through decode
    #    (half of them behind a plausible '##dddd' header so that the deeper checks run).
    noise = rng.randbytes(1_000_000)
    feed_all(FrameReader(), noise)
    feed_all(FrameReader(allow_missing_crlf=True), noise)
    pos = 0
    while pos < len(noise):
        window = noise[pos : pos + rng.randint(0, 1100)]
        pos += len(window) + 1
        try_decode(window if rng.random() < 0.5 else b"##%04d" % max(len(window) - 6, 0) + window)

    # 2. A stream of at least 1,000,000 bytes: noise, good, mutated, resealed and truncated frames,
    #    false headers.
    parts: list[bytes] = []
    total = good_in_stream = 0
    while total < 1_000_000:
        choice = rng.random()
        frame = rng.choice(base)
        if choice < 0.2:
            part = rng.randbytes(rng.randint(1, 1000))
        elif choice < 0.4:
            part, good_in_stream = frame, good_in_stream + 1
        elif choice < 0.6:
            part = mutated(frame)
        elif choice < 0.8:
            part = resealed(frame)
        elif choice < 0.95:
            part = frame[: rng.randrange(1, len(frame))]
        else:
            junk = bytes(rng.choice(printable) for _ in range(rng.randint(0, 50)))
            part = b"##%04d" % rng.randrange(10000) + junk
        parts.append(part)
        total += len(part)
    stream = b"".join(parts)
    # Every intact frame is found (a mutated one may pass the 256-value CRC and count as well).
    assert feed_all(FrameReader(), stream) >= good_in_stream
    feed_all(FrameReader(allow_missing_crlf=True), stream)

    # 3. decode() on 2,000,000 bytes of mutated and resealed frames.
    decoded_bytes = 0
    while decoded_bytes < 2_000_000:
        candidate = (mutated if rng.random() < 0.5 else resealed)(rng.choice(base))
        try_decode(candidate)
        decoded_bytes += len(candidate)
    # The fuzz reached every outcome (it is not just bouncing off the '##' check).
    assert {"ok", "Malformed", "BadLength", "BadCrc"} <= set(outcomes)
    assert outcomes["ok"] > 100 and outcomes["BadCrc"] > 100
    assert time.monotonic() - started < 60  # ~2 s on a laptop; the brief's budget is 20 s


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_reader_never_raises_on_arbitrary_chunks(chunks: list[bytes]) -> None:
    reader = FrameReader()
    for chunk in chunks:
        assert all(isinstance(x, Packet | Hj212Error) for x in reader.feed(chunk))
        assert reader.buffered <= 1036


def test_period_data_time_is_the_period_start() -> None:
    end = datetime(2026, 11, 29, 10, 10, tzinfo=SH)
    start = end - timedelta(minutes=10)
    packet = period_packet("2051", "MN1", 32, "pw", start, {"w01018": {"avg": 1.0, "flag": "N"}}, qn="1" * 17)
    assert packet.get("DataTime") == "20261129100000"


def _raw_frame(segment: bytes) -> bytes:
    return b"##%04d" % len(segment) + segment + b"%04X\r\n" % crc16(segment)


@pytest.mark.parametrize("encoding", ["utf-8", "gbk"])
def test_a_frame_with_text_that_is_not_ascii_is_recognised_when_allowed(encoding):
    """A packet from a platform holding Chinese text (HJ 212-2017 is said to write Chinese in UTF-8; GBK is
    seen in the field): its length counts bytes and its CRC is over the bytes. With `allow_non_ascii` (the TCP
    uplink) such a frame is taken apart as a NotAscii error carrying what its ASCII says (other bytes read as
    '?') and the header fields holding such text, so a request can be refused; without it (a serial line,
    where bytes over 0x7F are noise) it is Malformed, as before."""
    segment = "QN=20261129120000081;ST=32;CN=1011;PW=密码;MN=14010500000017;Flag=5;CP=&&PolId=化学&&".encode(encoding)
    frame = _raw_frame(segment)
    with pytest.raises(NotAscii) as caught:
        decode(frame, allow_non_ascii=True)
    error = caught.value
    assert error.packet is not None and (error.packet.qn, error.packet.cn) == ("20261129120000081", "1011")
    assert error.fields == frozenset({"PW"}) and error.utf8 == (encoding == "utf-8")
    assert error.offset == segment.index(b"PW=") + 3 and "密" not in str(error)
    with pytest.raises(Malformed) as strict:
        decode(frame)
    assert not isinstance(strict.value, NotAscii)
    good = encode_one(Packet(qn="20261129120000082", st="32", cn="1011", pw="123456", mn="M1", cp=[]))
    items = FrameReader(allow_non_ascii=True).feed(frame + good)
    assert [type(item).__name__ for item in items] == ["NotAscii", "Packet"]
    assert [type(item).__name__ for item in FrameReader().feed(frame + good)][-1] == "Packet"
    with pytest.raises(Malformed) as control:  # a control byte is never text
        decode(_raw_frame(segment.replace(b"PolId", b"Pol\x01d")), allow_non_ascii=True)
    assert not isinstance(control.value, NotAscii)
