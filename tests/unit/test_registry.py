"""The device registry snapshot: who may write into which experiment."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from pilotlab.contracts import Reason
from pilotlab.manifest import Device, Experiment, load_manifests
from pilotlab.registry import Refusal, Registry, RegistryFollower, conflicting_devices

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = {e.id: e for e in load_manifests(ROOT / "control" / "examples" / "experiments")}
LEZ = EXPERIMENTS["lez-san-salvario"]
PARKING = EXPERIMENTS["smart-parking-crocetta"]
LIGHTING = EXPERIMENTS["adaptive-lighting-borgo-po"]
REGISTRY = Registry.of(EXPERIMENTS.values())


def renamed(exp: Experiment, new_id: str, devices: list[Device] | None = None) -> Experiment:
    update: dict = {"id": new_id}
    if devices is not None:
        update["devices"] = tuple(devices)
    return exp.model_copy(update=update)


def test_of_indexes_experiments_and_owners() -> None:
    assert set(REGISTRY.experiments) == set(EXPERIMENTS)
    total = sum(len(e.devices) for e in EXPERIMENTS.values())
    assert len(REGISTRY.device_owner) == total
    for exp in EXPERIMENTS.values():
        for d in exp.devices:
            assert REGISTRY.device_owner[d.id] == exp.id


def test_empty_registry_refuses_everything() -> None:
    refusal = Registry().authorise("lez-san-salvario", "aq-lez-01")
    assert refusal == Refusal(Reason.UNKNOWN_EXPERIMENT, refusal.detail)


@pytest.mark.parametrize(
    ("experiment_id", "device_id", "group"),
    [
        ("lez-san-salvario", "aq-lez-01", "treatment"),
        ("lez-san-salvario", "aq-ctl-05", "control"),
        ("smart-parking-crocetta", "park-08", "treatment"),
        ("adaptive-lighting-borgo-po", "light-c03", "control"),
    ],
)
def test_known_device_is_authorised(experiment_id: str, device_id: str, group: str) -> None:
    device = REGISTRY.authorise(experiment_id, device_id)
    assert isinstance(device, Device)
    assert device.id == device_id
    assert device.group == group
    assert device is EXPERIMENTS[experiment_id].device(device_id)


@pytest.mark.parametrize(
    ("experiment_id", "device_id", "reason"),
    [
        pytest.param("no-such-experiment", "aq-lez-01", Reason.UNKNOWN_EXPERIMENT, id="unknown-experiment"),
        pytest.param("no-such-experiment", "no-such-device", Reason.UNKNOWN_EXPERIMENT, id="both-unknown"),
        pytest.param("lez-san-salvario", "no-such-device", Reason.UNKNOWN_DEVICE, id="unknown-device"),
        pytest.param(
            "lez-san-salvario", "park-01", Reason.DEVICE_NOT_IN_EXPERIMENT, id="other-experiments-device"
        ),
        pytest.param(
            "smart-parking-crocetta", "aq-lez-01", Reason.DEVICE_NOT_IN_EXPERIMENT, id="spoof-the-other-way"
        ),
        pytest.param("LEZ-SAN-SALVARIO", "aq-lez-01", Reason.UNKNOWN_EXPERIMENT, id="case-matters"),
        pytest.param("lez-san-salvario", "AQ-LEZ-01", Reason.UNKNOWN_DEVICE, id="device-case-matters"),
        pytest.param("", "", Reason.UNKNOWN_EXPERIMENT, id="empty"),
    ],
)
def test_refusals(experiment_id: str, device_id: str, reason: Reason) -> None:
    refusal = REGISTRY.authorise(experiment_id, device_id)
    assert isinstance(refusal, Refusal)
    assert refusal.reason is reason
    assert refusal.detail
    named = experiment_id if reason is Reason.UNKNOWN_EXPERIMENT else device_id
    assert repr(named) in refusal.detail


def test_device_not_in_experiment_detail_names_the_claimed_experiment_only() -> None:
    refusal = REGISTRY.authorise("lez-san-salvario", "park-01")
    assert "'lez-san-salvario'" in refusal.detail
    # the owner is not disclosed to a device that claims another experiment
    assert "smart-parking-crocetta" not in refusal.detail


def test_with_experiment_adds_and_replaces() -> None:
    reg = Registry.of([LEZ])
    assert isinstance(reg.authorise(PARKING.id, "park-01"), Refusal)
    reg2 = reg.with_experiment(PARKING)
    assert isinstance(reg2.authorise(PARKING.id, "park-01"), Device)
    assert isinstance(reg.authorise(PARKING.id, "park-01"), Refusal)  # snapshots are immutable

    # a new version of LEZ without aq-lez-05: the device is gone, the others stay
    smaller = LEZ.model_copy(update={"devices": tuple(d for d in LEZ.devices if d.id != "aq-lez-05")})
    reg3 = reg2.with_experiment(smaller)
    assert reg3.authorise(LEZ.id, "aq-lez-05").reason is Reason.UNKNOWN_DEVICE
    assert isinstance(reg3.authorise(LEZ.id, "aq-lez-04"), Device)
    assert reg3.experiments[LEZ.id] is smaller
    assert set(reg3.experiments) == {LEZ.id, PARKING.id}


def test_with_experiment_moves_a_device_between_groups() -> None:
    moved = [d.model_copy(update={"group": "control"}) if d.id == "aq-lez-01" else d for d in LEZ.devices]
    reg = REGISTRY.with_experiment(LEZ.model_copy(update={"devices": tuple(moved)}))
    assert reg.authorise(LEZ.id, "aq-lez-01").group == "control"
    assert REGISTRY.authorise(LEZ.id, "aq-lez-01").group == "treatment"


def test_conflicting_devices() -> None:
    # re-applying an experiment is no conflict
    assert conflicting_devices(REGISTRY, LEZ) == []
    # a new experiment claiming devices of two others
    thief = renamed(PARKING, "thief", [*PARKING.devices[:2], LEZ.devices[3], LIGHTING.devices[0]])
    assert conflicting_devices(REGISTRY, thief) == ["aq-lez-04", "light-t01", "park-01", "park-02"]
    # a new version of an experiment that takes one device of another
    greedy = PARKING.model_copy(update={"devices": (*PARKING.devices, LEZ.devices[0])})
    assert conflicting_devices(REGISTRY, greedy) == ["aq-lez-01"]
    # brand-new devices are no conflict
    fresh = renamed(PARKING, "fresh", [PARKING.devices[0].model_copy(update={"id": "new-dev"})])
    assert conflicting_devices(REGISTRY, fresh) == []
    assert conflicting_devices(Registry(), thief) == []


def test_conflicting_devices_is_sorted() -> None:
    thief = renamed(LEZ, "thief", list(reversed(LEZ.devices)))
    clash = conflicting_devices(REGISTRY, thief)
    assert clash == sorted(d.id for d in LEZ.devices)


def test_of_with_a_device_in_two_experiments_keeps_one_owner() -> None:
    """Documented behaviour: ``Registry.of`` does not check conflicts (the CLI does, with
    ``conflicting_devices``); the experiment listed last owns the device."""
    thief = renamed(PARKING, "thief", [LEZ.devices[0]])
    reg = Registry.of([LEZ, thief])
    assert reg.device_owner["aq-lez-01"] == "thief"
    assert reg.authorise(LEZ.id, "aq-lez-01").reason is Reason.DEVICE_NOT_IN_EXPERIMENT
    assert isinstance(reg.authorise("thief", "aq-lez-01"), Device)


def test_registry_survives_json_round_trip_of_its_experiments() -> None:
    reg = Registry.of(Experiment.from_json(e.to_json()) for e in EXPERIMENTS.values())
    assert reg == REGISTRY


# --- RegistryFollower.wait_ready: a service told to stop while Kafka is down stops at once ---


def test_wait_ready_returns_true_once_the_registry_is_read() -> None:
    follower = RegistryFollower("127.0.0.1:1")  # never started: no Kafka needed
    follower.ready.set()
    assert follower.wait_ready(threading.Event()) is True


class _NeverReady:
    """A ``ready`` event that is never set and records how long each wait was allowed."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return False


