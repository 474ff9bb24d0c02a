"""The benchmark's Kafka request counter: request headers found in TCP payloads, and the
segments to the broker's port picked out of loopback frames (bench/e2e/kafka_requests.py)."""

from __future__ import annotations

import struct

import pytest

from bench.e2e.kafka_requests import bpf_to_port, parse_requests, segment


def request(api_key: int, version: int, body: bytes = b"", correlation: int = 7) -> bytes:
    """A Kafka request: size, api_key, api_version, correlation id, client id, body."""
    rest = struct.pack(">hhi", api_key, version, correlation) + struct.pack(">h", 5) + b"tests" + body
    return struct.pack(">i", len(rest)) + rest


FETCH, PRODUCE, HEARTBEAT = request(1, 11, b"f" * 40), request(0, 7, b"p" * 900), request(12, 4)


@pytest.mark.parametrize(
    ("payload", "start", "keys", "next_at"),
    [
        (FETCH, 0, [1], len(FETCH)),
        (HEARTBEAT + FETCH, 0, [12, 1], len(HEARTBEAT) + len(FETCH)),
        # a produce request split over segments: the first carries its header, the next starts mid-way
        (PRODUCE[:100], 0, [0], len(PRODUCE)),
        # the boundary inside a segment: the tail of one request, then a whole one
        (PRODUCE[-50:] + FETCH, 50, [1], 50 + len(FETCH)),
        # not a header (the middle of a record batch): out of step
        (b"\x7f" * 64, 0, [], -1),
        (struct.pack(">ihh", 20, 99, 0) + b"x" * 20, 0, [], -1),  # unknown API key
        (b"", 0, [], 0),
    ],
)
def test_parse_requests(payload: bytes, start: int, keys: list[int], next_at: int) -> None:
    assert parse_requests(payload, start) == (keys, next_at)


def frame(sport: int, dport: int, seq: int, payload: bytes, *, ethertype: int = 0x0800, proto: int = 6) -> bytes:
    eth = b"\0" * 12 + struct.pack(">H", ethertype)
    tcp = struct.pack(">HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
    lo = b"\x7f\0\0\1"
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, proto, 0, lo, lo)
    return eth + ip + tcp + payload


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (frame(50000, 9092, 123, FETCH), (50000, 123, FETCH, len(FETCH))),
        (frame(9092, 50000, 123, FETCH), None),  # from the broker: an answer, not a request
        (frame(50000, 9093, 123, FETCH), None),  # another port
        (frame(50000, 9092, 123, FETCH, proto=17), None),  # UDP
        (frame(50000, 9092, 123, FETCH, ethertype=0x0806), None),  # not IP
        # cut short by the socket's filter: what was captured, and how long the payload really is
        (frame(50000, 9092, 5, PRODUCE)[:54 + 100], (50000, 5, PRODUCE[:100], len(PRODUCE))),
    ],
)
def test_segment(raw: bytes, expected) -> None:
    assert segment(raw, 9092) == expected


def test_the_filter_keeps_the_port_it_is_given_and_drops_the_rest() -> None:
    program = bpf_to_port(9092)
    keep, drop = len(program) - 2, len(program) - 1
    assert program[keep] == (0x06, 0, 0, 2048) and program[drop] == (0x06, 0, 0, 0)
    assert program[keep - 1] == (0x15, 0, 1, 9092)  # the port test: match -> keep, else -> drop
    for i, (code, jt, jf, _k) in enumerate(program):
        if code in (0x15, 0x45):  # conditional jumps: each check's failure lands on the drop
            targets = {i + 1 + jt, i + 1 + jf}
            assert drop in targets and targets <= set(range(i + 1, len(program)))
