"""The independent checker of tests/hj212_strict.py (audit audhj) reproduces DOMAIN.md's own examples, and
refuses what DOMAIN.md forbids: a Modbus CRC, a wrong length, an exponent, a packet over 1036 bytes."""

from __future__ import annotations

from hj212_strict import STANDARD_ACK, STANDARD_EXAMPLE, build, check, crc_hj212

EXAMPLE_SEGMENT = (b"QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                   b"CP=&&RtdInterval=30&&")


def modbus_crc(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def test_the_checker_reproduces_domain_md_examples_exactly():
    assert crc_hj212(EXAMPLE_SEGMENT) == 0x1C80
    for example in (STANDARD_EXAMPLE, STANDARD_ACK):
        assert check(example).problems == []
        assert build(example[6:-6].decode()) == example


def test_the_checker_refuses_what_domain_md_forbids():
    modbus = b"##0101" + EXAMPLE_SEGMENT + b"%04X\r\n" % modbus_crc(EXAMPLE_SEGMENT)
    assert any("CRC" in p for p in check(modbus).problems)
    assert any("length" in p for p in check(STANDARD_EXAMPLE.replace(b"##0101", b"##0100")).problems)
    seg = "QN=20261201000000000;ST=32;CN=2011;PW=123456;MN=M1;Flag=4;CP=&&DataTime=20261201000000;{}&&"
    assert any("plain decimal" in p for p in check(build(seg.format("w01018-Rtd=1e-07,w01018-Flag=N"))).problems)
    assert any("data flag" in p for p in check(build(seg.format("w01018-Rtd=1,w01018-Flag=X"))).problems)
    assert any("exceeds" in p for p in check(build(seg.format("x-Rtd=" + "1" * 1000))).problems)
    assert check(build(seg.format("w01018-Rtd=-0.5,w01018-Flag=N"))).problems == []
