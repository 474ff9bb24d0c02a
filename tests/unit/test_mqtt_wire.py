"""The load generator's MQTT packets (bench/e2e/mqtt_wire.py): what it writes is MQTT 3.1.1,
and what it reads is split into whole packets however the bytes arrive."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bench.e2e.mqtt_wire import _remaining_length, _utf8, connect_packet, publish_packet, read_packets


def test_the_remaining_length_is_mqtts_variable_byte_integer():
    # MQTT 3.1.1 §2.2.3's examples
    assert _remaining_length(0) == b"\x00"
    assert _remaining_length(127) == b"\x7f"
    assert _remaining_length(128) == b"\x80\x01"
    assert _remaining_length(16_383) == b"\xff\x7f"
    assert _remaining_length(16_384) == b"\x80\x80\x01"
    assert _remaining_length(268_435_455) == b"\xff\xff\xff\x7f"


def test_connect_is_3_1_1_with_clean_session_credentials_and_no_keep_alive():
    p = connect_packet("c1", "user", "pw")
    assert p[0] == 0x10
    body = p[2:]
    assert p[1] == len(body)
    assert body[:6] == b"\x00\x04MQTT" and body[6] == 4  # protocol name, level 4
    assert body[7] == 0x80 | 0x40 | 0x02  # user name, password, clean session
    assert body[8:10] == b"\x00\x00"  # keep-alive off
    assert body[10:] == b"\x00\x02c1" + b"\x00\x04user" + b"\x00\x02pw"
    assert connect_packet("c1", None, None)[9] == 0x02  # anonymous: clean session only


def test_a_publish_is_qos_1_with_its_packet_id():
    p = publish_packet(_utf8("a/b"), 513, b"xyz")
    assert p == b"\x32\x0a" + b"\x00\x03a/b" + b"\x02\x01" + b"xyz"


packets = st.lists(st.tuples(st.sampled_from([0x40, 0xD0, 0x20, 0x32]), st.binary(max_size=300)), max_size=20)


@given(packets, st.data())
def test_packets_come_out_whole_however_the_bytes_are_split(pkts, data):
    wire = b"".join(bytes([kind]) + _remaining_length(len(body)) + body for kind, body in pkts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    buf, got, last = bytearray(), [], 0
    for cut in [*cuts, len(wire)]:
        buf += wire[last:cut]
        last = cut
        got += read_packets(buf)
    assert got == pkts
    assert buf == bytearray()  # nothing left over once every byte is in
