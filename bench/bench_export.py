"""Does a large export stay small in memory? ``pilotlab export`` of one experiment with
10 million readings, as CSV and as Parquet, on the embedded stack: wall time, rows/s and
the exporting process's peak RSS, side by side with the database's own COPY to /dev/null.

    python bench/bench_export.py [--rows 10000000] [--out-dir bench/results]

Writes ``bench/results/export-<UTC>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from control.stack import Stack  # noqa: E402
from simulators.synthetic import PilotSpec  # noqa: E402
from storage.migrate import migrate  # noqa: E402
from storage.writer import write_experiments  # noqa: E402

# runs one command and prints its peak RSS (KiB) as the last line: ru_maxrss of the child
_MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
)


def fill(owner_url: str, rows: int) -> str:
    """One experiment with ``rows`` readings spread over 100 devices and 28 days."""
    exp = PilotSpec("export-bench", 50, 50, interval_s=60).experiment()
    with psycopg.connect(owner_url) as conn:
        write_experiments(conn, [exp])
        conn.execute(
            """
            INSERT INTO readings (ts, experiment_id, device_id, device_group, metric, value, seq, received_at)
            SELECT %(t0)s + (i / 100) * interval '1 second' * (28 * 86400.0 / (%(n)s / 100 + 1)),
                   %(exp)s, CASE WHEN i %% 100 < 50 THEN 't' ELSE 'c' END || lpad((i %% 50)::text, 2, '0'),
                   CASE WHEN i %% 100 < 50 THEN 'treatment' ELSE 'control' END,
                   'no2', 20 + (i %% 997) / 10.0, i / 100, now()
              FROM generate_series(0, %(n)s - 1) AS i
            """,
            {"t0": exp.periods.baseline.start, "n": rows, "exp": exp.id},
        )
        conn.commit()
    return exp.id


def export(env: dict, experiment_id: str, fmt: str, out: Path) -> dict:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            sys.executable,
            "-m",
            "control",
            "export",
            experiment_id,
            "--out",
            str(out),
            "--format",
            fmt,
            "--table",
            "readings",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.monotonic() - started
    size = (out / f"readings.{fmt}").stat().st_size
    return {
        "format": fmt,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(int(proc.stdout.split()[-1]) / 1024, 1),
        "file_mb": round(size / 2**20, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pilotlab-export-bench-") as tmp:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user and keeps its data here
        stack = Stack(Path(tmp) / "stack")
        try:
            state = stack.up()
            env = {**os.environ, **state.env()}
            owner = env.get("PILOTLAB_DATABASE_OWNER_URL", state.database_url)
            migrate(owner)
            t = time.monotonic()
            exp_id = fill(owner, args.rows)
            fill_s = time.monotonic() - t
            with psycopg.connect(owner) as conn:
                t = time.monotonic()
                with conn.cursor().copy("COPY (SELECT * FROM readings) TO STDOUT WITH (FORMAT csv)") as cp:
                    for _ in cp:
                        pass
                raw_copy_s = time.monotonic() - t
            results = [export(env, exp_id, fmt, Path(tmp) / fmt) for fmt in ("csv", "parquet")]
        finally:
            stack.down(purge=True)
    for r in results:
        r["rows_per_s"] = round(args.rows / r["seconds"])
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    lines = [
        f"# Export benchmark {stamp}",
        "",
        f"`python bench/bench_export.py --rows {args.rows}`: one experiment, {args.rows:,} readings, "
        f"`pilotlab export --table readings` in its own process (peak RSS of that process). Load average at "
        f"start {load:.2f}; filling took {fill_s:.0f} s; PostgreSQL's own COPY of the table to nowhere: "
        f"{raw_copy_s:.1f} s ({args.rows / raw_copy_s:,.0f} rows/s).",
        "",
        "| format | seconds | rows/s | peak RSS | file | vs raw COPY |",
        "| --- | --- | --- | --- | --- | --- |",
        *(
            f"| {r['format']} | {r['seconds']} | {r['rows_per_s']:,} | {r['peak_rss_mb']} MB | {r['file_mb']} MB | "
            f"{raw_copy_s / r['seconds']:.2f} |"
            for r in results
        ),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"export-{stamp}.md").write_text(text)
    doc = {"rows": args.rows, "load": load, "fill_s": fill_s, "raw_copy_s": raw_copy_s, "results": results}
    (args.out_dir / f"export-{stamp}.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
