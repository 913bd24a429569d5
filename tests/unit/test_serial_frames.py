"""The serial frame layer (drivers.serial_frames): vectors written out by hand, resynchronisation
properties over noisy split streams, a fuzz run per reader, and the choice of an interval's frame."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drivers.serial_frames import (
    PMS5003_ACTIVE_MODE,
    PMS5003_CHANNELS,
    PMS5003_PASSIVE_MODE,
    PMS5003_PASSIVE_READ,
    PMS5003_SLEEP,
    PMS5003_UNITS,
    PMS5003_WAKE,
    SDS011_CHANNELS,
    SDS011_UNITS,
    Frame,
    FrameError,
    FrameReader,
    LatestInInterval,
    Pms5003Reader,
    Sds011Reader,
    decode_pms5003,
    decode_sds011,
    encode_pms5003,
    encode_sds011,
    latest_in_interval,
    make_reader,
    pms5003_command,
)

# --------------------------------------------------------------------------------------------------
# Vectors
# --------------------------------------------------------------------------------------------------

PMS_VECTOR = bytes(
    [
        0x42, 0x4D,  # header "BM"
        0x00, 0x1C,  # length 28 = 13 words + checksum
        0x00, 0x0A,  # PM1.0 CF=1         10
        0x00, 0x10,  # PM2.5 CF=1         16
        0x00, 0x14,  # PM10  CF=1         20
        0x00, 0x0A,  # PM1.0 atmospheric  10
        0x00, 0x0F,  # PM2.5 atmospheric  15
        0x00, 0x13,  # PM10  atmospheric  19
        0x07, 0x8F,  # > 0.3 um / 0.1 L   1935
        0x02, 0x25,  # > 0.5 um           549
        0x00, 0x60,  # > 1.0 um           96
        0x00, 0x04,  # > 2.5 um           4
        0x00, 0x02,  # > 5.0 um           2
        0x00, 0x00,  # > 10 um            0
        0x97, 0x00,  # reserved (firmware version 0x97, error 0x00)
        # checksum, sum of bytes 0..29:
        # 0x42+0x4D = 66+77 = 143; +0x1C (28) = 171; +0x0A+0x10+0x14 (10+16+20) = 217;
        # +0x0A+0x0F+0x13 (10+15+19) = 261; +0x07+0x8F (7+143) = 411; +0x02+0x25 (2+37) = 450;
        # +0x60 (96) = 546; +0x04 = 550; +0x02 = 552; +0x97 (151) = 703 = 0x02BF
        0x02, 0xBF,
    ]
)  # fmt: skip
PMS_VECTOR_VALUES = {
    "pm1_cf1": 10.0,
    "pm25_cf1": 16.0,
    "pm10_cf1": 20.0,
    "a34005": 10.0,
    "a34004": 15.0,
    "a34002": 19.0,
    "n0_3": 1935.0,
    "n0_5": 549.0,
    "n1_0": 96.0,
    "n2_5": 4.0,
    "n5_0": 2.0,
    "n10": 0.0,
}

# AA C0 | PM2.5 D4 04 -> 0x04D4 = 1236 -> 123.6 | PM10 3A 0A -> 0x0A3A = 2618 -> 261.8 | id A1 60 |
# checksum: 0xD4+0x04+0x3A+0x0A+0xA1+0x60 = 212+4+58+10+161+96 = 541 = 2*256 + 29 -> 29 = 0x1D | AB
SDS_VECTOR = bytes.fromhex("AA C0 D4 04 3A 0A A1 60 1D AB")
SDS_VECTOR_VALUES = {"a34004": 123.6, "a34002": 261.8}

# Answers of the sensors to setting commands: recognised and skipped, never errors.
PMS_PASSIVE_ACK = bytes.fromhex("42 4D 00 04 E1 00 01 74")  # 0x42+0x4D+0x04+0xE1 = 0x0174
SDS_REPLY = bytes.fromhex("AA C5 02 00 00 00 A1 60 03 AB")  # 0x02+0xA1+0x60 = 0x103 -> 0x03


def test_pms5003_vector_decodes_to_the_written_values() -> None:
    assert decode_pms5003(PMS_VECTOR) == PMS_VECTOR_VALUES
    assert list(decode_pms5003(PMS_VECTOR)) == list(PMS5003_CHANNELS)


def test_sds011_vector_decodes_to_the_written_values() -> None:
    assert decode_sds011(SDS_VECTOR) == SDS_VECTOR_VALUES


def test_encoders_reproduce_the_vectors() -> None:
    assert encode_pms5003(PMS_VECTOR_VALUES, reserved=0x9700) == PMS_VECTOR
    assert encode_sds011(123.6, 261.8, id=0xA160) == SDS_VECTOR


def test_command_frames_match_the_datasheet_bytes() -> None:
    assert PMS5003_PASSIVE_MODE == bytes.fromhex("42 4D E1 00 00 01 70")
    assert PMS5003_PASSIVE_READ == bytes.fromhex("42 4D E2 00 00 01 71")
    assert PMS5003_ACTIVE_MODE == bytes.fromhex("42 4D E1 00 01 01 71")
    assert PMS5003_SLEEP == bytes.fromhex("42 4D E4 00 00 01 73")
    assert PMS5003_WAKE == bytes.fromhex("42 4D E4 00 01 01 74")
    assert pms5003_command(0xE1, 0x1234) == bytes.fromhex("42 4D E1 12 34 01 B6")
    with pytest.raises(ValueError):
        pms5003_command(0x100)


def test_channel_names_are_valid_and_units_known() -> None:
    for ch in (*PMS5003_CHANNELS, *SDS011_CHANNELS):
        assert re.fullmatch(r"[A-Za-z0-9_]+", ch)
    assert PMS5003_UNITS["a34004"] == "ug/m3" and PMS5003_UNITS["n0_3"] == "count/0.1L"
    assert set(PMS5003_UNITS) == set(PMS5003_CHANNELS) and set(SDS011_UNITS) == set(SDS011_CHANNELS)


def _with(frame: bytes, index: int, value: int) -> bytes:
    b = bytearray(frame)
    b[index] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("decode", "frame", "reason"),
    [
        (decode_pms5003, PMS_VECTOR[:31], "size"),
        (decode_pms5003, PMS_VECTOR + b"\x00", "size"),
        (decode_pms5003, _with(PMS_VECTOR, 1, 0x4E), "header"),
        (decode_pms5003, _with(PMS_VECTOR, 3, 0x1D), "length"),
        (decode_pms5003, _with(PMS_VECTOR, 10, 0x01), "checksum"),
        (decode_pms5003, _with(PMS_VECTOR, 31, 0xBE), "checksum"),
        (decode_sds011, SDS_VECTOR[:9], "size"),
        (decode_sds011, _with(SDS_VECTOR, 1, 0xC5), "header"),
        (decode_sds011, _with(SDS_VECTOR, 9, 0xAC), "tail"),
        (decode_sds011, _with(SDS_VECTOR, 2, 0xD5), "checksum"),
    ],
)
def test_decoders_reject_each_kind_of_damage(decode: Callable[[bytes], Frame], frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        decode(frame)
    assert info.value.reason == reason


def test_encoders_refuse_what_the_frame_cannot_carry() -> None:
    with pytest.raises(ValueError):
        encode_pms5003({"a34004": 65536})
    with pytest.raises(ValueError):
        encode_pms5003({"a34004": -1})
    with pytest.raises(ValueError):
        encode_pms5003({"pm2_5": 10})  # a typo is an error, not a silent 0
    with pytest.raises(ValueError):
        encode_sds011(6553.6, 0)
    with pytest.raises(ValueError):
        encode_sds011(float("nan"), 0)
    with pytest.raises(ValueError):
        encode_sds011(1, 1, id=0x10000)


# --------------------------------------------------------------------------------------------------
# Reader behaviour on hand-made streams
# --------------------------------------------------------------------------------------------------


def test_frame_fed_byte_by_byte_comes_out_with_its_last_byte() -> None:
    for reader, frame, values in ((Pms5003Reader(), PMS_VECTOR, PMS_VECTOR_VALUES),
                                  (Sds011Reader(), SDS_VECTOR, SDS_VECTOR_VALUES)):  # fmt: skip
        for b in frame[:-1]:
            assert reader.feed(bytes([b])) == []
        assert reader.feed(frame[-1:]) == [values]
        assert reader.pending == 0 and reader.garbage_bytes == 0


def test_glued_frames_in_one_read_come_out_in_order() -> None:
    other = encode_pms5003({"a34004": 99})
    assert Pms5003Reader().feed(PMS_VECTOR + other + PMS_VECTOR) == [
        PMS_VECTOR_VALUES,
        decode_pms5003(other),
        PMS_VECTOR_VALUES,
    ]
    other_sds = encode_sds011(1.5, 2.5)
    assert Sds011Reader().feed(SDS_VECTOR + other_sds) == [SDS_VECTOR_VALUES, decode_sds011(other_sds)]


def test_false_pms5003_header_in_garbage_does_not_swallow_the_next_frame() -> None:
    for false_start in (
        b"\x42\x4d\x00\x1c\x01\x02\x03",  # right length, then a checksum that cannot match
        b"\x42\x4d\xff\xff",  # impossible length
        b"\x42\x4d\x00\x04\x00",  # looks like a command answer, bad checksum
        PMS_VECTOR[:20],  # a truncated frame (the sensor was reset mid-frame)
    ):
        reader = Pms5003Reader()
        assert reader.feed(b"\x00\xff" + false_start + PMS_VECTOR) == [PMS_VECTOR_VALUES], false_start
        assert reader.rejected == 1
        assert reader.garbage_bytes == 2 + len(false_start)


def test_false_sds011_header_in_garbage_does_not_swallow_the_next_frame() -> None:
    for false_start in (b"\xaa\xc0\x01\x02", SDS_VECTOR[:7], b"\xaa\xaa\xc0"):
        reader = Sds011Reader()
        assert reader.feed(false_start + SDS_VECTOR) == [SDS_VECTOR_VALUES], false_start
        assert reader.rejected == 1
        assert reader.garbage_bytes == len(false_start)


def test_kept_header_byte_completes_a_frame_split_inside_its_header() -> None:
    reader = Pms5003Reader()
    assert reader.feed(b"\x00\xff" + PMS_VECTOR[:1]) == []
    assert reader.pending == 1  # the 0x42 might start a header
    assert reader.feed(PMS_VECTOR[1:]) == [PMS_VECTOR_VALUES]
    assert reader.garbage_bytes == 2 and reader.pending == 0


def test_command_answers_are_skipped_not_counted_as_errors() -> None:
    reader = Pms5003Reader()
    assert reader.feed(PMS_PASSIVE_ACK + PMS_VECTOR) == [PMS_VECTOR_VALUES]
    assert (reader.replies, reader.rejected, reader.garbage_bytes) == (1, 0, 0)
    sds = Sds011Reader()
    assert sds.feed(SDS_REPLY + SDS_VECTOR) == [SDS_VECTOR_VALUES]
    assert (sds.replies, sds.rejected, sds.garbage_bytes) == (1, 0, 0)


def test_rejections_are_counted_by_kind() -> None:
    reader = Pms5003Reader()
    reader.feed(_with(PMS_VECTOR, 3, 0x1D) + _with(PMS_VECTOR, 13, 0) + PMS_VECTOR)
    assert (reader.bad_length, reader.bad_checksum, reader.frames) == (1, 1, 1)
    sds = Sds011Reader()
    sds.feed(_with(SDS_VECTOR, 9, 0) + _with(SDS_VECTOR, 4, 0) + SDS_VECTOR)
    assert (sds.bad_tail, sds.bad_checksum, sds.frames) == (1, 1, 1)
    assert sds.counters()["bad_tail"] == 1


def test_clear_drops_a_partial_frame() -> None:
    reader = Sds011Reader()
    reader.feed(SDS_VECTOR[:6])
    reader.clear()
    assert reader.pending == 0 and reader.garbage_bytes == 6
    assert reader.feed(SDS_VECTOR[6:]) == []
    assert reader.feed(SDS_VECTOR) == [SDS_VECTOR_VALUES]


def test_make_reader_knows_the_driver_names() -> None:
    assert isinstance(make_reader("pms5003"), Pms5003Reader)
    assert isinstance(make_reader("sds011"), Sds011Reader)
    with pytest.raises(KeyError):
        make_reader("hj212")


# --------------------------------------------------------------------------------------------------
# Properties: good frames among garbage, corrupted and truncated frames, split at random
# --------------------------------------------------------------------------------------------------


def _pms_valid_at(s: bytes, i: int) -> bool:
    """Independent restatement of DOMAIN.md: is there a valid PMS5003 frame or answer at s[i]?"""
    if s[i : i + 2] != b"\x42\x4d" or i + 4 > len(s):
        return False
    size = {0x001C: 32, 0x0004: 8}.get(int.from_bytes(s[i + 2 : i + 4], "big"))
    if size is None or i + size > len(s):
        return False
    return sum(s[i : i + size - 2]) & 0xFFFF == int.from_bytes(s[i + size - 2 : i + size], "big")


def _sds_valid_at(s: bytes, i: int) -> bool:
    """Independent restatement of DOMAIN.md: is there a valid SDS011 frame or answer at s[i]?"""
    if i + 10 > len(s) or s[i] != 0xAA or s[i + 1] not in (0xC0, 0xC5) or s[i + 9] != 0xAB:
        return False
    return sum(s[i + 2 : i + 8]) & 0xFF == s[i + 8]


@dataclass(frozen=True)
class Proto:
    name: str
    reader: Callable[[], FrameReader]
    frames: st.SearchStrategy[tuple[bytes, Frame]]  # (encoded frame, expected values)
    valid_at: Callable[[bytes, int], bool]
    tokens: tuple[bytes, ...]  # header-like pieces mixed into garbage
    size: int
    worst: bytes  # repeated, a candidate at almost every position


def _pms_frame(words: list[int]) -> tuple[bytes, Frame]:
    values = dict(zip(PMS5003_CHANNELS, words, strict=True))
    return encode_pms5003(values), {ch: float(v) for ch, v in values.items()}


def _sds_frame(args: tuple[int, int, int]) -> tuple[bytes, Frame]:
    p25, p10, dev = args
    return encode_sds011(p25 / 10, p10 / 10, id=dev), {"a34004": p25 / 10, "a34002": p10 / 10}


_u16 = st.one_of(st.integers(0, 1000), st.integers(0, 0xFFFF))

PROTOS = {
    "pms5003": Proto(
        name="pms5003",
        reader=Pms5003Reader,
        frames=st.lists(_u16, min_size=12, max_size=12).map(_pms_frame),
        valid_at=_pms_valid_at,
        tokens=(b"\x42", b"\x4d", b"\x42\x4d", b"\x42\x4d\x00\x1c", b"\x42\x4d\x00\x04", b"\x00\x1c"),
        size=32,
        worst=b"\x42\x4d\x00\x1c",
    ),
    "sds011": Proto(
        name="sds011",
        reader=Sds011Reader,
        frames=st.tuples(_u16, _u16, st.integers(0, 0xFFFF)).map(_sds_frame),
        valid_at=_sds_valid_at,
        tokens=(b"\xaa", b"\xab", b"\xaa\xc0", b"\xaa\xc5", b"\xc0", b"\xab\xaa\xc0"),
        size=10,
        worst=b"\xaa\xc0",
    ),
}


@dataclass(frozen=True)
class Segment:
    data: bytes
    good: Frame | None = None  # the values, for a good frame
    rejectable: bool = False  # a corrupted frame whose header survived: the reader must reject it


def _corrupt(frame: bytes, index: int, mask: int) -> Segment:
    return Segment(_with(frame, index, frame[index] ^ mask), rejectable=index >= 2)


@st.composite
def _streams(draw: st.DrawFn, proto: Proto) -> tuple[bytes, list[Frame], list[int], int]:
    """A stream of good frames, garbage (rich in header bytes), corrupted frames (one byte flipped)
    and truncated frames; returns (stream, good values in order, good offsets, rejectable count)."""
    garbage = st.lists(st.one_of(st.binary(max_size=12), st.sampled_from(proto.tokens)), max_size=6).map(b"".join)
    segment = st.one_of(
        proto.frames.map(lambda f: Segment(f[0], good=f[1])),
        garbage.map(Segment),
        st.builds(_corrupt, proto.frames.map(lambda f: f[0]), st.integers(0, proto.size - 1), st.integers(1, 255)),
        st.tuples(proto.frames, st.integers(1, proto.size - 1)).map(lambda t: Segment(t[0][0][: t[1]])),
    )
    stream = bytearray()
    goods: list[Frame] = []
    offsets: list[int] = []
    rejectable = 0
    for seg in draw(st.lists(segment, max_size=25)):
        if seg.good is not None:
            offsets.append(len(stream))
            goods.append(seg.good)
        rejectable += seg.rejectable
        stream += seg.data
    return bytes(stream), goods, offsets, rejectable


def _feed_in_chunks(reader: FrameReader, stream: bytes, sizes: list[int]) -> list[Frame]:
    out: list[Frame] = []
    pos, k = 0, 0
    while pos < len(stream):
        size = sizes[k % len(sizes)]
        out += reader.feed(stream[pos : pos + size])
        assert reader.pending < reader.max_frame_size
        pos += size
        k += 1
    return out


def _check_accounting(reader: FrameReader) -> None:
    accounted = (
        reader.frames * reader.frame_size + reader.replies * reader.reply_size + reader.garbage_bytes + reader.pending
    )
    assert accounted == reader.bytes_fed
    assert reader.pending < reader.max_frame_size


@pytest.mark.parametrize("name", sorted(PROTOS))
def test_noisy_split_stream_yields_exactly_the_good_frames_in_order(name: str) -> None:
    proto = PROTOS[name]

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_streams(proto), st.lists(st.integers(1, 3 * proto.size), min_size=1, max_size=12))
    def run(case: tuple[bytes, list[Frame], list[int], int], sizes: list[int]) -> None:
        stream, goods, offsets, rejectable = case
        # Garbage can, rarely, spell a valid frame by chance (e.g. AA C0 00*6 00 AB); that stream
        # is ambiguous by nature. Keep streams whose only valid frames are the good ones.
        assume([i for i in range(len(stream)) if proto.valid_at(stream, i)] == offsets)
        reader = proto.reader()
        got = _feed_in_chunks(reader, stream, sizes)
        assert got == goods  # no frame lost, none from a corrupted frame, order kept
        assert reader.frames == len(goods) and reader.replies == 0
        assert reader.rejected >= rejectable
        _check_accounting(reader)

    run()


@given(st.lists(_u16, min_size=12, max_size=12), st.integers(0, 0xFFFF))
def test_pms5003_encode_decode_round_trip(words: list[int], reserved: int) -> None:
    frame, values = _pms_frame(words)
    assert decode_pms5003(frame) == values
    assert encode_pms5003(decode_pms5003(encode_pms5003(values, reserved)), reserved) == encode_pms5003(
        values, reserved
    )


@given(_u16, _u16, st.integers(0, 0xFFFF))
def test_sds011_encode_decode_round_trip(p25: int, p10: int, dev: int) -> None:
    frame, values = _sds_frame((p25, p10, dev))
    assert decode_sds011(frame) == values
    assert frame[6:8] == dev.to_bytes(2, "big")
    assert encode_sds011(values["a34004"], values["a34002"], id=dev) == frame


# --------------------------------------------------------------------------------------------------
# Fuzz: a million bytes through each reader
# --------------------------------------------------------------------------------------------------

FUZZ_BYTES = 1_000_000


def _fuzz(reader: FrameReader, data: bytes, rnd: random.Random) -> tuple[int, float]:
    frames = 0
    pos = 0
    t0 = time.perf_counter()
    while pos < len(data):
        size = int(2 ** rnd.uniform(0, 12))  # 1..4095 bytes, as many small reads as large ones
        frames += len(reader.feed(data[pos : pos + size]))
        pos += size
    return frames, time.perf_counter() - t0


def _known_frame(name: str) -> tuple[bytes, Frame]:
    return (PMS_VECTOR, PMS_VECTOR_VALUES) if name == "pms5003" else (SDS_VECTOR, SDS_VECTOR_VALUES)


@pytest.mark.parametrize("name", sorted(PROTOS))
@pytest.mark.parametrize("kind", ["uniform", "header-dense", "headers-only"])
def test_a_million_random_bytes_never_raise(name: str, kind: str) -> None:
    proto = PROTOS[name]
    rnd = random.Random(f"{name}-{kind}-20260101")
    if kind == "uniform":
        data = rnd.randbytes(FUZZ_BYTES)
    elif kind == "header-dense":  # mostly header bytes and length fields: a candidate every few bytes
        alphabet = b"".join(proto.tokens) + b"\x00\x1c\x04\xc0\xab"
        data = bytes(rnd.choices(alphabet, k=FUZZ_BYTES))
    else:  # nothing but headers: the slowest input there is
        data = (proto.worst * FUZZ_BYTES)[:FUZZ_BYTES]
    reader = proto.reader()
    frames, elapsed = _fuzz(reader, data, rnd)
    assert reader.bytes_fed == FUZZ_BYTES
    _check_accounting(reader)
    assert frames == reader.frames
    good, values = _known_frame(name)
    assert reader.feed(good)[-1:] == [values]  # still in step after a million bytes of noise
    # Figures, not assertions on time (DESIGN: benchmarks print, tests never assert on time).
    print(
        f"\nfuzz {name} {kind}: {FUZZ_BYTES} bytes in {elapsed:.2f} s "
        f"({FUZZ_BYTES / elapsed / 1e6:.2f} MB/s), {reader.counters()}"
    )


# --------------------------------------------------------------------------------------------------
# The latest valid frame of an interval (SPEC §2)
# --------------------------------------------------------------------------------------------------

A = {"a34004": 1.0}
B = {"a34004": 2.0}
C = {"a34004": 3.0}


def test_latest_in_interval_picks_the_last_frame_of_the_half_open_interval() -> None:
    frames = [(9.0, A), (10.0, B), (15.0, C), (20.0, A), (20.5, B)]
    assert latest_in_interval(frames, 10.0, 20.0) == A  # start exclusive, end inclusive
    assert latest_in_interval(frames, 0.0, 9.5) == A
    assert latest_in_interval(frames, 20.5, 30.0) is None
    assert latest_in_interval([], 0.0, 1.0) is None
    assert latest_in_interval([(5.0, A), (5.0, B)], 0.0, 10.0) == B  # same read: the later frame


def test_interval_takes_the_latest_frame_then_none_when_the_sensor_is_silent() -> None:
    latch = LatestInInterval(10.0)
    latch.extend([A, B], t=101.0)
    latch.add(C, t=105.0)
    assert latch.take(now=110.0) == C
    assert latch.take(now=120.0) is None  # nothing new: null with flag B, never C again
    latch.extend([A, B], t=121.0)
    assert latch.take(now=130.0) == B


def test_late_poll_never_reports_a_frame_older_than_one_interval() -> None:
    latch = LatestInInterval(10.0)
    latch.add(A, t=100.0)
    assert latch.take(now=125.0) is None


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LatestInInterval(0)