def test_wait_ready_returns_false_when_told_to_stop_beating_meanwhile() -> None:
    follower = RegistryFollower("127.0.0.1:1")
    follower.ready = _NeverReady()  # no real waiting: the slices are recorded
    stopping = threading.Event()
    beats: list[int] = []

    def beat() -> None:  # the health beat; the second one comes with a SIGTERM
        beats.append(1)
        if len(beats) == 2:
            stopping.set()

    assert follower.wait_ready(stopping, beat=beat) is False
    assert len(beats) == 2  # it noticed right after the slice in which the stop came
    # ... and a slice is short: a stop waits at most one (the old loop waited 30 s)
    assert follower.ready.waits == [RegistryFollower.WAIT_SLICE_S] * 2
    assert RegistryFollower.WAIT_SLICE_S <= 0.5


def test_wait_ready_does_not_start_up_when_told_to_stop_as_the_registry_arrives() -> None:
    follower = RegistryFollower("127.0.0.1:1")
    follower.ready.set()
    stopping = threading.Event()
    stopping.set()
    assert follower.wait_ready(stopping) is False


def test_wait_ready_says_what_it_waits_for(caplog: pytest.LogCaptureFixture) -> None:
    follower = RegistryFollower("127.0.0.1:1")
    follower.ready = _NeverReady()
    stopping = threading.Event()
    beats: list[int] = []

    def beat() -> None:
        beats.append(1)
        if len(beats) == 3:
            stopping.set()

    with caplog.at_level(logging.ERROR, logger="pilotlab.registry"):
        assert follower.wait_ready(stopping, beat=beat, say_every_s=0.0) is False
    said = [r.getMessage() for r in caplog.records]
    assert said and all("registry topic not read yet at 127.0.0.1:1" in m for m in said)
