"""A small, fully known storage dataset and the figures the query layer must return for it,
computed here in plain Python. Used against PostgreSQL 15 (tests/integration) and against
TimescaleDB on PGlite (tests/timescale)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from pilotlab.contracts import DeviceStatus, KpiValue, Reading, ReadingBatch, Reason, Rejection, to_ms, utcnow
from pilotlab.manifest import Experiment

INTERVAL_S = 20
HOURS = 4


@dataclass
class Dataset:
    experiment: Experiment
    t0: datetime
    batches: list[ReadingBatch]
    kpis: list[KpiValue]
    statuses: list[DeviceStatus]
    rejections: list[Rejection]

    @property
    def t_end(self) -> datetime:
        return self.t0 + timedelta(hours=HOURS)

    def rows(self) -> dict[tuple[str, str, int], float]:
        """(device, metric, ts_ms) → value: what ``readings`` must hold."""
        return {(b.device_id, m, r.ts_ms): v for b in self.batches for r in b.readings for m, v in r.metrics.items()}

    def group_of(self, device_id: str) -> str:
        return self.experiment.device(device_id).group

    def metric_series(self, metric: str, bucket_s: int) -> dict[tuple[int, str], tuple[int, float, float, float]]:
        """(bucket_start_ms, group) → (samples, mean, min, max); buckets aligned to the epoch
        (the dataset starts on an hour, so this equals time_bucket's alignment up to 1 h)."""
        acc: dict[tuple[int, str], list[float]] = defaultdict(list)
        for (dev, m, ts), v in self.rows().items():
            if m == metric:
                b = ts - ts % (bucket_s * 1000)
                acc[(b, self.group_of(dev))].append(v)
        return {k: (len(v), sum(v) / len(v), min(v), max(v)) for k, v in acc.items()}

    def samples_of(self, device_id: str) -> int:
        return len({ts for (d, _m, ts) in self.rows() if d == device_id})


def value_of(device: str, group: str, i: int, *, treated: bool, metric: str) -> float:
    base = 40.0 if metric == "no2" else 12.0
    wobble = (i % 7) - 3 + (0.5 if device.endswith("2") else 0.0)
    effect = 0.75 if group == "treatment" and treated else 1.0
    return round((base + wobble) * effect, 3)


def build(suffix: str) -> Dataset:
    """Experiment ``st-{suffix}``: two treatment devices and one control device sampling no2
    and pm25 every 20 s for 4 hours (baseline 2 h, intervention 2 h); device t2 misses every
    fourth sample; hourly mean KPIs; two status transitions; three rejections. Only t1 has
    status rows: t2 and c1 are in the state a streams worker before first reports left (or one
    that has not taken their first batch yet), which migration 0043's test needs."""
    t0 = utcnow().replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS + 2)
    mid, end = t0 + timedelta(hours=HOURS // 2), t0 + timedelta(hours=HOURS)
    prefix = f"st{suffix}"
    devices = [
        {"id": f"{prefix}-t1", "kind": "air_quality", "group": "treatment", "interval": f"{INTERVAL_S}s"},
        {"id": f"{prefix}-t2", "kind": "air_quality", "group": "treatment", "interval": f"{INTERVAL_S}s"},
        {"id": f"{prefix}-c1", "kind": "air_quality", "group": "control", "interval": f"{INTERVAL_S}s"},
    ]
    exp = Experiment.model_validate(
        {
            "id": f"st-{suffix}",
            "title": f"storage test {suffix}",
            "startup": "TestCo",
            "district": "Centro",
            "location": {"lat": 45.07, "lon": 7.68},
            "periods": {
                "baseline": {"start": t0.isoformat(), "end": mid.isoformat()},
                "intervention": {"start": mid.isoformat(), "end": end.isoformat()},
            },
            "devices": devices,
            "kpis": [{"name": "no2_mean_1h", "metric": "no2", "kind": "mean", "window": "1h"}],
        }
    )
    batches = []
    per_window: dict[tuple[str, int], list[float]] = defaultdict(list)
    n = HOURS * 3600 // INTERVAL_S
    for d in exp.devices:
        readings = []
        for i in range(n):
            if d.id.endswith("t2") and i % 4 == 3:
                continue
            t = t0 + timedelta(seconds=i * INTERVAL_S)
            metrics = {m: value_of(d.id, d.group, i, treated=t >= mid, metric=m) for m in ("no2", "pm25")}
            readings.append(Reading(i, to_ms(t), metrics))
            per_window[(d.group, to_ms(t) - to_ms(t) % 3_600_000)].append(metrics["no2"])
        # several Kafka values per device, as ingest forwards them
        for k in range(0, len(readings), 100):
            batches.append(ReadingBatch(exp.id, d.id, d.group, to_ms(t0) + 1, tuple(readings[k : k + 100])))
    kpis = [
        KpiValue(exp.id, "no2_mean_1h", "no2", "mean", g, 3600, w, sum(v) / len(v), len(v), 3)
        for (g, w), v in per_window.items()
    ]
    statuses = [
        DeviceStatus(exp.id, f"{prefix}-t1", "online", to_ms(t0), to_ms(t0)),
        DeviceStatus(exp.id, f"{prefix}-t1", "offline", to_ms(t0 + timedelta(hours=3)), to_ms(t0)),
    ]
    rejections = [
        Rejection(
            reason,
            "test",
            f"pilots/{exp.id}/{prefix}-t1/telemetry",
            to_ms(t0) + k * 1000,
            exp.id,
            f"{prefix}-t1",
            None,
            "x",
            f"{suffix}-{k}",
        )
        for k, reason in enumerate([Reason.MALFORMED_JSON, Reason.MALFORMED_JSON, Reason.UNKNOWN_METRIC])
    ]
    return Dataset(exp, t0, batches, kpis, statuses, rejections)


def expected_baseline_vs_intervention(ds: Dataset) -> dict[str, tuple[float, float]]:
    """group → (baseline mean, intervention mean) of no2, weighted by samples (= all samples)."""
    mid = ds.experiment.periods.intervention.start
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (dev, m, ts), v in ds.rows().items():
        if m == "no2":
            period = "intervention" if ts >= to_ms(mid) else "baseline"
            acc[(ds.group_of(dev), period)].append(v)
    return {
        g: (
            sum(acc[(g, "baseline")]) / len(acc[(g, "baseline")]),
            sum(acc[(g, "intervention")]) / len(acc[(g, "intervention")]),
        )
        for g in ("treatment", "control")
    }


# --- shared between the PostgreSQL 15 and the TimescaleDB tests -------------------------------


def load(conn, ds: Dataset, batches_per_statement: int | None = None) -> dict[str, int]:
    """Write the dataset through the sink's writers in one transaction; returns rows written.
    ``batches_per_statement`` (PGlite) keeps each statement small, since PGlite over a socket
    fails on a protocol message over 64 KiB and on COPY: readings then go through the
    one-statement ``unnest`` upsert instead of COPY + merge."""
    from storage import writer  # noqa: PLC0415

    step = batches_per_statement or len(ds.batches)
    write_readings = writer.write_readings_unnest if batches_per_statement else writer.write_readings
    with conn.transaction():
        return {
            "experiments": writer.write_experiments(conn, [ds.experiment]),
            "readings": sum(write_readings(conn, ds.batches[k : k + step]) for k in range(0, len(ds.batches), step)),
            "kpis": writer.write_kpis(conn, ds.kpis),
            "device_status": writer.write_device_status(conn, ds.statuses),
            "rejections": writer.write_rejections(conn, ds.rejections),
        }


def check_query_layer(conn, ds: Dataset) -> None:
    """Every query function against the figures computed in Python."""
    import pytest  # noqa: PLC0415

    exp = ds.experiment.id
    t0, t1 = ds.t0, ds.t_end

    stored = conn.execute(
        "SELECT device_id, metric, ts, value FROM readings WHERE experiment_id = %s", (exp,)
    ).fetchall()
    assert {(d, m, to_ms(ts)): v for d, m, ts, v in stored} == ds.rows()
    assert len(stored) == len(ds.rows())

    # the minute rollup, row by row
    minute: dict[tuple, list[float]] = defaultdict(list)
    for (d, m, ts), v in ds.rows().items():
        minute[(d, m, ts - ts % 60_000)].append(v)
    got = conn.execute(
        "SELECT device_id, metric, bucket, samples, total, min_value, max_value FROM readings_1m"
        " WHERE experiment_id = %s",
        (exp,),
    ).fetchall()
    assert len(got) == len(minute)
    for d, m, b, n, total, lo, hi in got:
        want = minute[(d, m, to_ms(b))]
        assert (n, lo, hi) == (len(want), min(want), max(want))
        assert total == pytest.approx(sum(want))

    for bucket_s, bucket in ((900, "15 minutes"), (3600, "1 hour"), (7200, "2 hours")):
        rows = conn.execute(
            "SELECT bucket, device_group, samples, mean, min_value, max_value"
            " FROM metric_series(%s, 'no2', %s::interval, %s, %s)",
            (exp, bucket, t0, t1),
        ).fetchall()
        want = ds.metric_series("no2", bucket_s)
        assert {(to_ms(b), g) for b, g, *_ in rows} == set(want), bucket
        for b, g, n, mean, lo, hi in rows:
            wn, wmean, wlo, whi = want[(to_ms(b), g)]
            assert (n, lo, hi) == (wn, wlo, whi)
            assert mean == pytest.approx(wmean)

    t1_id = ds.experiment.devices[0].id
    dev = conn.execute(
        "SELECT bucket, samples FROM device_series(%s, 'pm25', '1 hour', %s, %s)", (t1_id, t0, t1)
    ).fetchall()
    assert [n for _b, n in dev] == [3600 // INTERVAL_S] * HOURS

    series = conn.execute(
        "SELECT window_start, device_group, value, period FROM kpi_series(%s, 'no2_mean_1h')", (exp,)
    ).fetchall()
    assert len(series) == len(ds.kpis)
    assert {p for *_x, p in series} == {"baseline", "intervention"}

    expected = expected_baseline_vs_intervention(ds)
    bvi = {
        g: (b, i, c)
        for g, b, i, c in conn.execute(
            "SELECT device_group, baseline, intervention, change FROM kpi_baseline_vs_intervention(%s)", (exp,)
        )
    }
    for g, (b, i) in expected.items():
        assert bvi[g][0] == pytest.approx(b)
        assert bvi[g][1] == pytest.approx(i)
        assert bvi[g][2] == pytest.approx(i / b - 1)

    tvc = {
        p: (t, c)
        for p, t, c in conn.execute("SELECT period, treatment, control FROM kpi_treatment_vs_control(%s)", (exp,))
    }
    assert tvc["baseline"] == pytest.approx((expected["treatment"][0], expected["control"][0]))
    assert tvc["intervention"] == pytest.approx((expected["treatment"][1], expected["control"][1]))

    # kpi_impact (a reading-level ratio of group means) was dropped by 0021: the impact is the
    # streams worker's device-level estimate (streams_impact)
    assert conn.execute("SELECT to_regprocedure('kpi_impact(text)')").fetchone()[0] is None

    health = {
        r[0]: r[1:]
        for r in conn.execute(
            "SELECT device_id, last_seen, status, status_since, samples, expected, completeness"
            " FROM device_health(%s, %s, %s)",
            (exp, t0, t1),
        )
    }
    n_expected = HOURS * 3600 // INTERVAL_S
    assert set(health) == {d.id for d in ds.experiment.devices}
    for d in ds.experiment.devices:
        last_seen, status, since, samples, exp_n, completeness = health[d.id]
        assert to_ms(last_seen) == max(ts for (dv, _m, ts) in ds.rows() if dv == d.id)
        assert (samples, exp_n) == (ds.samples_of(d.id), n_expected)
        assert completeness == pytest.approx(0.75 if d.id.endswith("t2") else 1.0)
        if d.id == t1_id:
            assert (status, since) == ("offline", t0 + timedelta(hours=3))
        else:
            assert status is None

    by_reason = dict(conn.execute("SELECT reason, rejections FROM rejections_by_reason(%s)", (exp,)).fetchall())
    assert by_reason == {"malformed_json": 2, "unknown_metric": 1}
    timeline = conn.execute(
        "SELECT bucket, reason, rejections FROM rejections_timeline(%s, '1 hour', %s, %s)", (exp, t0, t1)
    ).fetchall()
    assert [(b, r, n) for b, r, n in timeline] == [(t0, "malformed_json", 2), (t0, "unknown_metric", 1)]
