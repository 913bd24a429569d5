"""`edge-agent run` against an HJ 212 platform written from DOMAIN.md alone (tests/hj212_platform.py, which
imports nothing of the agent): every packet on an uplink is checked as a strict platform checks it.

Framing (`##`, 4-digit length = data segment, at most 1024 characters, upper-case CRC of the standard's
algorithm, CRLF), header order QN ST CN PW MN Flag [PNUM PNO] CP, Flag version bits 2017 with the A bit
on data and the D bit exactly on pieces, pieces numbered 1..PNUM each dated, QN and DataTime in the
station's time, plain decimal numbers and data flags of the standard; then a backfill and a time request.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from harness import AgentProcess, sim_config, wait_for, write_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hj212_platform import STANDARD_ACK, STANDARD_EXAMPLE, Platform, crc212, frame, parse  # noqa: E402

STATION = "14010500000017"
TZ = "Asia/Kolkata"  # a half-hour offset: any time written in UTC or the machine's zone shows
HEADER = re.compile(r"QN=\d{17};ST=\d{2};CN=\d{4};PW=[^;]{0,6};MN=[^;]{1,24};Flag=\d+;(PNUM=\d+;PNO=\d+;)?CP=&&")
NUMBER = re.compile(r"-?\d+(\.\d+)?")


def local_now() -> datetime:
    return datetime.now(ZoneInfo(TZ)).replace(tzinfo=None)


def seconds_from_now(text: str) -> float:
    return abs((datetime.strptime(text[:14], "%Y%m%d%H%M%S") - local_now()).total_seconds())


def test_the_platforms_own_checks_reproduce_the_standards_examples():
    for example in (STANDARD_EXAMPLE, STANDARD_ACK):
        assert not parse(example).problems
        assert frame(parse(example).segment) == example
    assert crc212(b"QN=20160801085857223;ST=32;CN=1062;PW=100000;MN=010000A8900016F000169DC0;Flag=5;"
                  b"CP=&&RtdInterval=30&&") == 0x1C80


def test_every_uplink_packet_passes_a_strict_platforms_checks(tmp_path, broker):
    platform = Platform(pw="123456")
    try:
        config = sim_config(tmp_path, broker, station_id=STATION)
        config["station"]["timezone"] = TZ
        config["devices"] = {
            "cod": {"driver": "simulated", "interval": 1.0, "channels": {
                "w01018": {"unit": "mg/L", "mean": 23, "amplitude": 2, "period": 60, "noise": 0.1},
                "w21003": {"unit": "mg/L", "mean": 0.0000123, "dropout": 0.3}}},
            "wide": {"driver": "simulated", "interval": 1.0, "channels": {  # 40 items: a split packet
                f"a{c:05d}": {"unit": "ug/m3", "mean": 12345.678 + c} for c in range(40)}},
        }
        config["hj212"] = {"st": 32, "pw": "123456",
                           "uplinks": [{"host": "127.0.0.1", "port": platform.port, "timeout": 2, "retries": 1}]}
        agent = AgentProcess(write_config(tmp_path / "station.yaml", config))
        wait_for(lambda: len(platform.of_cn("2011")) >= 12, 30, "real-time packets")
        wait_for(lambda: sum(p.header.get("PNO") == "2" for p in platform.of_cn("2011")) >= 3, 30, "split ones")
        platform.send(frame(f"QN=20261129120000001;ST=32;CN=2011;PW=123456;MN={STATION};Flag=5;"
                            "CP=&&BeginTime=20000101000000;EndTime=20991231235959&&"))
        platform.send(frame(f"QN=20261129120000002;ST=32;CN=1011;PW=123456;MN={STATION};Flag=5;CP=&&&&"))
        wait_for(lambda: len([p for p in platform.of_cn("9012")]) >= 2, 20, "both requests executed")
        agent.stop()

        pieces: dict[str, list[int]] = defaultdict(list)
        for p in platform.packets:
            assert not p.problems, (p.raw, p.problems)
            assert HEADER.match(p.segment), p.raw
            h = p.header
            flag = int(h["Flag"])
            assert flag >> 2 == 1, f"version bits of 2017: {p.raw!r}"
            assert bool(flag & 2) == ("PNUM" in h), p.raw
            qn = h["QN"]
            if h["CN"] in ("9011", "9012"):
                assert (h["ST"], flag) == ("91", 4) and qn.startswith("2026112912"), p.raw
                continue
            assert h["ST"] == "32" and h["MN"] == STATION and h["PW"] == "123456", p.raw
            if qn.startswith("2026112912"):  # a record answering a request: no 9014 asked
                assert flag & 1 == 0, p.raw
            else:
                assert flag & 1 == 1, f"data asks for a 9014: {p.raw!r}"
                assert seconds_from_now(qn) < 60, f"QN in station time ({TZ}): {p.raw!r}"
            if h["CN"] == "1011":
                assert seconds_from_now(p.items()["SystemTime"]) < 60, p.raw
                continue
            assert h["CN"] == "2011", p.raw
            assert list(p.groups[0]) == ["DataTime"], f"every piece is dated: {p.raw!r}"
            assert seconds_from_now(p.groups[0]["DataTime"]) < 120, f"DataTime in station time: {p.raw!r}"
            if "PNUM" in h:
                pieces[qn + h["CN"]].append(int(h["PNO"]))
            for key, value in p.items().items():
                if key.endswith("-Rtd"):
                    assert NUMBER.fullmatch(value), f"plain decimal: {key}={value}"
                elif key.endswith("-Flag"):
                    assert value in "NFMSDCTB" and len(value) == 1, f"{key}={value}"
                else:
                    assert key == "DataTime", key
        assert pieces, "split packets were sent"
        for qn, numbers in pieces.items():
            assert sorted(set(numbers)) == list(range(1, max(numbers) + 1)), (qn, numbers)
        assert [p.items()["QnRtn"] for p in platform.of_cn("9011")] == ["1", "1"]
        assert [p.items()["ExeRtn"] for p in platform.of_cn("9012")] == ["1", "1"]
        assert any(p.header["QN"] == "20261129120000001" for p in platform.of_cn("2011")), "backfill records"
        assert not platform.junk
    finally:
        platform.close()
