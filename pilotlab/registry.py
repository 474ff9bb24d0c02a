"""The device registry: which experiments exist and which devices belong to them.

``pilotlab experiments apply`` publishes each manifest to the compacted Kafka topic
``pilotlab.registry`` (key: experiment id). Every running service follows that topic from
the beginning, so a new or changed manifest reaches it without a restart. Devices are never
provisioned from traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from pilotlab.contracts import KafkaTopics, Reason
from pilotlab.manifest import Device, Experiment

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Registry:
    """An immutable snapshot: replaced whole when a manifest changes, so readers need no lock."""

    experiments: dict[str, Experiment] = field(default_factory=dict)
    device_owner: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, experiments: Iterable[Experiment]) -> Registry:
        exps = {e.id: e for e in experiments}
        owner = {d.id: e.id for e in exps.values() for d in e.devices}
        return cls(exps, owner)

    def with_experiment(self, exp: Experiment) -> Registry:
        return Registry.of([*(e for e in self.experiments.values() if e.id != exp.id), exp])

    def authorise(self, experiment_id: str, device_id: str) -> Device | Refusal:
        """May this device write into this experiment? The device, or why not."""
        exp = self.experiments.get(experiment_id)
        owner = self.device_owner.get(device_id)
        if exp is None:
            return Refusal(Reason.UNKNOWN_EXPERIMENT, f"experiment {experiment_id!r} is not registered")
        if owner is None:
            return Refusal(Reason.UNKNOWN_DEVICE, f"device {device_id!r} is not registered in any experiment")
        if owner != experiment_id:
            return Refusal(
                Reason.DEVICE_NOT_IN_EXPERIMENT,
                f"device {device_id!r} belongs to another experiment, not {experiment_id!r}",
            )
        device = exp.device(device_id)
        assert device is not None
        return device


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Reason
    detail: str


def conflicting_devices(current: Registry, incoming: Experiment) -> list[str]:
    """Device ids of ``incoming`` already registered to a different experiment."""
    return sorted(
        d.id for d in incoming.devices if current.device_owner.get(d.id, incoming.id) != incoming.id
    )


def publish(bootstrap: str, experiments: Iterable[Experiment]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    errors: list[str] = []

    def on_delivery(err, _msg) -> None:
        if err is not None:
            errors.append(str(err))

    for exp in experiments:
        producer.produce(
            KafkaTopics.REGISTRY, key=exp.id.encode(), value=exp.to_json(), on_delivery=on_delivery
        )
    remaining = producer.flush(30)
    if remaining or errors:
        raise KafkaException(f"registry publish failed: {remaining} undelivered, errors: {errors}")


def read_all(bootstrap: str, timeout_s: float = 30.0) -> Registry:
    """The registry as it stands now (reads the topic to its end once)."""
    follower = RegistryFollower(bootstrap)
    follower.start()
    try:
        if not follower.ready.wait(timeout_s):
            raise TimeoutError(f"registry topic not read within {timeout_s} s at {bootstrap}")
        return follower.registry
    finally:
        follower.stop()


class RegistryFollower:
    """Follows ``pilotlab.registry`` in a thread; ``registry`` is always a complete snapshot.
    ``ready`` is set once the topic has been read up to the end it had at start."""

    WAIT_SLICE_S = 0.5  # wait_ready looks at its stop flag at least this often

    def __init__(self, bootstrap: str) -> None:
        self._bootstrap = bootstrap
        self.registry = Registry()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-follower", daemon=True)

    def start(self) -> RegistryFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait_ready(
        self, stopping: threading.Event, *, beat: Callable[[], None] = lambda: None, say_every_s: float = 30.0
    ) -> bool:
        """Until the registry is read (True) or ``stopping`` is set (False): a service told to
        stop while Kafka is down stops at once (it waited out a 30 s wait before). ``beat``
        runs every ``WAIT_SLICE_S`` (a health beat: alive, not ready); every ``say_every_s`` the
        log says what it is waiting for."""
        said = time.monotonic()
        while not stopping.is_set():
            if self.ready.wait(self.WAIT_SLICE_S):
                return not stopping.is_set()  # told to stop meanwhile: do not start up
            beat()
            if time.monotonic() - said >= say_every_s:
                said = time.monotonic()
                log.error("registry topic not read yet at %s; still waiting", self._bootstrap)
        return False

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": "pilotlab-registry-unused",  # required by librdkafka; never committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        try:
            while True:  # Kafka down or the topic missing at start: keep trying, saying why
                try:
                    meta = consumer.list_topics(KafkaTopics.REGISTRY, timeout=10)
                    topic = meta.topics[KafkaTopics.REGISTRY]
                    if topic.error is not None:
                        raise KafkaException(topic.error)
                    parts = sorted(topic.partitions)
                    ends = {
                        p: consumer.get_watermark_offsets(TopicPartition(KafkaTopics.REGISTRY, p), timeout=10)[1]
                        for p in parts
                    }
                    break
                except KafkaException as exc:
                    log.warning("registry topic %s not readable yet: %s", KafkaTopics.REGISTRY, exc)
                    if self._stop.wait(2.0):
                        return
            consumer.assign([TopicPartition(KafkaTopics.REGISTRY, p, OFFSET_BEGINNING) for p in parts])
            at_end = {p for p, end in ends.items() if end == 0}
            if len(at_end) == len(parts):
                self.ready.set()
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        at_end.add(msg.partition())
                        if len(at_end) == len(parts):
                            self.ready.set()
                        continue
                    log.warning("registry consumer: %s", msg.error())
                    continue
                exp = Experiment.from_json(msg.value())
                self.registry = self.registry.with_experiment(exp)
                log.info("registry: experiment %s (%d devices)", exp.id, len(exp.devices))
        finally:
            consumer.close()
