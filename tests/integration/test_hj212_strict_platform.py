"""`edge-agent run` checked by a second independent HJ 212 platform (tests/hj212_strict.py, audit audhj, written
from DOMAIN.md and SPEC.md §4 alone): every packet on the TCP uplink and on MQTT (`payload: hj212`), with tiny,
huge, negative and missing values and split packets; the 2051 statistics recomputed from the 2011 packets
received; and a platform's malformed input (bad CRC, truncated frame, giant length, binary noise, missing CRLF,
wrong PW/ST/MN, short QN, bad times) refused while the uplink goes on answering and delivering."""

from __future__ import annotations

import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from harness import AgentProcess, Collector, sim_config, wait_for, write_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clockshift import ShiftedClock  # noqa: E402
from hj212_strict import StrictPlatform, build, check  # noqa: E402

STATION = "14010500000017"
PW = "123456"


def station(tmp_path, broker, platform: StrictPlatform) -> dict:
    config = sim_config(tmp_path, broker, station_id=STATION, mqtt={"payload": "hj212"})
    config["devices"] = {
        "cod": {"driver": "simulated", "interval": 1.0, "channels": {
            "w01018": {"unit": "mg/L", "mean": 23, "amplitude": 2, "period": 60, "noise": 0.1},
            "w21003": {"unit": "mg/L", "mean": 0.0000000123, "dropout": 0.3},
            "w01010": {"unit": "°C", "mean": -5.5, "noise": 0.01},
            "w00000": {"unit": "L/s", "mean": 1e20}}},
        # seeded: its first poll fails (a 2-second device with 30 % dropouts had none in a short run now and then)
        "pm": {"driver": "simulated", "interval": 2.0, "dropout": 0.3, "seed": 1, "channels": {
            "a34004": {"unit": "ug/m3", "mean": 45, "noise": 3}}},
        "wide": {"driver": "simulated", "interval": 2.0, "channels": {  # 60 items: split packets
            f"a{c:05d}": {"unit": "ug/m3", "mean": 12345.678 + c} for c in range(60)}},
    }
    config["aggregate"] = {"minute": 1, "hour": False, "day": False}
    config["hj212"] = {"st": 32, "pw": PW,
                       "uplinks": [{"host": "127.0.0.1", "port": platform.port, "timeout": 2, "retries": 1}]}
    return config


def whole_packets(packets) -> list[tuple[str, str, dict[str, dict[str, str]]]]:
    """(CN, DataTime, items by code) per QN, the pieces of a split packet joined."""
    joined: dict[tuple[str, str], dict] = {}
    for c in packets:
        entry = joined.setdefault((c.cn, c.qn), {"time": c.item("DataTime"), "codes": defaultdict(dict)})
        for code, fields in c.codes().items():
            entry["codes"][code].update(fields)
    return [(cn, e["time"], dict(e["codes"])) for (cn, _), e in joined.items()]


def test_every_packet_on_the_uplink_and_on_mqtt_passes_a_second_strict_platform(tmp_path, broker, clockshift):
    platform = StrictPlatform(pw=PW)
    collector = Collector(broker, f"env/{STATION}/#")
    clock = ShiftedClock(tmp_path / "clock-offset", clockshift)
    clock.lead_to_a_minute(20)
    agent = AgentProcess(write_config(tmp_path / "station.yaml", station(tmp_path, broker, platform)), env=clock.env)

    def mqtt_packets(suffix: str):
        return [check(p) for t, p, _ in list(collector.messages) if t.endswith(suffix)]

    try:
        wait_for(lambda: platform.of("2051") and mqtt_packets("/agg"), 90, "minute data on both")
        wait_for(lambda: sum(c.head.get("PNO") == "2" for c in platform.of("2011")) >= 2, 30, "split packets")
        wait_for(lambda: any(items.get("a34004") == {"Flag": "B"} for cn, _, items
                             in whole_packets(list(platform.packets)) if cn == "2011"), 30, "a failed dust poll")
    finally:
        assert agent.stop() == 0
        collector.close()
        platform.close()
    uplink = list(platform.packets)
    mqtt = mqtt_packets("/data") + mqtt_packets("/agg")
    for c in uplink + mqtt:
        assert c.problems == [], (c.problems, c.raw)
    assert all(c.flag & 1 for c in uplink) and not any(c.flag & 1 for c in mqtt), "9014 asked on TCP only"
    for packets in (uplink, mqtt):
        frames = Counter((c.qn, c.head.get("PNO")) for c in packets)
        assert all(n == 1 or len({c.raw for c in packets if (c.qn, c.head.get("PNO")) == k}) == 1
                   for k, n in frames.items()), "a QN names one packet (a resend repeats it unchanged)"
        pieces = defaultdict(set)
        for c in packets:
            if "PNUM" in c.head:
                pieces[(c.qn, int(c.head["PNUM"]))].add(int(c.head["PNO"]))
        assert pieces and all(got == set(range(1, n + 1)) for (_, n), got in pieces.items())
    rtd = [p for p in whole_packets(uplink) if p[0] == "2011"]
    values = [items["w21003"].get("Rtd") for _, _, items in rtd if "Rtd" in items.get("w21003", {})]
    assert values and set(values) == {"0.0000000123"}
    assert {items["w00000"]["Rtd"] for _, _, items in rtd if "w00000" in items} == {"1" + "0" * 20}
    assert {items["w01010"]["Rtd"][:2] for _, _, items in rtd if "w01010" in items} == {"-5"}
    assert any(items.get("a34004") == {"Flag": "B"} for _, _, items in rtd), "a failed poll is its flag alone"
    for cn, start, items in whole_packets(uplink):
        if cn != "2051":
            continue
        assert start.endswith("00"), start
        for code, stats in items.items():
            got = [(fields.get("Rtd"), fields["Flag"]) for _, t, its in rtd if t[:12] == start[:12]
                   for c, fields in its.items() if c == code]
            valid = [float(v) for v, flag in got if v is not None and flag == "N"]
            if not valid:
                assert set(stats) == {"Flag"} and stats["Flag"] != "N", (code, stats)
                continue
            assert float(stats["Min"]) == min(valid) and float(stats["Max"]) == max(valid), (code, stats)
            assert math.isclose(float(stats["Avg"]), math.fsum(valid) / len(valid), rel_tol=1e-9), (code, stats)
            interval = 1.0 if code.startswith("w") else 2.0
            enough = len(valid) >= math.ceil(0.75 * 60 / interval)  # DOMAIN.md: 75 % normal values give N
            assert stats["Flag"] == ("N" if enough else "B"), (code, stats, len(valid))


