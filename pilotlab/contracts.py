"""The contracts every service shares: topic names, reason codes, ingest's limits, the impact
warnings, the reading, the rejection, the KPI value.

Records travel through Kafka as compact JSON (orjson). Times inside Kafka are epoch
milliseconds (UTC); in Python they are timezone-aware ``datetime`` objects.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

# --- MQTT topics -------------------------------------------------------------------------

TELEMETRY_TOPIC = "pilots/{experiment_id}/{device_id}/telemetry"
FEEDBACK_TOPIC = "pilots/{experiment_id}/{device_id}/feedback"
TELEMETRY_SUBSCRIPTION = "pilots/+/+/telemetry"


def telemetry_topic(experiment_id: str, device_id: str) -> str:
    return TELEMETRY_TOPIC.format(experiment_id=experiment_id, device_id=device_id)


def feedback_topic(experiment_id: str, device_id: str) -> str:
    return FEEDBACK_TOPIC.format(experiment_id=experiment_id, device_id=device_id)


# --- Kafka topics ------------------------------------------------------------------------


class KafkaTopics:
    """Kafka topic names. Readings are keyed by experiment id (docs/experiments.md, Partitioning and its limit)."""

    READINGS = "pilotlab.readings"
    KPIS = "pilotlab.kpis"
    REJECTIONS = "pilotlab.rejections"
    REGISTRY = "pilotlab.registry"
    LATE = "pilotlab.late"  # readings too late to count in their KPI windows
    DEVICE_STATUS = "pilotlab.device-status"  # first report, then online/offline transitions per device

    ALL = (READINGS, KPIS, REJECTIONS, REGISTRY, LATE, DEVICE_STATUS)
    COMPACTED = (REGISTRY,)


# --- reason codes --------------------------------------------------------------------------


class Reason(enum.StrEnum):
    """Why a message (or one item of a batch) was refused. Stable: startups code against them."""

    BAD_TOPIC = "bad_topic"
    MALFORMED_JSON = "malformed_json"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BATCH_TOO_LARGE = "batch_too_large"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    NON_FINITE = "non_finite"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    TIMESTAMP_TOO_OLD = "timestamp_too_old"
    UNKNOWN_EXPERIMENT = "unknown_experiment"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_NOT_IN_EXPERIMENT = "device_not_in_experiment"
    UNKNOWN_METRIC = "unknown_metric"
    UNKNOWN_UNIT = "unknown_unit"  # a unit the metric table cannot convert to the canonical one
    UNSUPPORTED_SENML = "unsupported_senml"  # SenML features pilotlab does not take (vs, vb, vd, ...)
    DUPLICATE = "duplicate"  # a device's seq seen again (ingest's bounded memory; docs/payloads.md)
    # the same (device, metric, ts) accepted before with another value (storage keeps one)
    CONFLICTING_READING = "conflicting_reading"
    # raised by the sink when the database refuses a row
    STORAGE_REFUSED = "storage_refused"


# --- what ingest accepts ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """What ingest accepts: a message's size, a batch's items and the timestamp window, judged
    against the time the message reaches ingest. Ingest enforces them (``ingest.decode``); the
    simulators judge their ground truth with the same rule (``simulators.faults``)."""

    max_payload_bytes: int = 256 * 1024
    max_batch: int = 500
    max_age_ms: int = 7 * 86400 * 1000
    max_future_ms: int = 300 * 1000

    def ts_verdict(self, ts_ms: int, now_ms: int) -> Reason | None:
        """The timestamp window at ``now_ms``: the refusal, or None when accepted."""
        if ts_ms > now_ms + self.max_future_ms:
            return Reason.TIMESTAMP_IN_FUTURE
        if ts_ms < now_ms - self.max_age_ms:
            return Reason.TIMESTAMP_TOO_OLD
        return None


# --- the impact result's warnings ---------------------------------------------------------
# streams.impact stores each impact KPI's result with machine-readable warning codes (the
# details of kpi_values); the report, the dashboards and the demo show their sentences.

MIN_PERIOD_DAYS = 7.0  # a full weekly cycle in each period; a shorter one gets no verdict

IMPACT_WARNINGS: dict[str, str] = {
    "no_data": "no device has readings in both periods yet",
    "interim": "the intervention period has not ended: no verdict before its planned end",
    "no_control_group": (
        "no control group: a before/after comparison cannot separate the effect from trends, "
        "seasons or weather; the interval assumes there were none"
    ),
    "no_replication": "fewer than two devices in a group: the effect is not replicated, no verdict",
    "no_interval": "too few devices for an interval (at least two in one group are needed)",
    "few_devices": "fewer than three devices in a group: the interval is wide and rests on few devices",
    "short_period": f"a period is shorter than {MIN_PERIOD_DAYS:g} days: no verdict",
    "placebo_shift": (
        "placebo check failed: the baseline's second half already differs from its first half "
        "(a trend, or groups drifting apart before the intervention): no verdict"
    ),
    "devices_excluded": "some devices have no readings in one of the periods and are left out",
    "low_completeness": "some devices sent fewer than half their expected readings in a period",
    "relative_undefined": "a device's mean is not positive: the effect is reported in the metric's unit",
}


# --- records -----------------------------------------------------------------------------


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_ms(ts: datetime) -> int:
    """Exact epoch milliseconds (no float rounding) of an aware datetime."""
    return (ts - _EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def utcnow() -> datetime:
    return datetime.now(tz=UTC)


@dataclass(frozen=True, slots=True)
class Reading:
    """One validated sample: a device's metrics at one instant."""

    seq: int
    ts_ms: int
    metrics: dict[str, float]


