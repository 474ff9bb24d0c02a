"""Pure parts of storage: migration variants per mode, the sink's batch decoding and the
deterministic storage_refused rejection."""

from __future__ import annotations

from pilotlab.contracts import KafkaTopics, Reading, ReadingBatch, Reason
from storage.migrate import available
from storage.sink import TOPICS, Batch, Record, storage_refusal


def test_each_mode_gets_one_variant_of_every_version():
    ts, pg = available("timescaledb"), available("postgresql")
    assert [m.version for m in ts] == [m.version for m in pg]
    assert len({m.version for m in ts}) == len(ts)
    assert {m.mode for m in ts} == {"", "timescaledb"}
    assert {m.mode for m in pg} == {"", "postgresql"}
    assert "create_hypertable" in next(m.sql for m in ts if m.mode == "timescaledb")
    assert "create_hypertable" not in "".join(m.sql for m in pg)


def test_the_sink_subscribes_to_late_readings_and_device_status():
    assert {KafkaTopics.LATE, KafkaTopics.DEVICE_STATUS} <= set(TOPICS)


def test_batch_routes_records_and_keeps_the_last_offset_per_partition():
    rb = ReadingBatch("e", "d", "treatment", 1, (Reading(1, 1000, {"no2": 1.0}),))
    batch = Batch()
    batch.add_record(Record(KafkaTopics.READINGS, 0, 7, rb.to_json()))
    batch.add_record(Record(KafkaTopics.LATE, 2, 3, rb.to_json()))
    batch.add_record(Record(KafkaTopics.READINGS, 0, 8, rb.to_json()))
    assert len(batch.readings) == 2 and len(batch.late) == 1
    assert batch.offsets == {(KafkaTopics.READINGS, 0): 9, (KafkaTopics.LATE, 2): 4}


def test_an_undecodable_record_becomes_a_storage_refused_rejection_not_an_exception():
    batch = Batch()
    batch.add_record(Record(KafkaTopics.DEVICE_STATUS, 1, 5, b'{"experiment_id": "e"}', 42))
    batch.add_record(Record(KafkaTopics.READINGS, 1, 6, b"\x00\xff not json", 43))
    assert [r.reason for r in batch.rejections] == [Reason.STORAGE_REFUSED] * 2
    assert batch.rejections[0].experiment_id == "e"
    assert batch.offsets[(KafkaTopics.READINGS, 1)] == 7  # the partition moves on


def test_storage_refusal_is_deterministic_and_free_of_nul_bytes():
    rec = Record(KafkaTopics.READINGS, 0, 11, b'{"experiment_id": "a\\u0000b", "device_id": "d1"}', 5)
    a, b = storage_refusal(rec, "client: NUL\x00 here"), storage_refusal(rec, "another message")
    assert a.rejection_id == b.rejection_id  # a replay is stored once
    other = storage_refusal(Record(rec.topic, 0, 12, rec.value, 5), "x")
    assert other.rejection_id != a.rejection_id  # the same bytes at another offset are another record
    assert a.experiment_id is None and a.device_id == "d1"
    assert "\x00" not in a.detail and "\x00" not in a.excerpt
    assert a.received_ms == 5
