"""When ingest acknowledges an MQTT message: only after Kafka confirmed every record of it,
and, for a message refused as ``duplicate``, after the message that first carried its seq.
The MQTT client and the service are stand-ins recording what would be sent."""

from __future__ import annotations

import threading

from ingest.service import _PendingAck


class Client:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, _qos: int) -> None:
        self.acked.append(mid)


class Svc:
    def __init__(self) -> None:
        self.ack_lock = threading.Lock()
        self.inflight = threading.BoundedSemaphore(10)
        self.error: str | None = None

    def fatal(self, reason: str) -> None:
        self.error = reason


def pending(svc: Svc, client: Client, mid: int, records: int) -> _PendingAck:
    svc.inflight.acquire()
    return _PendingAck(svc, client, mid, 1, remaining=records + 1, forwarded=records)


def test_acknowledged_only_when_every_record_is_confirmed() -> None:
    svc, client = Svc(), Client()
    p = pending(svc, client, 1, records=2)
    p.delivered(None, None)  # the hand-off is complete (the +1)
    p.delivered(None, None)
    assert client.acked == []
    p.delivered(None, None)
    assert client.acked == [1] and p.done


def test_a_duplicate_waits_for_the_original() -> None:
    svc, client = Svc(), Client()
    original = pending(svc, client, 1, records=1)
    original.delivered(None, None)
    dup = pending(svc, client, 2, records=1)  # its `duplicate` rejection record
    dup.wait_for(original)
    dup.delivered(None, None)
    dup.delivered(None, None)  # the rejection is confirmed...
    assert client.acked == []  # ...but the original is not yet
    original.delivered(None, None)
    assert client.acked == [1, 2]


def test_waiting_for_a_confirmed_original_adds_nothing() -> None:
    svc, client = Svc(), Client()
    original = pending(svc, client, 1, records=1)
    original.delivered(None, None)
    original.delivered(None, None)
    dup = pending(svc, client, 2, records=1)
    dup.wait_for(original)
    dup.wait_for(None)  # a token from another kind of caller is ignored
    dup.delivered(None, None)
    dup.delivered(None, None)
    assert client.acked == [1, 2]


def test_a_failed_produce_stops_every_acknowledgement() -> None:
    svc, client = Svc(), Client()
    original = pending(svc, client, 1, records=1)
    original.delivered(None, None)
    dup = pending(svc, client, 2, records=1)
    dup.wait_for(original)
    dup.delivered(None, None)
    dup.delivered(None, None)
    original.delivered("broker down", None)  # Kafka refused the original's readings
    other = pending(svc, client, 3, records=1)
    other.delivered(None, None)
    other.delivered(None, None)
    assert client.acked == [] and svc.error  # the broker will redeliver all three
