"""Pure parts of storage: migration variants per mode, the sink's batch decoding, the
deterministic storage_refused rejection and the binary COPY encoding of readings."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pilotlab.contracts import KafkaTopics, Reading, ReadingBatch, Reason, pack_batches
from storage.migrate import available
from storage.sink import TOPICS, UNDECODABLE, Batch, Record, storage_refusal, unpacked
from storage.writer import IncomingReadings, NotEncodable, encode_readings_copy, reading_columns


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


# --- the binary COPY encoder of readings (storage.writer.encode_readings_copy) ---------------


def parse_copy(data: bytes) -> list[tuple]:
    """A binary COPY stream of the eight reading columns back as rows of Python values in
    ``reading_columns``' order (an independent reader of the format, for the test)."""
    assert data.startswith(b"PGCOPY\n\xff\r\n\x00") and data.endswith(b"\xff\xff")
    view, pos, rows = data[19:-2], 0, []
    while pos < len(view):
        (nfields,) = struct.unpack_from(">h", view, pos)
        assert nfields == 8
        pos += 2
        fields = []
        for _ in range(nfields):
            (size,) = struct.unpack_from(">i", view, pos)
            fields.append(view[pos + 4 : pos + 4 + size])
            pos += 4 + size
        exp, dev, grp, recv, ts, seq, metric, value = fields
        us = lambda b: struct.unpack(">q", b)[0]  # noqa: E731
        pg_epoch = datetime(2000, 1, 1, tzinfo=UTC)
        rows.append((
            pg_epoch + timedelta(microseconds=us(ts)), exp.decode(), dev.decode(), grp.decode(), metric.decode(),
            struct.unpack(">d", value)[0], us(seq), pg_epoch + timedelta(microseconds=us(recv)),
        ))  # fmt: skip
    return rows


names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=12)
readings = st.builds(
    Reading,
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-10**12, 10**13),
    st.dictionaries(names, st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**60), 2**60)),
                    max_size=4),
)  # fmt: skip
reading_batches = st.builds(
    ReadingBatch, names, names, st.sampled_from(["treatment", "control"]), st.integers(0, 10**13),
    st.lists(readings, max_size=5).map(tuple),
)  # fmt: skip


@given(st.lists(reading_batches, max_size=4))
def test_the_binary_copy_holds_the_same_rows_as_the_columns(batches):
    data, n = encode_readings_copy([IncomingReadings.of(b) for b in batches])
    expected = list(zip(*reading_columns(batches), strict=True))
    assert n == len(expected)
    assert parse_copy(data) == [(*r[:5], float(r[5]), *r[6:]) for r in expected]


@pytest.mark.parametrize(
    ("batch", "why"),
    [
        (ReadingBatch("e", "bad\x00dev", "treatment", 1, (Reading(1, 1, {"no2": 1.0}),)), "NUL in a text field"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(1, 1, {"no\x002": 1.0}),)), "NUL in a metric name"),
        (ReadingBatch("e", 7, "treatment", 1, (Reading(1, 1, {"no2": 1.0}),)), "a number for a text field"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(1, 1, {"no2": None}),)), "a null value"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(1, 1, {"no2": True}),)), "a boolean value"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(1, 1, {"no2": "3"}),)), "a string value"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(1, 1, {"no2": 10**400}),)), "beyond float8"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(True, 1, {"no2": 1.0}),)), "a boolean seq"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(2**63, 1, {"no2": 1.0}),)), "seq beyond int8"),
        (ReadingBatch("e", "d", "treatment", 1, (Reading(1, 1.5, {"no2": 1.0}),)), "a fractional ts_ms"),
        (ReadingBatch("e", "d", "treatment", 10**17, (Reading(1, 1, {"no2": 1.0}),)), "received beyond int8 µs"),
    ],
)
def test_what_the_encoder_declines_goes_the_text_path(batch, why):
    """Declined batches are written by write_readings_merge, where psycopg and the database judge
    the values exactly as before the binary path (a NUL is refused with psycopg's own message)."""
    with pytest.raises(NotEncodable):
        encode_readings_copy([IncomingReadings.of(batch)])


def test_an_empty_batch_is_a_complete_empty_copy_stream():
    data, n = encode_readings_copy([IncomingReadings("e", "d", "control", 1, [])])
    assert n == 0 and parse_copy(data) == []


@given(reading_batches)
def test_the_lean_decode_reads_what_reading_batch_reads(b):
    lean = IncomingReadings.from_json(b.to_json())
    assert lean.batch() == ReadingBatch.from_json(b.to_json())
    assert IncomingReadings.of(b).batch() == b


@given(st.lists(reading_batches, min_size=1, max_size=5))
def test_a_packed_record_decodes_to_its_batches_in_order(bs):
    raw = pack_batches([b.to_json() for b in bs])
    assert [lean.batch() for lean in IncomingReadings.all_from_json(raw)] == ReadingBatch.all_from_json(raw) == bs
    batch = Batch()
    batch.add_record(Record(KafkaTopics.READINGS, 0, 7, raw))
    assert [r.batch() for r in batch.readings] == bs and batch.offsets == {(KafkaTopics.READINGS, 0): 8}
    # the slow path after a refused batch writes (and refuses) each packed batch alone
    parts = unpacked(Record(KafkaTopics.READINGS, 0, 7, raw))
    assert [ReadingBatch.from_json(r.value) for r in parts] == bs
    assert {(r.partition, r.offset) for r in parts} == {(0, 7)}


def test_only_a_packed_readings_record_is_unpacked():
    kpis = Record(KafkaTopics.KPIS, 0, 1, b"[1, 2]")
    broken = Record(KafkaTopics.READINGS, 0, 1, b"[{not json")
    assert unpacked(kpis) == [kpis] and unpacked(broken) == [broken]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"experiment_id": "e", "device_id": "d", "group": "control", "received_ms": 1}',
        b'{"experiment_id": "e", "device_id": "d", "group": "control", "received_ms": 1, "readings": [[1, 2]]}',
        b'{"experiment_id": "e", "device_id": "d", "group": "control", "received_ms": 1, "readings": [[1, 2, {}, 4]]}',
        b'{"experiment_id": "e", "device_id": "d", "group": "control", "received_ms": 1, "readings": [7]}',
        b'{"experiment_id": "e", "device_id": "d", "group": "control", "received_ms": 1, "readings": 7}',
        b'{"device_id": "d", "group": "control", "received_ms": 1, "readings": []}',
        b"[1, 2, 3]",
        b"{not json",
    ],
)
def test_the_lean_decode_fails_where_reading_batch_fails(raw):
    """The sink turns these errors into storage_refused rejections (sink.UNDECODABLE)."""
    with pytest.raises(UNDECODABLE) as theirs:
        ReadingBatch.from_json(raw)
    with pytest.raises(UNDECODABLE) as ours:
        IncomingReadings.from_json(raw)
    assert type(ours.value) is type(theirs.value)