@dataclass(frozen=True, slots=True)
class ReadingBatch:
    """The valid readings of one MQTT message. A Kafka value on ``pilotlab.readings`` holds
    one batch (a JSON object) or several of one experiment in the order ingest took them (a
    JSON array of those objects: ``pack_batches``); read it with ``all_from_json``."""

    experiment_id: str
    device_id: str
    group: str
    received_ms: int
    readings: tuple[Reading, ...]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "experiment_id": self.experiment_id,
                "device_id": self.device_id,
                "group": self.group,
                "received_ms": self.received_ms,
                "readings": [[r.seq, r.ts_ms, r.metrics] for r in self.readings],
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> ReadingBatch:
        """One batch (a JSON object)."""
        return cls._of(orjson.loads(raw))

    @classmethod
    def all_from_json(cls, raw: bytes) -> list[ReadingBatch]:
        """The batches of one ``pilotlab.readings`` value: one, or a packed array of them."""
        if raw[:1] != b"[":
            return [cls.from_json(raw)]
        return [cls._of(d) for d in orjson.loads(raw)]

    @classmethod
    def _of(cls, d: dict) -> ReadingBatch:
        return cls(
            d["experiment_id"],
            d["device_id"],
            d["group"],
            d["received_ms"],
            tuple(map(_decoded_reading, d["readings"])),
        )


def pack_batches(values: Sequence[bytes]) -> bytes:
    """One ``pilotlab.readings`` value for several encoded batches (``ReadingBatch.to_json``)
    of one experiment: the value itself for one, a JSON array for more. Ingest packs the
    messages it takes within a few milliseconds into one Kafka record: every record costs
    the broker, the streams worker and the sink about as much again as the readings in it."""
    if len(values) == 1:
        return values[0]
    return b"[" + b",".join(values) + b"]"


_new = object.__new__
_set_seq, _set_ts, _set_metrics = Reading.seq.__set__, Reading.ts_ms.__set__, Reading.metrics.__set__  # type: ignore[attr-defined]


def _decoded_reading(row: list) -> Reading:
    """``Reading(*row)`` for ``ReadingBatch.from_json``, through the slots directly: a frozen
    dataclass's ``__init__`` sets each field with ``object.__setattr__``, twice the cost, and
    the streams worker and the sink decode every reading of every batch."""
    seq, ts_ms, metrics = row
    r = _new(Reading)
    _set_seq(r, seq)
    _set_ts(r, ts_ms)
    _set_metrics(r, metrics)
    return r


