"""Experiment manifests: the examples load, and every error names the file and the field."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pilotlab.manifest import (
    Experiment,
    ManifestError,
    Period,
    load_manifest,
    load_manifests,
    parse_duration,
)
from pilotlab.metrics import METRICS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "control" / "examples" / "experiments"
LEZ = EXAMPLES / "lez-san-salvario.yaml"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def base() -> dict:
    return yaml.safe_load(LEZ.read_text(encoding="utf-8"))


def write(tmp_path: Path, doc: object, name: str = "manifest.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def error_of(load: Callable[[Path], object], path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        load(path)
    return str(info.value)


def error_fields(message: str) -> list[str]:
    """The dotted field of each error line ``  devices.0.interval: ...``."""
    return re.findall(r"^  (\S+): ", message, flags=re.MULTILINE)


# --- examples -----------------------------------------------------------------------------------


def test_there_are_examples() -> None:
    assert len(EXAMPLE_FILES) >= 3


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_example_manifest_loads(path: Path) -> None:
    exp = load_manifest(path)
    assert exp.id == path.stem
    assert exp.devices and exp.kpis
    assert "treatment" in {d.group for d in exp.devices}
    for kpi in exp.kpis:
        assert kpi.metric in METRICS
        assert kpi.window > 0
    for d in exp.devices:
        assert exp.device(d.id) is d
        assert d.interval > 0
    for period in (exp.periods.baseline, exp.periods.intervention):
        assert period.start.tzinfo is not None and period.start.utcoffset() == timedelta(0)
        assert period.start < period.end
    assert exp.periods.baseline.end <= exp.periods.intervention.start
    assert exp.device("no-such-device") is None


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.stem for p in EXAMPLE_FILES])
def test_example_json_round_trip(path: Path) -> None:
    exp = load_manifest(path)
    assert Experiment.from_json(exp.to_json()) == exp


def test_load_manifests_directory() -> None:
    exps = load_manifests(EXAMPLES)
    assert [e.id for e in exps] == [p.stem for p in EXAMPLE_FILES]


def test_lez_example_details() -> None:
    exp = load_manifest(LEZ)
    assert exp.periods.baseline.start == datetime(2026, 3, 2, tzinfo=UTC)
    assert exp.periods.intervention.start == exp.periods.baseline.end  # back to back is allowed
    assert exp.device("aq-ctl-01").group == "control"
    assert exp.device("aq-lez-01").interval == 900
    assert {k.name: k.window for k in exp.kpis}["pm25_hourly_mean"] == 3600
    assert exp.simulation is not None and exp.simulation.true_effects == {"no2": -0.25, "pm25": -0.10}


# --- errors name the file and the field ---------------------------------------------------------


def _set(path: str, value: object) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]

    return mutate


ERRORS = [
    pytest.param(_set("kpis.1.metric", "co2"), "kpis.1", "unknown metric 'co2'", id="unknown-metric"),
    pytest.param(_set("devices.0.interval", "15x"), "devices.0.interval", "'15x'", id="bad-duration"),
    pytest.param(_set("devices.3.interval", 0), "devices.3.interval", "positive", id="zero-duration"),
    pytest.param(_set("devices.3.interval", True), "devices.3.interval", "duration", id="bool-duration"),
    pytest.param(_set("kpis.0.window", "1.5h"), "kpis.0.window", "'1.5h'", id="fractional-window"),
    pytest.param(
        _set("periods.baseline.start", "2026-03-02T00:00:00"),
        "periods.baseline.start",
        "time zone",
        id="naive-datetime",
    ),
    pytest.param(
        _set("periods.intervention.end", "2026-03-30 00:00"),
        "periods.intervention.end",
        "time zone",
        id="naive-datetime-space",
    ),
    pytest.param(
        _set("periods.baseline.start", "next monday"), "periods.baseline.start", "", id="bad-datetime"
    ),
    pytest.param(
        _set("periods.intervention.start", "2026-03-10T00:00:00Z"),
        "periods",
        "intervention must start after the baseline ends",
        id="intervention-before-baseline-end",
    ),
    pytest.param(
        _set("periods.baseline", {"start": "2026-03-16T00:00:00Z", "end": "2026-03-02T00:00:00Z"}),
        "periods.baseline",
        "end must be after start",
        id="period-reversed",
    ),
    pytest.param(_set("devices.2.kind", "robot"), "devices.2.kind", "air_quality", id="unknown-device-kind"),
    pytest.param(_set("devices.1.group", "placebo"), "devices.1.group", "treatment", id="unknown-group"),
    pytest.param(_set("devices.4.id", "AQ-LEZ-05"), "devices.4.id", "pattern", id="uppercase-device-id"),
    pytest.param(_set("devices.4.location.lat", 91), "devices.4.location.lat", "90", id="lat-out-of-range"),
    pytest.param(_set("colour", "red"), "colour", "Extra inputs", id="extra-top-level-field"),
    pytest.param(
        _set("devices.0.colour", "red"), "devices.0.colour", "Extra inputs", id="extra-device-field"
    ),
    pytest.param(_set("kpis.2.kind", "median"), "kpis.2.kind", "mean", id="unknown-kpi-kind"),
    pytest.param(_set("kpis.2.better", "up"), "kpis.2.better", "lower", id="unknown-better"),
    pytest.param(_set("id", "Bad Id"), "id", "pattern", id="bad-experiment-id"),
    pytest.param(_set("devices", []), "devices", "at least 1", id="no-devices"),
    pytest.param(_set("kpis", []), "kpis", "at least 1", id="no-kpis"),
    pytest.param(_delete("title"), "title", "required", id="missing-title"),
    pytest.param(_delete("devices.0.interval"), "devices.0.interval", "required", id="missing-interval"),
    pytest.param(
        _set("simulation.bad_message_rate", 1.5), "simulation.bad_message_rate", "1", id="rate-above-one"
    ),
]


@pytest.mark.parametrize(("mutate", "field", "fragment"), ERRORS)
def test_error_names_file_and_field(tmp_path: Path, mutate, field: str, fragment: str) -> None:
    doc = base()
    mutate(doc)
    path = write(tmp_path, doc)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert field in error_fields(message), message
    assert fragment in message
    assert isinstance(info.value, ValueError)


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    doc = base()
    doc["devices"][0]["interval"] = "15x"
    doc["devices"][2]["kind"] = "robot"
    doc["kpis"][1]["metric"] = "co2"
    message = error_of(load_manifest, write(tmp_path, doc))
    assert {"devices.0.interval", "devices.2.kind", "kpis.1"} <= set(error_fields(message))


def test_duplicate_device_ids_name_file_and_ids(tmp_path: Path) -> None:
    doc = base()
    doc["devices"].append(dict(doc["devices"][0]))
    path = write(tmp_path, doc)
    message = error_of(load_manifest, path)
    assert message.startswith(f"{path}: ")
    assert "duplicate device ids: aq-lez-01" in message


def test_duplicate_kpi_names(tmp_path: Path) -> None:
    doc = base()
    doc["kpis"].append(dict(doc["kpis"][0], kind="max"))
    message = error_of(load_manifest, write(tmp_path, doc))
    assert "duplicate kpi ids: no2_mean" in message


def test_duplicate_device_ids_name_the_devices_field(tmp_path: Path) -> None:
    doc = base()
    doc["devices"].append(dict(doc["devices"][0]))
    message = error_of(load_manifest, write(tmp_path, doc))
    assert any(f == "devices" or f.startswith("devices.") for f in error_fields(message)), message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("- a\n- b\n", id="list"),
        pytest.param("just a string\n", id="scalar"),
        pytest.param("42\n", id="number"),
        pytest.param("", id="empty-file"),
        pytest.param("# only a comment\n", id="comment-only"),
        pytest.param("null\n", id="null"),
    ],
)
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    message = error_of(load_manifest, path)
    assert message == f"{path}: an experiment manifest is a YAML mapping"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("id: [unclosed\n", id="unclosed-flow"),
        pytest.param("id: a\n  title: b\n", id="bad-indent"),
        pytest.param("a: b: c\n", id="nested-colon"),
        pytest.param("id: !!python/object:os.system x\n", id="python-tag"),
        pytest.param("\tid: a\n", id="tab"),
    ],
)
def test_invalid_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    message = error_of(load_manifest, path)
    assert message.startswith(f"{path}: not valid YAML")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    message = error_of(load_manifest, path)
    assert message.startswith(f"{path}: cannot read")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("title: Zone à trafic limité\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=re.escape(str(path))):
        load_manifest(path)


def test_yaml_duplicate_keys_keep_the_last(tmp_path: Path) -> None:
    """Documented behaviour of PyYAML: a repeated key silently keeps the last value."""
    text = LEZ.read_text(encoding="utf-8") + "title: Second title\n"
    path = tmp_path / "dupe.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_manifest(path).title == "Second title"


def test_load_manifests_empty_directory(tmp_path: Path) -> None:
    message = error_of(load_manifests, tmp_path)
    assert message.startswith(f"{tmp_path}: no *.yaml")


def test_load_manifests_duplicate_experiment_ids(tmp_path: Path) -> None:
    write(tmp_path, base(), "a.yaml")
    write(tmp_path, base(), "b.yml")
    message = error_of(load_manifests, tmp_path)
    assert message.startswith(f"{tmp_path}: ")
    assert "lez-san-salvario" in message


def test_load_manifests_reads_yml_and_names_the_bad_file(tmp_path: Path) -> None:
    write(tmp_path, base(), "a.yml")
    bad = base()
    bad["id"] = "other"
    bad["devices"][0]["interval"] = "15x"
    bad_path = write(tmp_path, bad, "b.yaml")
    message = error_of(load_manifests, tmp_path)
    assert message.startswith(f"{bad_path}: ")
    assert "devices.0.interval" in error_fields(message)


def test_load_manifests_single_file() -> None:
    assert [e.id for e in load_manifests(LEZ)] == ["lez-san-salvario"]


# --- model details ----------------------------------------------------------------------------


def test_times_are_normalised_to_utc(tmp_path: Path) -> None:
    doc = base()
    doc["periods"]["baseline"]["start"] = "2026-03-02T01:00:00+01:00"
    exp = load_manifest(write(tmp_path, doc))
    start = exp.periods.baseline.start
    assert start == datetime(2026, 3, 2, tzinfo=UTC)
    assert start.utcoffset() == timedelta(0)


def test_unquoted_yaml_timestamps(tmp_path: Path) -> None:
    text = LEZ.read_text(encoding="utf-8").replace('"2026-03-02T00:00:00Z"', "2026-03-02T00:00:00Z")
    path = tmp_path / "m.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_manifest(path).periods.baseline.start == datetime(2026, 3, 2, tzinfo=UTC)


def test_period_contains_is_half_open() -> None:
    p = Period(start=datetime(2026, 3, 1, tzinfo=UTC), end=datetime(2026, 3, 2, tzinfo=UTC))
    assert p.contains(datetime(2026, 3, 1, tzinfo=UTC))
    assert p.contains(datetime(2026, 3, 1, 23, 59, 59, tzinfo=UTC))
    assert not p.contains(datetime(2026, 3, 2, tzinfo=UTC))
    assert not p.contains(datetime(2026, 2, 28, tzinfo=UTC))


def test_models_are_frozen() -> None:
    exp = load_manifest(LEZ)
    with pytest.raises(ValidationError):
        exp.title = "changed"  # type: ignore[misc]


@pytest.mark.parametrize("delta", [timedelta(days=30), timedelta(days=-400), timedelta(hours=1, seconds=7)])
def test_shifted_moves_both_periods(delta: timedelta) -> None:
    exp = load_manifest(LEZ)
    moved = exp.shifted(delta)
    for name in ("baseline", "intervention"):
        before, after = getattr(exp.periods, name), getattr(moved.periods, name)
        assert after.start == before.start + delta
        assert after.end == before.end + delta
        assert after.end - after.start == before.end - before.start
    assert moved.devices == exp.devices and moved.kpis == exp.kpis and moved.id == exp.id
    assert exp.periods.baseline.start == datetime(2026, 3, 2, tzinfo=UTC)  # the original is unchanged
    assert Experiment.from_json(moved.to_json()) == moved


# --- parse_duration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        ("1m", 60),
        ("15m", 900),
        ("1h", 3600),
        ("2h", 7200),
        ("1d", 86400),
        ("7d", 604800),
        (" 15 m ", 900),
        ("015m", 900),
        (1, 1),
        (60, 60),
        (3600, 3600),
    ],
)
def test_parse_duration(value: object, seconds: int) -> None:
    assert parse_duration(value) == seconds
    assert type(parse_duration(value)) is int


@pytest.mark.parametrize(
    "value",
    [
        "15x",
        "15M",
        "1H",
        "1.5h",
        "1w",
        "30",
        "",
        "m",
        "-5m",
        "+5m",
        "0s",
        "0m",
        "5 minutes",
        "1h30m",
        0,
        -1,
        1.5,
        60.0,
        True,
        False,
        None,
        [15],
        {"m": 15},
    ],
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):  # messages: see test_parse_duration_messages
        parse_duration(value)


def test_parse_duration_messages() -> None:
    with pytest.raises(ValueError, match="positive"):
        parse_duration(0)
    with pytest.raises(ValueError, match="'15x'"):
        parse_duration("15x")


def test_durations_beyond_storage_range_are_refused(tmp_path: Path) -> None:
    doc = base()
    doc["kpis"][0]["window"] = "100000d"
    with pytest.raises(ManifestError, match=r"kpis\.0\.window"):
        load_manifest(write(tmp_path, doc))


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)


def test_base_fixture_is_independent() -> None:
    a, b = base(), base()
    a["devices"].clear()
    assert b["devices"]
    assert copy.deepcopy(b) == base()
