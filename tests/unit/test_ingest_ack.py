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
        self.generation = 0
        self.reproduced: list[tuple[str, _PendingAck]] = []
        self.kafka_marked_ok = False

    def fatal(self, reason: str) -> None:
        self.error = reason

    def kafka_confirmed(self) -> None:
        pass

    def reproduce(self, err, msg, pending: _PendingAck) -> None:
        self.reproduced.append((msg, pending))


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


def test_a_record_kafka_did_not_confirm_is_produced_again_and_nothing_is_acked_before() -> None:
    svc, client = Svc(), Client()
    original = pending(svc, client, 1, records=1)
    original.delivered(None, None)
    dup = pending(svc, client, 2, records=1)
    dup.wait_for(original)
    dup.delivered(None, None)
    dup.delivered(None, None)
    original.delivered("broker down", "the record")  # not confirmed within message.timeout.ms
    assert svc.reproduced == [("the record", original)] and svc.error is None  # ingest goes on
    assert client.acked == []  # neither the original nor its duplicate
    original.delivered(None, None)  # the record produced again is confirmed
    assert client.acked == [1, 2]


def test_a_message_received_before_a_reconnect_is_not_acknowledged_on_the_new_connection() -> None:
    svc, client = Svc(), Client()
    old = pending(svc, client, 7, records=1)
    old.delivered(None, None)
    svc.generation += 1  # MQTT reconnected: the broker redelivers message 7 (it was not acked)
    again = pending(svc, client, 7, records=1)  # the redelivery, refused as a duplicate of `old`
    again.wait_for(old)
    again.delivered(None, None)
    again.delivered(None, None)
    old.delivered(None, None)  # Kafka confirms the original's readings after the reconnect
    assert client.acked == [7]  # once, for the redelivered copy: the packet id of this connection
    assert old.done and again.done
