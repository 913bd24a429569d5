"""Built-in profiles: every file loads, documents itself, plans without overlap and decodes what a
simulated instrument would send; broken files are refused naming the file; inline entries override."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from drivers import profiles
from drivers.modbus_codec import encode, evaluate, flag_from_status, status_flags_by_channel
from drivers.planner import plan, slice_response
from drivers.registers import RegisterSpec, value_channels

REQUIRED = {"cod-analyzer", "nh3n-analyzer", "ph-meter", "flow-meter", "dust-monitor"}


def test_the_required_profiles_exist():
    assert REQUIRED <= set(profiles.names())


@pytest.mark.parametrize("name", profiles.names())
def test_every_profile_loads_and_documents_itself(name):
    profile = profiles.load(name)
    assert profile.name == name
    for text in (profile.vendor, profile.model, profile.description, profile.source):
        assert len(text) > 10
    assert "DOMAIN.md" in profile.source or "SPEC.md" in profile.source
    assert profile.registers and all(isinstance(s, RegisterSpec) for s in profile.registers)
    assert any(s.range is not None for s in profile.registers)  # the measuring range for flag T
    assert profiles.load(name) is profile  # cached


@pytest.mark.parametrize("name", profiles.names())
def test_every_profile_plans_without_overlap(name):
    profile = profiles.load(name)
    requests = plan(profile.registers, **profiles.plan_args(profile))
    reads = Counter((r.table, a) for r in requests for a in range(r.address, r.end))
    assert all(n == 1 for n in reads.values())
    assert sorted(m.channel for r in requests for m in r.members) == sorted(s.channel for s in profile.registers)
    assert len(requests) <= 2


@pytest.mark.parametrize("name", profiles.names())
def test_every_profile_decodes_what_its_instrument_sends(name):
    """Values inside the range written as the instrument would, read back through the plan."""
    profile = profiles.load(name)
    image: dict[tuple[str, int], int] = {}
    expected: dict[str, float] = {}
    for i, s in enumerate(profile.registers):
        if s.role == "status":
            value = 0 if s.ascii is None else ord("N")
        else:
            lo, hi = s.range or (0, 1000)
            value = round(lo + (hi - lo) * (i + 1) / (len(profile.registers) + 1), 1)
            expected[s.channel] = value
        for k, w in enumerate(encode(value, s)):
            image[(s.table, s.address + k)] = w
    got: dict[str, tuple[float | None, str]] = {}
    status: list[tuple[RegisterSpec, str]] = []
    for request in plan(profile.registers, **profiles.plan_args(profile)):
        words = [image.get((request.table, request.address + k), 0) for k in range(request.count)]
        for s, part in slice_response(request, words):
            if s.role == "status":
                status.append((s, flag_from_status(part, s)))
            else:
                got[s.channel] = evaluate(part, s)
    assert {c: v for c, (v, _) in got.items()} == pytest.approx(expected, rel=1e-6)
    assert {c for c, (_, flag) in got.items() if flag != "N"} == set()
    assert set(status_flags_by_channel(status, value_channels(profile.registers)).values()) <= {"N"}


def test_profiles_use_pollutant_codes_and_the_documented_conventions():
    by = {n: {s.channel: s for s in profiles.load(n).registers} for n in profiles.names()}
    cod = by["cod-analyzer"]["w01018"]
    assert (cod.address, cod.type, cod.order, cod.unit) == (0x42, "float32", "DCBA", "mg/L")
    assert by["cod-analyzer"]["flag"].ascii in ("high", "low")
    assert (by["nh3n-analyzer"]["w21003"].order, by["nh3n-analyzer"]["w21003"].address) == ("CDAB", 0)
    assert (by["nh3n-analyzer-fpi"]["w21003"].order, by["nh3n-analyzer-fpi"]["w21003"].address) == ("ABCD", 0)
    ph = by["ph-meter"]["w01001"]
    assert (ph.type, ph.scale, ph.range) == ("int16", 0.01, (0, 14))
    assert {"w00000", "w00000_total"} <= set(by["flow-meter"])
    assert by["flow-meter"]["w00000"].unit == "L/s"
    dust = set(value_channels(by["dust-monitor"].values()))
    assert dust == {"a34001", "a34002", "a34004", "LA", "a01007", "a01008", "a01001", "a01002"}
    assert by["dust-monitor"]["i12001"].flags == {0: "N", 1: "M", 2: "D", 3: "C", 7: "N", 9: "N"}


def test_cod_analyzer_flags_follow_its_ascii_status_word():
    profile = profiles.load("cod-analyzer")
    flag = next(s for s in profile.registers if s.role == "status")
    assert flag_from_status([ord("M")], flag) == "M"
    assert flag_from_status([ord("C")], flag) == "C"
    assert flag_from_status([0], flag) == "D"
    value = next(s for s in profile.registers if s.channel == "w01018")
    assert evaluate(encode(2500.0, value), value) == (2500.0, "T")


def test_unknown_profile_names_the_ones_there_are():
    with pytest.raises(profiles.ProfileError, match="unknown profile 'cod'.*cod-analyzer"):
        profiles.load("cod")


GOOD = """\
name: {name}
vendor: ACME
model: ACME X
description: test
source: test
registers:
  - {channel: w01018, address: 0, type: float32}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "slave: 2\n", r"unknown key\(s\) slave"),
        (GOOD.replace("source: test\n", ""), r"missing key\(s\) source"),
        (GOOD + "  - {channel: x, address: 4, type: float33}\n", r"registers\[1\]\.type"),
        (GOOD + "  - {channel: x, address: 4, colour: red}\n", r"registers\[1\]\.colour"),
        (GOOD + "  - {channel: x, address: 4, role: status}\n", r"registers\[1\]: role: status needs"),
        (GOOD + "  - {channel: w01018, address: 4}\n", "appears twice"),
        (GOOD + "  - {channel: st, address: 4, role: status, flags: {0: N}, applies_to: [w21003]}\n",
         "not a measurement channel"),
        (GOOD + "max_block: 1\n", "max_block 1"),
        (GOOD + "max_gap: -1\n", "max_gap: must be a non-negative integer"),
        (GOOD + "registers: [\n", "YAML syntax error"),
        ("- 1\n", "a profile is a mapping"),
    ],
)
def test_broken_profiles_are_refused_naming_the_file(tmp_path: Path, text, message):
    path = tmp_path / "acme.yaml"
    path.write_text(text.replace("{name}", "acme"), encoding="utf-8")
    with pytest.raises(profiles.ProfileError, match=message) as info:
        profiles.load_file(path)
    assert str(info.value).startswith(str(path))


