"""Modbus codec: every type x word order against hand-computed registers, round trips, scale/offset,
NaN handling, measuring range, and status words (numeric map, ASCII letter in either byte, bits)."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from drivers.modbus_codec import (
    FLAG_PRECEDENCE,
    combine_flags,
    decode,
    decode_raw,
    encode,
    encode_raw,
    evaluate,
    flag_from_status,
    register_count,
    status_flags_by_channel,
)
from drivers.registers import RegisterSpec, check_map
from drivers.sim.instruments import SimInstrument

ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
TYPES = ("int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool")

# (type, raw value, {order: registers as on the wire}); computed by hand from the big-endian bytes.
VECTORS = [
    # float32 123.456 = 0x42F6E979: A=42 B=F6 C=E9 D=79
    ("float32", 123.456, {"ABCD": [0x42F6, 0xE979], "CDAB": [0xE979, 0x42F6],
                          "BADC": [0xF642, 0x79E9], "DCBA": [0x79E9, 0xF642]}),
    # float32 -0.5 = 0xBF000000
    ("float32", -0.5, {"ABCD": [0xBF00, 0x0000], "CDAB": [0x0000, 0xBF00],
                       "BADC": [0x00BF, 0x0000], "DCBA": [0x0000, 0x00BF]}),
    # int32 -123456789 = 0xF8A432EB
    ("int32", -123456789, {"ABCD": [0xF8A4, 0x32EB], "CDAB": [0x32EB, 0xF8A4],
                           "BADC": [0xA4F8, 0xEB32], "DCBA": [0xEB32, 0xA4F8]}),
    # uint32 3000000000 = 0xB2D05E00
    ("uint32", 3000000000, {"ABCD": [0xB2D0, 0x5E00], "CDAB": [0x5E00, 0xB2D0],
                            "BADC": [0xD0B2, 0x005E], "DCBA": [0x005E, 0xD0B2]}),
    # float64 123.456 = 0x405EDD2F1A9FBE77: A=40 B=5E C=DD D=2F E=1A F=9F G=BE H=77
    ("float64", 123.456, {"ABCD": [0x405E, 0xDD2F, 0x1A9F, 0xBE77], "CDAB": [0xBE77, 0x1A9F, 0xDD2F, 0x405E],
                          "BADC": [0x5E40, 0x2FDD, 0x9F1A, 0x77BE], "DCBA": [0x77BE, 0x9F1A, 0x2FDD, 0x5E40]}),
    # int64 -1234567890123 = 0xFFFFFEE08E04FB35
    ("int64", -1234567890123, {"ABCD": [0xFFFF, 0xFEE0, 0x8E04, 0xFB35],
                               "CDAB": [0xFB35, 0x8E04, 0xFEE0, 0xFFFF],
                               "BADC": [0xFFFF, 0xE0FE, 0x048E, 0x35FB],
                               "DCBA": [0x35FB, 0x048E, 0xE0FE, 0xFFFF]}),
    # uint64 0x0102030405060708
    ("uint64", 0x0102030405060708, {"ABCD": [0x0102, 0x0304, 0x0506, 0x0708],
                                    "CDAB": [0x0708, 0x0506, 0x0304, 0x0102],
                                    "BADC": [0x0201, 0x0403, 0x0605, 0x0807],
                                    "DCBA": [0x0807, 0x0605, 0x0403, 0x0201]}),
    # 16-bit values: ABCD and CDAB are the register as transmitted (one word, nothing to reverse); BADC
    # (byte-swapped) and DCBA (little-endian) swap its two bytes (SPEC §2)
    ("int16", -2, {"ABCD": [0xFFFE], "CDAB": [0xFFFE], "BADC": [0xFEFF], "DCBA": [0xFEFF]}),
    ("int16", 712, {"ABCD": [0x02C8], "CDAB": [0x02C8], "BADC": [0xC802], "DCBA": [0xC802]}),
    ("int16", -123, {"ABCD": [0xFF85], "CDAB": [0xFF85], "BADC": [0x85FF], "DCBA": [0x85FF]}),
    ("uint16", 0xABCD, {"ABCD": [0xABCD], "CDAB": [0xABCD], "BADC": [0xCDAB], "DCBA": [0xCDAB]}),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(("type_", "raw", "by_order"), VECTORS, ids=[f"{v[0]}:{v[1]}" for v in VECTORS])
def test_every_type_and_order_decodes_hand_computed_registers(type_, raw, by_order, order):
    words = by_order[order]
    assert decode_raw(words, type_, order) == raw
    assert encode_raw(raw, type_, order) == words
    spec = RegisterSpec("x", 0, type=type_, order=order)
    assert decode(words, spec) == float(raw)  # readings are floats (64-bit integers above 2**53 round)
    assert encode(raw, spec) == words


@pytest.mark.parametrize(("order", "wire", "unsigned"), [
    ("ABCD", 0xFF85, 0xFF85), ("CDAB", 0xFF85, 0xFF85), ("BADC", 0x85FF, 0xFF85), ("DCBA", 0x85FF, 0xFF85)])
def test_one_register_values_swap_their_bytes_for_badc_and_dcba(order, wire, unsigned):
    # int16 -123 is 0xFF85; an instrument sending it byte-swapped (BADC) or little-endian (DCBA) puts 85 FF
    # on the wire (SPEC §2). Decode and encode stay inverse, with scale, for both signednesses.
    spec = RegisterSpec("x", 0, type="int16", order=order, scale=0.1)
    assert decode([wire], spec) == -12.3
    assert encode(-12.3, spec) == [wire]
    assert decode_raw([wire], "uint16", order) == unsigned
    assert encode_raw(unsigned, "uint16", order) == [wire]
    # pH 7.12 as int16 raw/100 from an instrument that sends little-endian
    assert decode([0xC802], RegisterSpec("ph", 0, type="int16", order="DCBA", scale=0.01)) == 7.12
    # a status word's bits count from the value's least significant bit, after the byte order
    status = RegisterSpec("st", 0, role="status", bits={0: "D", 15: "M"}, order=order)
    assert flag_from_status(encode_raw(1, "uint16", order), status) == "D"
    assert flag_from_status(encode_raw(0x8000, "uint16", order), status) == "M"
    # bool on a register is "non-zero", whichever byte carries it
    assert decode([0x0100], RegisterSpec("b", 0, type="bool", order=order)) == 1.0
    assert decode([0x0000], RegisterSpec("b", 0, type="bool", order=order)) == 0.0


def test_simulated_instruments_encode_one_register_orders_as_the_agent_decodes_them():
    specs = [RegisterSpec(f"c_{order}", i, type="int16", order=order, scale=0.01, range=(0, 14))
             for i, order in enumerate(ORDERS)]
    inst = SimInstrument("ph", specs, clock=lambda: 1_780_000_000.0)
    inst.refresh()
    values = inst.values()
    for spec in specs:
        words = inst.bank.get("holding", spec.address, 1)
        assert decode(words, spec) == pytest.approx(values[spec.channel], abs=0.01), spec.order
        # by hand: undo the byte swap of BADC/DCBA, read the big-endian int16, scale
        wire = words[0].to_bytes(2, "big")
        (raw,) = struct.unpack(">h", wire[::-1] if spec.order in ("BADC", "DCBA") else wire)
        assert raw * 0.01 == pytest.approx(values[spec.channel], abs=0.01), spec.order


def test_register_counts():
    assert [register_count(t) for t in TYPES] == [1, 1, 2, 2, 4, 4, 2, 4, 1]
    assert RegisterSpec("x", 10, type="float64").end == 14


def test_bool_from_coil_bits_and_from_registers():
    coil = RegisterSpec("pump", 3, type="bool", table="coil")
    assert decode([True], coil) == 1.0
    assert decode([0], coil) == 0.0
    assert decode([0x0100], RegisterSpec("x", 0, type="bool")) == 1.0
    assert encode(1, coil) == [1] and encode(False, coil) == [0]


def test_coil_without_type_is_bool_and_wider_types_are_refused():
    assert RegisterSpec("pump", 0, table="discrete").type == "bool"
    with pytest.raises(ValueError, match="bits"):
        RegisterSpec("pump", 0, type="float32", table="coil")


def test_float32_is_reported_as_the_value_the_instrument_meant():
    # 123.456 as float32 is 123.45600128173828; the shortest decimal that packs back is 123.456.
    assert decode([0x42F6, 0xE979], RegisterSpec("x", 0, type="float32")) == 123.456
    assert decode_raw(encode_raw(0.1, "float32"), "float32") == 0.1


@pytest.mark.parametrize(
    ("type_", "words", "scale", "offset", "expected"),
    [
        ("int16", [712], 0.01, 0.0, 7.12),  # pH raw/100
        ("int16", [1234], 0.01, 0.0, 12.34),  # exactly 12.34, not 12.340000000000002
        ("int16", [0xFFFF], 0.1, 0.0, -0.1),
        ("uint16", [253], 0.1, -40.0, -14.7),  # temperature sensors with an offset
        ("uint32", [0x0001, 0x86A0], 0.001, 0.0, 100.0),  # 100000 litres -> 100 m3
        ("float32", [0x42F6, 0xE979], 2.0, 1.0, 247.912),
        ("bool", [1], 5.0, 1.0, 6.0),
    ],
)
def test_value_is_raw_times_scale_plus_offset(type_, words, scale, offset, expected):
    spec = RegisterSpec("x", 0, type=type_, scale=scale, offset=offset)
    assert decode(words, spec) == expected
    assert encode(expected, spec) == words


@pytest.mark.parametrize("bits", [0x7FC00000, 0x7F800000, 0xFF800000, 0x7FA00001])
def test_nan_and_inf_from_the_instrument_give_no_value_and_flag_d(bits):
    spec = RegisterSpec("x", 0, type="float32", range=(0, 10))
    words = [bits >> 16, bits & 0xFFFF]
    assert decode(words, spec) is None
    assert evaluate(words, spec) == (None, "D")
    assert decode(encode(math.nan, RegisterSpec("x", 0, type="float64", order="DCBA")),
                  RegisterSpec("x", 0, type="float64", order="DCBA")) is None


def test_nan_cannot_be_encoded_as_an_integer():
    with pytest.raises(ValueError):
        encode(math.nan, RegisterSpec("x", 0, type="int16"))


def test_scaling_beyond_the_float_range_gives_no_value():
    spec = RegisterSpec("x", 0, type="float64", scale=10.0)
    assert decode(encode_raw(1e308, "float64"), spec) is None
    with pytest.raises(ValueError, match="does not fit"):
        encode(1e308, RegisterSpec("x", 0, type="float64", scale=0.1))


def test_entries_built_in_code_take_lists_too():
    spec = RegisterSpec("x", 0, range=[0, 10])  # type: ignore[arg-type]
    assert spec.range == (0, 10) and hash(spec)
    status = RegisterSpec("st", 1, role="status", flags={0: "N"}, applies_to="x")  # type: ignore[arg-type]
    assert status.applies_to == ("x",)


def test_value_above_the_measuring_range_gets_flag_t():
    spec = RegisterSpec("w01018", 0, type="float32", range=(0, 2000))
    assert evaluate(encode(2000, spec), spec) == (2000.0, "N")
    assert evaluate(encode(2000.5, spec), spec) == (2000.5, "T")
    assert evaluate(encode(-3, spec), spec) == (-3.0, "N")  # HJ 212 has no flag below range
    assert evaluate(encode(5, RegisterSpec("x", 0)), RegisterSpec("x", 0)) == (5.0, "N")


@pytest.mark.parametrize(
    ("type_", "raw"),
    [("int16", 40000), ("uint16", -1), ("int32", 2**31), ("uint64", 2**64), ("uint32", 1.5), ("float32", 1e39)],
)
def test_values_that_do_not_fit_are_refused(type_, raw):
    with pytest.raises(ValueError):
        encode_raw(raw, type_)


def test_wrong_register_count_or_width_is_refused():
    with pytest.raises(ValueError, match="needs 2"):
        decode_raw([1], "float32")
    with pytest.raises(ValueError, match="16-bit"):
        decode_raw([0x10000], "uint16")
    with pytest.raises(ValueError, match="16-bit"):
        decode_raw([1, -1], "int32", "CDAB")


# --- round trips --------------------------------------------------------------------------------

def _words(type_: str) -> st.SearchStrategy[list[int]]:
    n = register_count(type_)  # type: ignore[arg-type]
    if type_ == "bool":
        return st.lists(st.integers(0, 1), min_size=1, max_size=1)
    return st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("type_", TYPES)
@given(data=st.data())
def test_registers_round_trip_through_decode_and_encode(type_, order, data):
    words = data.draw(_words(type_))
    raw = decode_raw(words, type_, order)
    if isinstance(raw, float) and math.isnan(raw):
        assert math.isnan(decode_raw(encode_raw(raw, type_, order), type_, order))
        return
    assert encode_raw(raw, type_, order) == words
    spec = RegisterSpec("x", 0, type=type_, order=order)
    value = decode(words, spec)
    if value is not None and abs(raw) <= 2**53:  # a float carries integers exactly up to 2**53
        assert encode(value, spec) == words


_BOUNDS = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
_RAWS = {
    **{t: st.integers(lo, hi) for t, (lo, hi) in _BOUNDS.items()},
    "float32": st.floats(width=32, allow_nan=False),
    "float64": st.floats(allow_nan=False),
    "bool": st.booleans(),
}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("type_", TYPES)
@given(data=st.data())
def test_values_round_trip_through_encode_and_decode(type_, order, data):
    raw = data.draw(_RAWS[type_])
    words = encode_raw(raw, type_, order)
    assert len(words) == register_count(type_)
    assert all(0 <= w <= 0xFFFF for w in words)
    back = decode_raw(words, type_, order)
    if type_ == "float32":
        assert struct.pack(">f", back) == struct.pack(">f", raw)  # same float32, shortest decimal
    else:
        assert back == raw


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("type_", ["int16", "uint16", "int32", "uint32", "int64", "uint64"])
@given(data=st.data(), scale=st.sampled_from([0.1, 0.01, 0.001, 2.0, 10.0, 1e-4]),
       offset=st.sampled_from([0.0, -40.0, 273.15, 0.5]))
def test_scaled_integers_round_trip_exactly(type_, order, data, scale, offset):
    # up to 15 significant digits survive the float of a reading exactly
    lo, hi = _BOUNDS[type_]
    raw = data.draw(st.integers(max(lo, -(10**11)), min(hi, 10**11)))
    spec = RegisterSpec("x", 0, type=type_, order=order, scale=scale, offset=offset)
    words = encode_raw(raw, type_, order)
    assert encode(decode(words, spec), spec) == words


@pytest.mark.parametrize("order", ORDERS)
@given(value=st.floats(-1e6, 1e6), scale=st.sampled_from([0.5, 0.1, 3.6]), offset=st.sampled_from([0.0, -40.0]))
def test_scaled_floats_round_trip_closely(order, value, scale, offset):
    spec = RegisterSpec("x", 0, type="float64", order=order, scale=scale, offset=offset)
    assert decode(encode(value, spec), spec) == pytest.approx(value, rel=1e-12, abs=1e-9)


# --- status words -------------------------------------------------------------------------------

I12001 = {0: "N", 1: "M", 2: "D", 3: "C", 7: "N", 9: "N"}


@pytest.mark.parametrize(("status", "flag"), [(0, "N"), (1, "M"), (2, "D"), (3, "C"), (7, "N"), (9, "N"),
                                              (4, "D"), (65535, "D")])
def test_numeric_status_word_maps_to_flags(status, flag):
    spec = RegisterSpec("i12001", 16, role="status", flags=I12001)
    assert flag_from_status([status], spec) == flag


def test_numeric_status_keys_may_be_strings_and_default_flag_is_configurable():
    spec = RegisterSpec("st", 0, type="int32", order="CDAB", role="status", flags={"0": "N", "-1": "F"},
                        default_flag="N")
    assert spec.flags == {0: "N", -1: "F"}
    assert flag_from_status(encode_raw(-1, "int32", "CDAB"), spec) == "F"
    assert flag_from_status(encode_raw(5, "int32", "CDAB"), spec) == "N"


@pytest.mark.parametrize(
    ("side", "word", "flag"),
    [
        ("high", 0x4E00, "N"),  # 'N' in the high byte
        ("high", 0x4D20, "M"),
        ("high", 0x0044, "D"),  # high byte 0x00 is no letter: default D
        ("low", 0x004E, "N"),  # 'N' in the low byte
        ("low", 0x0054, "T"),
        ("low", 0x4E43, "C"),  # 'N' high, 'C' low: the low byte counts
        ("low", 0x006D, "M"),  # lower case accepted
        ("low", 0x0058, "D"),  # 'X' is no HJ 212 flag
        ("low", 0x00C3, "D"),  # not ASCII
    ],
)
def test_ascii_flag_letter_in_high_or_low_byte(side, word, flag):
    spec = RegisterSpec("flag", 1, role="status", ascii=side)
    assert flag_from_status([word], spec) == flag


def test_ascii_vendor_letters_can_be_translated():
    spec = RegisterSpec("flag", 1, role="status", ascii="low", flags={"K": "C", "N": "M"})
    assert flag_from_status([ord("K")], spec) == "C"
    assert flag_from_status([ord("N")], spec) == "M"
    assert flag_from_status([ord("D")], spec) == "D"


def test_status_bits_give_the_most_severe_set_flag():
    spec = RegisterSpec("alarm", 6, role="status", bits={0: "D", 3: "M", 15: "C"})
    assert flag_from_status([0], spec) == "N"
    assert flag_from_status([0b1000], spec) == "M"
    assert flag_from_status([0b1001], spec) == "D"
    assert flag_from_status([0x8000], spec) == "C"
    assert flag_from_status([0b0110], spec) == "N"  # unlisted bits are ignored
    fault = RegisterSpec("fault", 2, table="discrete", role="status", flags={0: "N", 1: "D"})
    assert flag_from_status([True], fault) == "D"


def test_flag_precedence_keeps_the_most_severe():
    assert FLAG_PRECEDENCE == "BDFMCSTN"
    assert combine_flags([]) == "N"
    assert combine_flags(["N", "T", "M"]) == "M"
    assert combine_flags(["T", "D", "B"]) == "B"


def test_status_flags_spread_over_applies_to_or_all_channels():
    flow_alarm = RegisterSpec("alarm", 6, role="status", bits={0: "D"}, applies_to=("w00000",))
    device = RegisterSpec("st", 7, role="status", flags={0: "N", 1: "M"})
    channels = ["w00000", "w00000_total"]
    assert status_flags_by_channel([(flow_alarm, "D"), (device, "N")], channels) == {
        "w00000": "D", "w00000_total": "N"}
    assert status_flags_by_channel([(flow_alarm, "N"), (device, "M")], channels) == {
        "w00000": "M", "w00000_total": "M"}
    assert status_flags_by_channel([], channels) == {"w00000": "N", "w00000_total": "N"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"role": "status"}, "exactly one"),
        ({"role": "status", "flags": {0: "N"}, "bits": {0: "D"}}, "exactly one"),
        ({"role": "status", "flags": {0: "X"}}, "not an HJ 212 flag"),
        ({"role": "status", "flags": {"a": "N"}}, "not an integer"),
        ({"role": "status", "ascii": "low", "type": "uint32"}, "16-bit"),
        ({"role": "status", "ascii": "low", "flags": {"NN": "N"}}, "single letters"),
        ({"role": "status", "bits": {16: "D"}}, "outside"),
        ({"role": "status", "type": "float32", "flags": {0: "N"}}, "integer type"),
        ({"role": "status", "flags": {0: "N"}, "range": (0, 1)}, "no measuring range"),
        ({"flags": {0: "N"}}, "only for a status word"),
        ({"applies_to": ("x",)}, "only for a status word"),
        ({"range": (10, 0)}, "min < max"),
        ({"range": [1, 2, 3]}, r"\[min, max\]"),
        ({"role": "status", "flags": {0: "N"}, "applies_to": []}, "leave it out"),
        ({"scale": 0}, "scale"),
        ({"address": 65535, "type": "float32"}, "runs past"),
        ({"address": -1}, "outside"),
        ({"default_flag": "Q"}, "not an HJ 212 flag"),
    ],
)
def test_invalid_entries_are_refused_with_the_field_named(kwargs, message):
    fields = {"channel": "x", "address": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        RegisterSpec(**fields)


def test_channel_names_follow_spec():
    with pytest.raises(ValueError, match="channel"):
        RegisterSpec("w01018-Rtd", 0)


def test_pydantic_validates_entries_as_the_config_does():
    adapter = TypeAdapter(list[RegisterSpec])
    [spec] = adapter.validate_python([{"channel": "i12001", "address": 16, "role": "status",
                                       "flags": {0: "N", 2: "D"}, "applies_to": ["a34001"]}])
    assert spec.applies_to == ("a34001",) and spec.flags == {0: "N", 2: "D"}
    with pytest.raises(ValidationError, match="adress"):
        adapter.validate_python([{"channel": "x", "adress": 1}])
    with pytest.raises(ValidationError, match="exactly one"):
        adapter.validate_python([{"channel": "x", "address": 1, "role": "status"}])
    assert hash(spec) == hash(adapter.validate_python([{"channel": "i12001", "address": 16, "role": "status",
                                                        "flags": {0: "N", 2: "D"}}])[0])


def test_map_check_refuses_duplicates_and_dangling_applies_to():
    value = RegisterSpec("w01018", 0, type="float32")
    with pytest.raises(ValueError, match="twice"):
        check_map([value, RegisterSpec("w01018", 4)])
    with pytest.raises(ValueError, match="not a measurement channel"):
        check_map([value, RegisterSpec("st", 2, role="status", flags={0: "N"}, applies_to=("w21003",))])
    check_map([value, RegisterSpec("st", 2, role="status", flags={0: "N"}, applies_to=("w01018",))])