def test_malformed_input_from_the_platform_is_refused_and_the_uplink_goes_on(tmp_path, broker):
    platform = StrictPlatform(pw=PW)
    config = station(tmp_path, broker, platform)
    config["mqtt"]["payload"] = "json"
    agent = AgentProcess(write_config(tmp_path / "station.yaml", config))

    def request(qn: str, cn: str, cp: str = "", *, pw: str = PW, st: str = "32", mn: str = STATION) -> bytes:
        return build(f"QN={qn};ST={st};CN={cn};PW={pw};MN={mn};Flag=5;CP=&&{cp}&&")

    def answers(qn: str) -> list[tuple[str, str | None]]:
        return [(c.cn, c.item("QnRtn") or c.item("ExeRtn")) for c in list(platform.packets) if c.qn == qn]

    bad_crc = bytearray(request("20261201000000090", "1011"))
    bad_crc[-3] = ord("0") if bad_crc[-3] != ord("0") else ord("1")
    bad_inputs = [
        bytes(bad_crc),
        b"##0900QN=2026120100",  # truncated: the next request's CRLF ends it
        b"##9999" + b"A" * 3000 + b"\r\n",  # a length no packet may have
        bytes(range(256)) * 40,  # binary noise, with '#' and CR LF in it
        b"##0000FFFF\r\n",
        request("20261201000000091", "1011").replace(b"\r\n", b""),  # no CRLF: never executed
    ]
    refusals = {
        "3": request("20261201000000092", "1011", pw="999999"),
        "5": request("20261201000000093", "1011", st="22"),
        "4": request("20261201000000094", "1011", mn="OTHER"),
        "8": request("20261201000000095", "3020"),
        "2": request("20261201000000096", "2051", "BeginTime=20261231000000;EndTime=20261201000000"),
    }
    try:
        wait_for(lambda: len(platform.of("2011")) >= 3, 30, "real-time data")
        for n, bad in enumerate(bad_inputs, start=1):
            platform.send(bad)
            qn = f"202612010000001{n:02d}"
            platform.send(request(qn, "1011"))
            wait_for(lambda qn=qn: ("9012", "1") in answers(qn), 10, f"the request after bad input {n}")
            assert [cn for cn, _ in answers(qn)] == ["9011", "1011", "9012"], answers(qn)
        assert answers("20261201000000090") == [("9011", "9")], "a bad CRC is answered QnRtn=9, never executed"
        assert answers("20261201000000091") == []
        for bad in refusals.values():
            platform.send(bad)
        wait_for(lambda: len(platform.of("9011")) >= len(bad_inputs) + 1 + len(refusals), 10, "the refusals")
        for code, bad in refusals.items():
            assert answers(check(bad).qn) == [("9011", code)], (code, answers(check(bad).qn))
        before = len(platform.of("2011"))
        wait_for(lambda: len(platform.of("2011")) >= before + 3, 30, "data still delivered")
        assert agent.alive()
    finally:
        assert agent.stop() == 0
        platform.close()
    for c in platform.packets:
        assert c.problems == [], (c.problems, c.raw)
