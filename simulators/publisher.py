"""Publish simulated device traffic over MQTT, on a simulated clock, and keep the ground truth.

``speed`` compresses time: at ×40,000 four weeks of readings pass in about a minute. A
share of messages (the manifest's ``simulation.bad_message_rate``) is replaced by a
deliberately broken payload whose reason code is known, so tests can check every rejection.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from pilotlab.contracts import Reason, telemetry_topic
from pilotlab.credentials import MqttEndpoint
from pilotlab.manifest import Experiment
from simulators.models import Sample, simulate_experiment


@dataclass
class GroundTruth:
    """What the pipeline should end up with."""

    accepted: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (device, metric, ts_ms)
    rejected: Counter = field(default_factory=Counter)  # reason → messages
    messages: int = 0

    def accepted_for(self, experiment: Experiment) -> dict[tuple[str, str, int], float]:
        ids = {d.id for d in experiment.devices}
        return {k: v for k, v in self.accepted.items() if k[0] in ids}


def _iso(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def broken_payload(sample: Sample, rng: random.Random) -> tuple[bytes, Reason]:
    """A payload a careless device might send, and the reason ingest must give."""
    metric = next(iter(sample.metrics))
    choice = rng.randrange(5)
    if choice == 0:
        return b'{"seq": ' + str(sample.seq).encode() + b', "ts": ', Reason.MALFORMED_JSON
    if choice == 1:
        doc = {"seq": sample.seq, "ts": sample.ts_ms, "metrics": {metric: "high"}}
        return orjson.dumps(doc), Reason.WRONG_TYPE
    if choice == 2:
        return orjson.dumps({"ts": sample.ts_ms, "metrics": sample.metrics}), Reason.MISSING_FIELD
    if choice == 3:
        doc = {"seq": sample.seq, "ts": sample.ts_ms, "metrics": {metric: 1e12}}
        return orjson.dumps(doc), Reason.VALUE_OUT_OF_RANGE
    doc = {"seq": sample.seq, "ts": sample.ts_ms // 1000, "metrics": sample.metrics}
    return orjson.dumps(doc), Reason.TIMESTAMP_TOO_OLD


def _item(s: Sample, iso: bool) -> dict:
    return {"seq": s.seq, "ts": _iso(s.ts_ms) if iso else s.ts_ms, "metrics": s.metrics}


def _tagged(exp: Experiment, seed: int) -> Iterator[tuple[int, str, Sample]]:
    for s in simulate_experiment(exp, seed):
        yield s.ts_ms, exp.id, s


def plan_messages(
    experiments: Iterable[Experiment], seed: int, batch: int = 1
) -> Iterator[tuple[int, str, bytes, Reason | None, list[Sample]]]:
    """The messages to send, in simulated-time order: (ts_ms, topic, payload, expected
    rejection or None, samples carried). Deterministic for a seed."""
    experiments = list(experiments)
    streams = [_tagged(exp, seed) for exp in experiments]
    rates = {e.id: (e.simulation.bad_message_rate if e.simulation else 0.0) for e in experiments}
    rng = random.Random(seed)
    buffers: dict[tuple[str, str], list[Sample]] = {}
    for ts_ms, exp_id, sample in heapq.merge(*streams, key=lambda t: t[0]):
        topic = telemetry_topic(exp_id, sample.device_id)
        if rates[exp_id] and rng.random() < rates[exp_id]:
            payload, reason = broken_payload(sample, rng)
            yield ts_ms, topic, payload, reason, []
            continue
        buf = buffers.setdefault((exp_id, sample.device_id), [])
        buf.append(sample)
        if len(buf) >= batch:
            yield ts_ms, topic, _encode(buf, iso=sample.seq % 2 == 0), None, buf
            buffers[(exp_id, sample.device_id)] = []
    for (exp_id, device_id), buf in buffers.items():
        if buf:
            yield buf[-1].ts_ms, telemetry_topic(exp_id, device_id), _encode(buf, iso=False), None, buf


def _encode(samples: list[Sample], iso: bool) -> bytes:
    if len(samples) == 1:
        return orjson.dumps(_item(samples[0], iso))
    return orjson.dumps([_item(s, iso) for s in samples])


def publish(
    mqtt_url: str,
    experiments: list[Experiment],
    *,
    seed: int,
    duration_s: float,
    batch: int = 1,
    progress=None,
) -> GroundTruth:
    """Publish every planned message with QoS 1 so that simulated time spans ``duration_s``
    of wall time; returns once the broker has acknowledged every message."""
    truth = GroundTruth()
    planned = list(plan_messages(experiments, seed, batch))
    if not planned:
        return truth
    sim_start, sim_end = planned[0][0], planned[-1][0]
    speed = max(1.0, (sim_end - sim_start) / 1000 / max(duration_s, 0.001))
    endpoint = MqttEndpoint.parse(mqtt_url)  # mqtt://user:password@host:port when the broker wants one
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"pilotlab-sim-{seed}")
    endpoint.configure(client)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    infos = []
    wall_start = time.monotonic()
    try:
        for i, (ts_ms, topic, payload, reason, samples) in enumerate(planned):
            due = wall_start + (ts_ms - sim_start) / 1000 / speed
            delay = due - time.monotonic()
            if delay > 0.002:
                time.sleep(delay)
            infos.append(client.publish(topic, payload, qos=1))
            truth.messages += 1
            if reason is not None:
                truth.rejected[reason] += 1
            for s in samples:
                for metric, value in s.metrics.items():
                    truth.accepted[(s.device_id, metric, s.ts_ms)] = value
            if progress is not None and i % 1000 == 0:
                progress(i, len(planned))
        for info in infos:
            info.wait_for_publish(timeout=60)
            if not info.is_published():
                raise TimeoutError("the MQTT broker did not acknowledge every message within 60 s")
    finally:
        client.disconnect()
        client.loop_stop()
    return truth
