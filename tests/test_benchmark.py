"""The benchmark script runs end to end on a tiny data set.

Only that it works is checked here: speed is what the script itself reports.
dlt is measured when it is installed (the `bench` extra) and left out
otherwise, so the suite does not need it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pgcluster import PgCluster

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
TIMEOUT_S = 240
HAS_DLT = importlib.util.find_spec("dlt") is not None


def run_benchmark(tmp_path: Path, *options: str) -> tuple[str, dict[str, Any]]:
    report = tmp_path / "bench.json"
    tiny = ("--tasks", "200", "--repeat", "1", "--delay-tasks", "20")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *tiny, *options, "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(report.read_text())


def measured(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m["name"], m["database"]) for m in document["measurements"]}


def expected(database: str) -> set[tuple[str, str]]:
    names = {"write", "sync", "resync"} | ({"dlt", "dlt-resync"} if HAS_DLT else set())
    return {("fetch", "")} | {(name, database) for name in names}


def test_benchmark_measures_every_row_on_sqlite_and_the_delay_mode(
    tmp_path: Path,
) -> None:
    output, document = run_benchmark(
        tmp_path, "--databases", "sqlite", "--delay", "0.01"
    )

    assert measured(document) == expected("sqlite")
    assert all(m["tasks"] == 200 for m in document["measurements"])
    assert "task-etl re-sync, 5 % changed" in output
    targets = {target["what"] for target in document["targets"]}
    assert "first sync / floor, sqlite, 200 tasks" in targets
    for sync in ("first sync", "re-sync"):
        speedup = (
            f"speed-up of 8 accounts in parallel over one account at a time, {sync}"
        )
        assert speedup in targets
    runs = document["delay_runs"]
    assert [run["requests"] for run in runs] == [runs[0]["requests"]] * 6
    busiest = [t for t in document["targets"] if t["what"].startswith("busiest")]
    assert len(busiest) == 6
    assert all(t["value"] <= t["limit"] for t in busiest)


def test_benchmark_measures_both_databases_on_a_given_server(
    tmp_path: Path, pg_cluster: PgCluster
) -> None:
    server = pg_cluster.url("postgres")

    _, document = run_benchmark(
        tmp_path,
        "--databases",
        "sqlite,postgresql",
        "--modes",
        "throughput",
        "--postgresql-url",
        server,
    )

    assert measured(document) == expected("sqlite") | expected("postgresql")
    # With a server at hand, the SQLite rows were measured on PostgreSQL.
    written = {
        (m["name"], m["database"]): m["extra"]["dialect"]
        for m in document["measurements"]
        if m["database"]
    }
    assert written == {(name, database): database for name, database in written}
    with pg_cluster.connect_admin() as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'bench%'"
        ).fetchall()
    assert left == []
