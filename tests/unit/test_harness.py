"""The test harness itself: what a failed test leaves running is ended with it."""

from __future__ import annotations

import os

from harness import Broker, kill_leftovers


def test_a_broker_a_failed_test_did_not_stop_ends_with_the_test(tmp_path):
    """Tests stop their brokers after the assertions (test_buffer_damaged_running.py, say): one that
    failed left its mosquitto running for good (a dozen of them on the shared machine after a few runs)."""
    broker = Broker(tmp_path / "broker").start()
    proc = broker.proc
    assert proc is not None
    kill_leftovers()  # what the autouse fixture does after every test
    assert proc.poll() is not None, "mosquitto still running after the test"
    broker.stop()  # a test's own stop afterwards is harmless


def _read_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the test server closed the connection"
        data += chunk
    return data


def _tcp_answer_tids(requests: list[tuple[int, int]]) -> list[int]:
    """Send read requests (transaction id, unit) to a ModbusTcpServer serving a slow unit 2 (1.6 s)
    and a quick unit 1 (0.4 s) on one connection, all at once; the transaction ids of the answers,
    in the order they arrive."""
    import socket
    import struct

    from instruments import ModbusTcpServer, Unit

    quick, slow = Unit(1, delay=0.4), Unit(2, delay=1.6)
    quick.put("holding", 0, 111)
    slow.put("holding", 0, 222)
    server = ModbusTcpServer([quick, slow]).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for tid, unit in requests:
                sock.sendall(struct.pack(">HHHBBHH", tid, 0, 6, unit, 3, 0, 1))
            tids = []
            for _ in requests:
                tid, _, length = struct.unpack(">HHH", _read_exact(sock, 6))
                _read_exact(sock, length)
                tids.append(tid)
            return tids
    finally:
        server.close()


def test_a_slow_unit_of_the_tcp_test_server_does_not_hold_up_its_neighbour():
    """Each unit of the test's Modbus TCP server is its own instrument: while one takes its `delay`, the
    others answer theirs. Served one after the other, a quick unit asked just after a slow one answered
    after both delays, and the agent's test of an answer inside the timeout (timeout 1 s, delays 0.4 and
    1.6 s) raced at zero margin. A unit still answers its own requests in order."""
    assert _tcp_answer_tids([(1, 2), (2, 1)]) == [2, 1]
    assert _tcp_answer_tids([(1, 2), (2, 2), (3, 1)]) == [3, 1, 2]


def test_a_slow_unit_on_the_rtu_test_line_does_not_hold_up_its_neighbour(tmp_path):
    """Likewise on the test's RS-485 line: a slave's thinking time does not keep the others deaf."""
    import select
    import time

    from instruments import ModbusRtuSlave, Unit, with_crc

    quick, slow = Unit(1, delay=0.4), Unit(2, delay=1.6)
    quick.put("holding", 0, 111)
    slow.put("holding", 0, 222)
    line = ModbusRtuSlave([quick, slow], tmp_path / "ttyBUS").start()
    fd = os.open(line.path, os.O_RDWR | os.O_NOCTTY)
    try:
        for unit in (2, 2, 1):
            os.write(fd, with_crc(bytes([unit, 3, 0, 0, 0, 1])))
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < 3 * 7 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                got += os.read(fd, 64)
        answers = [got[i:i + 7] for i in range(0, len(got), 7)]
        assert answers == [with_crc(bytes([1, 3, 2, 0, 111])), with_crc(bytes([2, 3, 2, 0, 222])),
                           with_crc(bytes([2, 3, 2, 0, 222]))]
    finally:
        os.close(fd)
        line.close()
