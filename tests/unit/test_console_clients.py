"""Who counts as one client of the web console (pure logic): the key under which its wrong passwords
(`_Throttle`) and its connections (`agent.consolehttp._Server`) are counted."""

from __future__ import annotations

from agent.consoleauth import MAX_AUTH_FAILURES, _Throttle, client_key


def test_ipv6_clients_count_per_64_ipv4_clients_per_address():
    """An IPv6 host chooses its own interface identifier: one attacker has the 2^64 addresses of its /64
    (SLAAC privacy addresses, or any it assigns itself), and counted per address its wrong passwords were
    never throttled. A /64 is one client; an IPv4 address too, also as an IPv6 listener sees it
    (::ffff:a.b.c.d, which counted per /64 would make every IPv4 client one)."""
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:eeee:dddd:cccc") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert client_key("fe80::1%eth0") == client_key("fe80::2") == "fe80::/64"
    assert client_key("::1") == "::/64"
    assert client_key("192.0.2.7") == client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.8") == "192.0.2.8"
    assert client_key("not an address") == "not an address"


def test_the_wrong_passwords_of_a_64_are_throttled_together():
    throttle = _Throttle()
    for i in range(MAX_AUTH_FAILURES):
        assert not throttle.blocked(f"2001:db8:1:2::{i + 1:x}")
        throttle.failed(f"2001:db8:1:2::{i + 1:x}")
    assert throttle.blocked("2001:db8:1:2:abcd::1"), "a fresh address of the same /64"
    assert not throttle.blocked("2001:db8:1:3::1"), "another /64"
    for _ in range(MAX_AUTH_FAILURES):
        throttle.failed("::ffff:192.0.2.7")
    assert throttle.blocked("192.0.2.7") and not throttle.blocked("::ffff:192.0.2.8")
