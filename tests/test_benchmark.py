"""The benchmark script runs end to end on a tiny data set.

Only that it works is checked here: speed is what the script itself reports.
dlt is measured when it is installed (the `bench` extra) and left out
otherwise, so the suite does not need it.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
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


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (["--tasks", "abc"], "--tasks: not a whole number: abc"),
        (["--tasks", "3"], "--tasks: each size must be at least the 10 accounts"),
        (["--tasks", "0"], "--tasks: must be at least 1: 0"),
        (["--repeat", "0"], "--repeat: must be at least 1: 0"),
        (["--rate", "0"], "--rate: must be a number above 0: 0"),
        (["--parallelism", "0"], "--parallelism: must be at least 1: 0"),
        (["--main-accounts", "0"], "--main-accounts: must be at least 1: 0"),
        (["--sub-accounts", "-1"], "--sub-accounts: must be at least 0: -1"),
        (["--page-size", "0"], "--page-size: must be at least 1: 0"),
        (["--delay", "-1"], "--delay: must be a number of 0 or more: -1"),
        (["--delay-rate", "nan"], "--delay-rate: must be a number above 0: nan"),
        (["--json", "/nonexistent-dir/b.json"], "--json: no directory"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(
    options: list[str], says: str
) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert says in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr
    assert "machine:" not in done.stdout


def state_and_parent(pid: int) -> tuple[str, int] | None:
    """From /proc: the process's state letter and its parent's pid; None
    once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # After the command name in parentheses, which may hold spaces.
    state, parent = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(parent)


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            known = state_and_parent(int(entry.name))
            if known is not None and known[1] == pid:
                found.add(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    known = state_and_parent(pid)
    return known is not None and known[0] != "Z"


def test_a_benchmark_stopped_by_sigterm_stops_the_servers_it_started(
    tmp_path: Path,
) -> None:
    bench = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--tasks", "2000", "--repeat", "3"]
        + ["--databases", "sqlite", "--modes", "throughput", "--no-dlt"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The simulator is the child it starts first; wait until it is up.
        assert bench.stdout is not None
        bench.stdout.readline()  # the machine line, printed before anything
        deadline = time.monotonic() + 60
        started: set[int] = set()
        while not started and time.monotonic() < deadline:
            started = children(bench.pid)
            time.sleep(0.1)
        assert started, "no child process started"
        time.sleep(1)
        # With the measurement running then, in a process of its own.
        started |= children(bench.pid)
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()

    time.sleep(0.5)
    assert not [pid for pid in started if is_running(pid)]
    assert bench.returncode == 128 + signal.SIGTERM