@dataclass(frozen=True, slots=True)
class Rejection:
    """A refused message or batch item, with a reason code a startup can act on."""

    reason: Reason
    detail: str
    topic: str
    received_ms: int
    experiment_id: str | None = None
    device_id: str | None = None
    item_index: int | None = None
    excerpt: str = ""
    rejection_id: str = field(default="")

    EXCERPT_BYTES = 256

    @staticmethod
    def make_id(topic: str, payload: bytes, item_index: int | None, reason: str) -> str:
        """Deterministic id: a redelivered message yields the same id, so it is stored once."""
        h = hashlib.blake2b(digest_size=16)
        for part in (topic.encode(), payload, str(item_index).encode(), reason.encode()):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.hexdigest()

    def to_dict(self) -> dict:
        return {
            "rejection_id": self.rejection_id,
            "reason": str(self.reason),
            "detail": self.detail,
            "topic": self.topic,
            "received_ms": self.received_ms,
            "experiment_id": self.experiment_id,
            "device_id": self.device_id,
            "item_index": self.item_index,
            "excerpt": self.excerpt,
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: bytes) -> Rejection:
        d = orjson.loads(raw)
        d["reason"] = Reason(d["reason"])
        return cls(**d)


def excerpt(payload: bytes, limit: int = Rejection.EXCERPT_BYTES) -> str:
    """A bounded, printable excerpt of a payload (never raises, never carries NUL bytes)."""
    text = payload[:limit].decode("utf-8", errors="replace").replace("\x00", "\\0")
    return text + ("…" if len(payload) > limit else "")


@dataclass(frozen=True, slots=True)
class KpiValue:
    """One KPI of one experiment group over one event-time window; ``revision`` grows as
    more data for the window arrives, and storage keeps the highest revision."""

    experiment_id: str
    kpi: str
    metric: str
    kind: str
    device_group: str
    window_size_s: int
    window_start_ms: int
    value: float | None
    sample_count: int
    revision: int
    # extra figures of richer KPI kinds, e.g. impact: {"estimate", "ci_low", "ci_high", ...}
    details: dict | None = None

    def key(self) -> tuple:
        return (self.experiment_id, self.kpi, self.device_group, self.window_size_s, self.window_start_ms)

    def to_dict(self) -> dict:
        return {
            "experiment_id": self.experiment_id,
            "kpi": self.kpi,
            "metric": self.metric,
            "kind": self.kind,
            "device_group": self.device_group,
            "window_size_s": self.window_size_s,
            "window_start_ms": self.window_start_ms,
            "value": self.value,
            "sample_count": self.sample_count,
            "revision": self.revision,
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, d: dict) -> KpiValue:
        return cls(**d)


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device reporting for the first time (online, detail ``first report``), going offline
    (silent for N expected intervals) or coming back online. ``ts_ms`` is the event time of
    the transition; keyed by experiment on Kafka."""

    experiment_id: str
    device_id: str
    status: str  # "online" | "offline"
    ts_ms: int
    last_seen_ms: int | None
    detail: str = ""

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "experiment_id": self.experiment_id,
                "device_id": self.device_id,
                "status": self.status,
                "ts_ms": self.ts_ms,
                "last_seen_ms": self.last_seen_ms,
                "detail": self.detail,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> DeviceStatus:
        return cls(**orjson.loads(raw))


def encode_kpis(values: list[KpiValue]) -> bytes:
    return orjson.dumps([v.to_dict() for v in values])


KPI_RECORD_BYTES = 512 * 1024  # Kafka refuses records over 1 MB (the producers' max.request.size)


def encode_kpi_records(values: list[KpiValue], limit: int = KPI_RECORD_BYTES) -> list[bytes]:
    """``encode_kpis`` split into values of at most ``limit`` bytes each (a single value larger
    than that goes alone): one chunk of the streams worker can revise thousands of windows of
    one experiment (a replay of days of readings), more than one Kafka record may hold."""
    raw = encode_kpis(values)
    if len(raw) <= limit or len(values) == 1:
        return [raw]
    half = len(values) // 2
    return encode_kpi_records(values[:half], limit) + encode_kpi_records(values[half:], limit)


def decode_kpis(raw: bytes) -> list[KpiValue]:
    return [KpiValue.from_dict(d) for d in orjson.loads(raw)]
