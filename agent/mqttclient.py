"""The paho client the publisher uses: paho's own, except that an oversized incoming PUBLISH is not kept.

A command on P/cmd is a few hundred bytes, and anything longer than the publisher's limit is refused
without being decoded (SPEC §4: answered ok:false and ignored). paho 2.x has no limit of its own on what
it receives, and with MQTT 3.1.1 the broker cannot be told one (MQTT 5's Maximum Packet Size): paho
gathers the whole packet in a bytearray, then copies it three times while splitting off the topic and
the packet id (`_packet.decode_publish`, `struct.unpack` of the rest each time). A 20 MB message on
P/cmd took the agent from 44 MB to ~104 MB resident, and glibc kept much of it afterwards.

`Client` keeps paho's reading, but once the packet being read is a PUBLISH longer than `keep` bytes
(the longest topic, the packet id and `keep_payload` bytes of payload), it drops the bytes received
past that before paho appends the next ones: paho still reads the whole packet off the socket (it must,
to stay in step with the stream), acknowledges it at QoS 1 and hands it to `on_message`, but with its
payload cut to its first bytes (`keep_payload` at least) and the last chunk received: always longer than
the publisher's limit, so it is refused as "larger than" and never looked into. The peak is then about
`keep` plus one socket read (64 KiB at most: paho would ask the socket for the whole rest at once).

This reaches into two of paho's private names (`_sock_recv`, `_in_packet`); when a paho release no
longer has them as expected, `Client` behaves exactly as paho's (the check is done at each packet).
"""

from __future__ import annotations

import paho.mqtt.client as mqtt

PUBLISH = 0x30
MAX_TOPIC = 65_535  # an MQTT topic's longest (its length is two bytes)
RECV_CHUNK = 65_536  # the most asked of the socket at once while a long packet is read


class Client(mqtt.Client):
    """paho's client with a bound on what an incoming PUBLISH may hold in memory (see the module)."""

    def __init__(self, *args, keep_payload: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep = 2 + MAX_TOPIC + 2 + keep_payload  # topic length, topic, packet id, payload kept
        self.cut_packets = 0  # oversized PUBLISH packets received so far (for tests and logs)
        self._cutting = False

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = getattr(self, "_in_packet", None)
        if not isinstance(packet, dict):  # not the paho this was written for: do as paho does
            return super()._sock_recv(bufsize)
        if not packet.get("have_remaining"):  # a new packet's fixed header is being read
            self._cutting = False
            return super()._sock_recv(bufsize)
        body = packet.get("packet")
        long_publish = (packet.get("command", 0) & 0xF0 == PUBLISH
                        and packet.get("remaining_length", 0) > self.keep and isinstance(body, bytearray))
        if not long_publish:
            return super()._sock_recv(bufsize)
        if not self._cutting:
            self._cutting = True
            self.cut_packets += 1
        if len(body) > self.keep:
            del body[self.keep:]  # what paho appended last time: read, never kept
        return super()._sock_recv(min(bufsize, RECV_CHUNK))
