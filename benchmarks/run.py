"""Benchmark task-etl against the bare cost of its work, and against dlt.

    pip install -e '.[bench]'
    python benchmarks/run.py                  # 10,000 and 100,000 tasks
    python benchmarks/run.py --tasks 1000000  # on request: takes a while

Against the simulator served from its own process on 127.0.0.1, each
measurement runs in a fresh process (so that its peak memory is its own)
and is repeated; the table shows medians. Throughput runs give the client a
high request rate (`--rate`, default 10,000 requests/s) because the default
of 10 is a polite limit meant for the real platform and would measure only
itself. The delay mode gives every request 50 ms of server time and walks
8 accounts one at a time and in parallel, checking from the server side
that the configured rate was never exceeded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from servers import (
    BenchError,
    Databases,
    PgServer,
    SimulatorProcess,
    World,
    postgresql_server,
)
from sqlalchemy import Engine
from table import DelayRun, Measurement, delay_report, throughput_report

from etl import store
from etl.config import DatabaseConfig

MEASURE = Path(__file__).resolve().parent / "measure.py"
# A single measurement of a million tasks with dlt takes minutes, not hours.
CHILD_TIMEOUT_S = 3600
CHANGED_SHARE = 0.05

_profile_numbers = itertools.count(1)


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...]
    repeat: int
    databases: tuple[str, ...]
    modes: tuple[str, ...]
    main_accounts: int
    sub_accounts: int
    parallelism: int
    page_size: int
    rate: float
    with_dlt: bool
    delay: float
    delay_rate: float
    delay_tasks_per_account: int
    postgresql_url: str | None
    profile: str | None


@dataclass
class Collected:
    """Every sample, keyed by (tasks, measurement, database)."""

    samples: dict[tuple[int, str, str], list[dict[str, Any]]] = field(
        default_factory=dict
    )

    def add(self, tasks: int, name: str, database: str, result: dict[str, Any]) -> None:
        # Each measurement says what it wrote to, so that a row can never
        # be filed under the other database.
        used = result.get("dialect", "")
        _expect(
            used == database,
            f"{name} for {database or 'no database'} wrote to {used or 'none'}",
        )
        self.samples.setdefault((tasks, name, database), []).append(result)

    def measurements(self) -> list[Measurement]:
        return [
            Measurement(
                tasks=tasks,
                name=name,
                database=database,
                seconds=tuple(r["seconds"] for r in results),
                peak_mb=tuple(r["peak_mb"] for r in results),
                extra=results[-1],
            )
            for (tasks, name, database), results in self.samples.items()
        ]


def main(argv: Sequence[str] | None = None) -> int:
    options, json_path = parse_args(argv)
    # Stopped by SIGTERM (`timeout`, a job runner) as by Ctrl-C: unwinding
    # stops the simulator and the throwaway PostgreSQL cluster, which a
    # plain exit left running.
    signal.signal(signal.SIGTERM, _stop)
    print(describe_machine(options), flush=True)
    collected = Collected()
    reports, delays = [], []
    try:
        wants_postgresql = "postgresql" in options.databases
        with postgresql_server(wants_postgresql, options.postgresql_url) as cluster:
            if "throughput" in options.modes:
                for size in options.sizes:
                    run_throughput(options, size, cluster, collected)
                reports.append(throughput_report(collected.measurements()))
            if "delay" in options.modes:
                delays, tasks = run_delay(options)
                reports.append(delay_report(delays, options.delay, tasks))
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1

    for report in reports:
        print(report.text, flush=True)
    if json_path:
        document = {
            "options": asdict(options),
            "machine": describe_machine(options),
            "measurements": [asdict(m) for m in collected.measurements()],
            "targets": [asdict(t) for report in reports for t in report.targets],
            "delay_runs": [asdict(run) for run in delays],
        }
        Path(json_path).write_text(json.dumps(document, indent=2, default=str))
    return 0


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> tuple[Options, str | None]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--tasks",
        type=_sizes,
        default="10000,100000",
        help="data set sizes, comma-separated",
    )
    add("--repeat", type=_at_least(1), default=3, help="runs per measurement")
    add("--databases", default="sqlite,postgresql", help="sqlite, postgresql")
    add("--modes", default="throughput,delay", help="throughput, delay")
    add("--main-accounts", type=_at_least(1), default=2)
    add("--sub-accounts", type=_at_least(0), default=4, help="per main account")
    add("--parallelism", type=_at_least(1), default=4, help="accounts walked at once")
    add("--page-size", type=_at_least(1), default=100)
    add("--rate", type=_positive, default=10_000.0, help="requests/s, throughput runs")
    add("--no-dlt", action="store_true", help="leave dlt out")
    add("--delay", type=_not_negative, default=0.05, help="server seconds per request")
    add("--delay-rate", type=_positive, default=150.0, help="requests/s, delay mode")
    add(
        "--delay-tasks", type=_at_least(1), default=1000, help="per account, delay mode"
    )
    add(
        "--postgresql-url",
        metavar="URL",
        help="a superuser's database on a server where the benchmark may create "
        "and drop databases [default: start a throwaway cluster]",
    )
    add(
        "--profile",
        metavar="DIR",
        help="record a py-spy flame graph of every task-etl run into DIR",
    )
    add("--json", metavar="PATH", help="also write every sample as JSON")
    args = parser.parse_args(argv)
    accounts = args.main_accounts * (1 + args.sub_accounts)
    if min(args.tasks) < accounts:
        parser.error(f"--tasks: each size must be at least the {accounts} accounts")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        # Found now, not after a run of many minutes.
        parser.error(f"--json: no directory {Path(args.json).parent}")

    with_dlt = not args.no_dlt and _has_dlt()
    if not args.no_dlt and not with_dlt:
        print("dlt is not installed: its rows are left out", file=sys.stderr)
    options = Options(
        sizes=args.tasks,
        repeat=args.repeat,
        databases=_choices(parser, args.databases, ("sqlite", "postgresql")),
        modes=_choices(parser, args.modes, ("throughput", "delay")),
        main_accounts=args.main_accounts,
        sub_accounts=args.sub_accounts,
        parallelism=args.parallelism,
        page_size=args.page_size,
        rate=args.rate,
        with_dlt=with_dlt,
        delay=args.delay,
        delay_rate=args.delay_rate,
        delay_tasks_per_account=args.delay_tasks,
        postgresql_url=args.postgresql_url,
        profile=args.profile,
    )
    return options, args.json


def _at_least(least: int) -> Callable[[str], int]:
    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}: {text}")
        return value

    return whole


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None


def _positive(text: str) -> float:
    value = _number(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0: {text}")
    return value


def _not_negative(text: str) -> float:
    value = _number(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of 0 or more: {text}")
    return value


def _sizes(text: str) -> tuple[int, ...]:
    size = _at_least(1)
    return tuple(size(part) for part in text.split(","))


def _choices(
    parser: argparse.ArgumentParser, text: str, allowed: tuple[str, ...]
) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = set(chosen) - set(allowed)
    if unknown or not chosen:
        parser.error(f"choose among {', '.join(allowed)}; got {text!r}")
    return chosen


def _has_dlt() -> bool:
    import importlib.util

    return importlib.util.find_spec("dlt") is not None


def describe_machine(options: Options) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(
            line.split(":", 1)[1].strip() for line in lines if "model name" in line
        )
    except (OSError, StopIteration):
        pass
    import os

    return (
        f"machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}"
        f" on {platform.system()} {platform.release()}\n"
        f"repeats: {options.repeat}; page size {options.page_size}; "
        f"{options.parallelism} accounts walked at once; throughput runs allow "
        f"{options.rate:,.0f} requests/s (the default of 10 is meant for the real "
        "platform)"
    )


# -- throughput -------------------------------------------------------------------


def run_throughput(
    options: Options, size: int, cluster: PgServer | None, collected: Collected
) -> None:
    accounts = options.main_accounts * (1 + options.sub_accounts)
    world = World(options.main_accounts, options.sub_accounts, size // accounts)
    print(
        f"{world.tasks:,} tasks: {options.main_accounts} main accounts × "
        f"{options.sub_accounts} sub-accounts each, {world.tasks_per_account:,} "
        "tasks per account; building the simulator...",
        file=sys.stderr,
        flush=True,
    )
    with SimulatorProcess(world) as simulator:
        base = _base_spec(options, simulator, options.parallelism, options.rate)
        for repeat in range(1, options.repeat + 1):
            print(f"  run {repeat} of {options.repeat}", file=sys.stderr, flush=True)
            _one_repeat(options, world, simulator, base, cluster, collected, repeat)


def _one_repeat(
    options: Options,
    world: World,
    simulator: SimulatorProcess,
    base: dict[str, Any],
    cluster: PgServer | None,
    collected: Collected,
    repeat: int,
) -> None:
    size = world.tasks
    fetched = measure(base, kind="fetch")
    _expect(fetched["tasks"] == size, f"fetch read {fetched['tasks']} of {size}")
    collected.add(size, "fetch", "", fetched)

    databases = {kind: Databases(kind, cluster) for kind in options.databases}
    try:
        loaded = {}
        for kind, dbs in databases.items():
            loaded[kind] = _first_loads(options, size, base, dbs, collected)
        changed = simulator.change_statuses(CHANGED_SHARE, seed=repeat)
        for kind, (sync_url, dlt_url, workdir) in loaded.items():
            _reloads(
                options,
                size,
                base,
                kind,
                sync_url,
                dlt_url,
                workdir,
                changed,
                collected,
            )
    finally:
        for dbs in databases.values():
            dbs.close()


def _first_loads(
    options: Options,
    size: int,
    base: dict[str, Any],
    dbs: Databases,
    collected: Collected,
) -> tuple[str, str, str]:
    kind = dbs.kind
    written = measure(base, kind="write", database=migrated(dbs.new("floor")))
    _expect(written["tasks"] == size, f"bare write stored {written['tasks']} of {size}")
    collected.add(size, "write", kind, written)

    sync_url = migrated(dbs.new("etl"))
    synced = measure(base, kind="sync", database=sync_url)
    _check_sync(synced, size, new=size, changed=0)
    collected.add(size, "sync", kind, synced)

    dlt_url, workdir = "", ""
    if options.with_dlt:
        dlt_url, workdir = dbs.new("dlt"), str(dbs.scratch / "dlt")
        loaded = measure(base, kind="dlt", database=dlt_url, workdir=workdir)
        _expect(loaded["tasks"] == size, f"dlt stored {loaded['tasks']} of {size}")
        collected.add(size, "dlt", kind, loaded)
    return sync_url, dlt_url, workdir


def _reloads(
    options: Options,
    size: int,
    base: dict[str, Any],
    kind: str,
    sync_url: str,
    dlt_url: str,
    workdir: str,
    changed: int,
    collected: Collected,
) -> None:
    synced = measure(base, kind="sync", database=sync_url)
    _check_sync(synced, size, new=0, changed=changed)
    collected.add(size, "resync", kind, synced)
    if options.with_dlt:
        loaded = measure(base, kind="dlt", database=dlt_url, workdir=workdir)
        _expect(loaded["tasks"] == size, f"dlt holds {loaded['tasks']} of {size}")
        collected.add(size, "dlt-resync", kind, loaded)


def _check_sync(result: dict[str, Any], size: int, *, new: int, changed: int) -> None:
    expected = {
        "outcome": "succeeded",
        "tasks": size,
        "new": new,
        "changed": changed,
        "status_changes": new + changed,
        "removed": 0,
    }
    wrong = {k: result.get(k) for k, v in expected.items() if result.get(k) != v}
    _expect(not wrong, f"task-etl sync: expected {expected}, got {wrong}")


# -- delay ------------------------------------------------------------------------


def run_delay(options: Options) -> tuple[list[DelayRun], int]:
    """8 accounts, each request held `delay` by the server, synced into SQLite.

    Each walk is measured twice: a first sync, whose writing of every task
    keeps the process busy, and a re-sync after 5 % of the statuses changed,
    where waiting on the server is nearly all of the time.
    """
    world = World(1, 7, options.delay_tasks_per_account, delay=options.delay)
    plans = [
        ("one account at a time", 1, options.delay_rate),
        ("8 accounts in parallel", 8, options.delay_rate),
        ("8 in parallel, rate-bound", 8, options.delay_rate / 4),
    ]
    print(
        f"delay mode: {world.tasks:,} tasks in 8 accounts, {options.delay * 1000:.0f}"
        " ms per request...",
        file=sys.stderr,
        flush=True,
    )
    runs = []
    with SimulatorProcess(world) as simulator:
        for label, parallelism, rate in plans:
            base = _base_spec(options, simulator, parallelism, rate)
            samples = [
                _delay_sample(base, simulator, world.tasks, seed)
                for seed in range(options.repeat)
            ]
            for sync, index in (("first sync", 0), ("re-sync", 1)):
                measured = [sample[index] for sample in samples]
                runs.append(
                    DelayRun(
                        label,
                        sync,
                        parallelism,
                        rate,
                        tuple(seconds for seconds, _, _ in measured),
                        measured[-1][1],
                        max(busiest for _, _, busiest in measured),
                    )
                )
    return runs, world.tasks


_DelaySample = tuple[float, int, int]  # seconds, requests, busiest second


def _delay_sample(
    base: dict[str, Any], simulator: SimulatorProcess, tasks: int, seed: int
) -> tuple[_DelaySample, _DelaySample]:
    """A first sync into a new database, then a re-sync after 5 % changed."""
    dbs = Databases("sqlite", None)
    try:
        database = migrated(dbs.new("d"))
        first = measure(base, kind="sync", database=database)
        _check_sync(first, tasks, new=tasks, changed=0)
        first_arrivals = simulator.take_arrivals()
        changed = simulator.change_statuses(CHANGED_SHARE, seed=seed)
        again = measure(base, kind="sync", database=database)
        _check_sync(again, tasks, new=0, changed=changed)
        again_arrivals = simulator.take_arrivals()
    finally:
        dbs.close()
    return (
        (first["seconds"], len(first_arrivals), busiest_second(first_arrivals)),
        (again["seconds"], len(again_arrivals), busiest_second(again_arrivals)),
    )


def busiest_second(arrivals: list[float]) -> int:
    """The most requests that arrived within any one second."""
    arrivals = sorted(arrivals)
    most, start = 0, 0
    for end, moment in enumerate(arrivals):
        while moment - arrivals[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


# -- running one measurement --------------------------------------------------------


def _base_spec(
    options: Options, simulator: SimulatorProcess, parallelism: int, rate: float
) -> dict[str, Any]:
    served = simulator.served
    return {
        "url": served.url,
        "token": served.token,
        "main_user_ids": list(served.main_user_ids),
        "accounts": [list(account) for account in served.accounts],
        "page_size": options.page_size,
        "parallelism": parallelism,
        "rate": rate,
        "profile": options.profile,
    }


def measure(base: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result."""
    command = [sys.executable, str(MEASURE), json.dumps({**base, **spec})]
    if base.get("profile") and spec["kind"] == "sync":
        command = _profiled(command, Path(base["profile"]), spec["database"])
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{spec['kind']}: no result in {CHILD_TIMEOUT_S} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-60:])
        raise BenchError(f"{spec['kind']} exited with {done.returncode}:\n{tail}")
    # py-spy, when profiling, writes its own lines around the result's.
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"{spec['kind']} printed no result: {done.stdout!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _profiled(command: list[str], directory: Path, database: str) -> list[str]:
    """The command, run under py-spy: it samples every thread, not just one."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    backend = database.split(":", 1)[0].split("+", 1)[0]
    output = directory / f"{next(_profile_numbers):02d}-sync-{backend}.svg"
    return [py_spy, "record", "--rate", "200", "--output", str(output), "--", *command]


def migrated(url: str) -> str:
    """The URL, after bringing its database to task-etl's schema."""
    engine: Engine = store.connect(DatabaseConfig(url=url))
    try:
        store.migrate(engine)
    finally:
        engine.dispose()
    return url


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


if __name__ == "__main__":
    sys.exit(main())