def test_profile_name_must_match_its_file(tmp_path: Path):
    path = tmp_path / "acme.yaml"
    path.write_text(GOOD.replace("{name}", "other"), encoding="utf-8")
    with pytest.raises(profiles.ProfileError, match="must be the file name 'acme'"):
        profiles.load_file(path)
    path.write_text(GOOD.replace("{name}", "acme"), encoding="utf-8")
    assert profiles.load_file(path).registers[0].type == "float32"


def test_inline_entries_override_profile_entries_by_channel():
    base = profiles.load("dust-monitor").registers
    pm25 = RegisterSpec("a34004", 0x20, type="float32", order="CDAB", unit="ug/m3", range=(0, 500))
    extra = RegisterSpec("a34005", 0x22, type="float32", unit="ug/m3")
    merged = profiles.merge(base, [pm25, extra])
    assert [s.channel for s in merged] == [s.channel for s in base] + ["a34005"]
    assert merged[[s.channel for s in base].index("a34004")] == pm25
    assert len(merged) == len(base) + 1
    assert profiles.merge(base, []) == list(base)


def test_inline_mappings_change_only_the_keys_they_name():
    base = profiles.load("cod-analyzer").registers
    merged = profiles.merge(base, [{"channel": "w01018", "range": [0, 500]},
                                   {"channel": "flag", "ascii": "high"}])
    cod = merged[0]
    assert (cod.address, cod.order, cod.range) == (0x42, "DCBA", (0, 500))
    assert merged[1].ascii == "high"
    with pytest.raises(ValueError, match="unknown key"):
        profiles.merge(base, [{"channel": "w01018", "rang": [0, 1]}])
    with pytest.raises(ValueError):
        profiles.merge(base, [{"channel": "w21003"}])  # new channel without an address


def test_merge_refuses_duplicate_inline_channels_and_dangling_applies_to():
    base = profiles.load("flow-meter").registers
    with pytest.raises(ValueError, match="twice"):
        profiles.merge(base, [RegisterSpec("x", 10), RegisterSpec("x", 11)])
    with pytest.raises(ValueError, match="not a measurement channel"):
        profiles.merge(base, [RegisterSpec("w00000", 0, role="status", flags={0: "N"})])
