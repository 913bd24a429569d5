"""A slow but honest Modbus TCP gateway: its answer's MBAP header comes before the bus timeout and the
rest after it (a gateway that writes the header and the PDU apart, a slave just at the timeout). The
answer is late as a whole, like one that arrives whole after the timeout, and must read the same:
taken by the next try, on the same connection, never a reading lost and a reconnection at every try."""

from __future__ import annotations

from harness import wait_for
from instruments import ModbusTcpServer, Unit
from test_independent_modbus import readings, run_station  # noqa: F401 - a fixture


def test_an_answer_split_around_the_timeout_reads_like_a_late_whole_one(tmp_path, run_station, collector):  # noqa: F811
    split, whole = Unit(1, mode="late_split", delay=0.2, split_gap=0.2), Unit(2, delay=0.4)
    split.put("holding", 0, 0x1234, "uint16")
    whole.put("holding", 0, 0x4321, "uint16")
    servers = [ModbusTcpServer([split]).start(), ModbusTcpServer([whole]).start()]
    try:
        buses = {f"gw{i}": {"type": "tcp", "host": "127.0.0.1", "port": s.port, "timeout": 0.3, "retries": 1}
                 for i, s in enumerate(servers)}
        devices = {name: {"bus": f"gw{i}", "slave": i + 1, "interval": 1.0,
                          "registers": [{"channel": "w21003", "address": 0, "type": "uint16"}]}
                   for i, name in enumerate(("split", "whole"))}
        run_station(buses, devices)
        wait_for(lambda: len(readings(collector, "split")) >= 6 and len(readings(collector, "whole")) >= 6, 40,
                 "six polls of each device")
        assert {(r["value"], r["flag"]) for r in readings(collector, "whole")} == {(0x4321, "N")}
        assert {(r["value"], r["flag"]) for r in readings(collector, "split")} == {(0x1234, "N")}
        assert servers[0].connections == 1, f"{servers[0].connections} connections to the split gateway"
    finally:
        for s in servers:
            s.close()
