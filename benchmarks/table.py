"""The benchmark's printed tables and the targets it checks.

Ratios compare medians taken in the same run, so they hold on a noisy
machine better than the absolute times do.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

LABELS = {
    "fetch": "fetch (floor)",
    "write": "bare write (floor)",
    "floor": "fetch + bare write (floor)",
    "sync": "task-etl first sync",
    "resync": "task-etl re-sync, 5 % changed",
    "dlt": "dlt first load",
    "dlt-resync": "dlt re-load, 5 % changed",
}
# Where task-etl must beat dlt by at least this factor.
DLT_FACTORS = {"sqlite": 5.0, "postgresql": 3.0}
FLOOR_FACTOR = 1.3
RESYNC_FACTOR = 1.5
MEMORY_LIMIT_MB = 100.0
MEMORY_GROWTH = 1.3
MEMORY_LIMIT_AT = 1_000_000
DELAY_SPEEDUP = 6.0


@dataclass(frozen=True)
class Measurement:
    tasks: int
    name: str
    database: str
    seconds: tuple[float, ...]
    peak_mb: tuple[float, ...]
    extra: dict[str, Any]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak(self) -> float:
        return max(self.peak_mb)


@dataclass(frozen=True)
class Target:
    what: str
    value: float
    limit: float
    at_most: bool

    @property
    def is_met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def line(self) -> str:
        sign = "≤" if self.at_most else "≥"
        verdict = "ok" if self.is_met else "MISSED"
        target = f"(target {sign} {self.limit:g})"
        return f"  {verdict:6} {self.what}: {self.value:.2f} {target}"


@dataclass(frozen=True)
class Report:
    text: str
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class DelayRun:
    label: str
    sync: str
    parallelism: int
    rate: float
    seconds: tuple[float, ...]
    requests: int
    busiest_second: int


# -- throughput ---------------------------------------------------------------------


def throughput_report(measurements: list[Measurement]) -> Report:
    found = {(m.tasks, m.name, m.database): m for m in measurements}
    sizes = sorted({m.tasks for m in measurements})
    databases = [d for d in ("sqlite", "postgresql") if any(k[2] == d for k in found)]
    header = (
        "tasks",
        "measurement",
        "database",
        "median s",
        "tasks/s",
        "peak MB",
        "ratio",
    )
    rows: list[tuple[str, ...]] = []
    targets: list[Target] = []
    for size in sizes:
        fetch = found[(size, "fetch", "")]
        rows.append(_row(fetch, fetch.median, ""))
        for database in databases:
            rows.extend(_database_rows(found, size, database, fetch, targets))
    targets.extend(_memory_targets(found, sizes, databases))
    lines = _format([header, *rows])
    lines.append("targets:")
    lines.extend(target.line() for target in targets)
    return Report("\n".join(lines), tuple(targets))


def _database_rows(
    found: dict[tuple[int, str, str], Measurement],
    size: int,
    database: str,
    fetch: Measurement,
    targets: list[Target],
) -> list[tuple[str, ...]]:
    def get(name: str) -> Measurement | None:
        return found.get((size, name, database))

    rows = []
    write, sync, resync = get("write"), get("sync"), get("resync")
    floor = fetch.median + write.median if write else None
    if write and floor:
        rows.append(_row(write, write.median, ""))
        rows.append(_floor_row(size, database, floor))
    where = f"{database}, {size:,} tasks"
    if sync and floor:
        ratio = sync.median / floor
        rows.append(_row(sync, sync.median, f"{ratio:.2f} × floor"))
        targets.append(
            Target(f"first sync / floor, {where}", ratio, FLOOR_FACTOR, True)
        )
    if resync:
        ratio = resync.median / fetch.median
        rows.append(_row(resync, resync.median, f"{ratio:.2f} × fetch"))
        what = f"re-sync / fetch, {where}"
        targets.append(Target(what, ratio, RESYNC_FACTOR, True))
    for name, ours in (("dlt", sync), ("dlt-resync", resync)):
        theirs = get(name)
        if theirs and ours:
            ratio = theirs.median / ours.median
            rows.append(_row(theirs, theirs.median, f"{ratio:.2f} × task-etl"))
            what = f"{LABELS[name].split(',')[0]} / task-etl, {where}"
            targets.append(Target(what, ratio, DLT_FACTORS[database], False))
    return rows


def _memory_targets(
    found: dict[tuple[int, str, str], Measurement],
    sizes: list[int],
    databases: list[str],
) -> list[Target]:
    targets = []
    for database in databases:
        for name in ("sync", "resync"):
            runs = [found[k] for s in sizes if (k := (s, name, database)) in found]
            if len(runs) > 1:
                growth = runs[-1].peak / runs[0].peak
                what = (
                    f"{LABELS[name]} peak memory, {runs[-1].tasks:,} / "
                    f"{runs[0].tasks:,} tasks, {database}"
                )
                targets.append(Target(what, growth, MEMORY_GROWTH, True))
            for run in runs:
                if run.tasks >= MEMORY_LIMIT_AT:
                    what = f"{LABELS[name]} peak MB, {run.tasks:,} tasks, {database}"
                    targets.append(Target(what, run.peak, MEMORY_LIMIT_MB, True))
    return targets


def _row(m: Measurement, seconds: float, ratio: str) -> tuple[str, ...]:
    return (
        f"{m.tasks:,}",
        LABELS[m.name],
        m.database or "-",
        f"{seconds:.2f}",
        f"{m.tasks / seconds:,.0f}",
        f"{m.peak:.0f}",
        ratio,
    )


def _floor_row(size: int, database: str, seconds: float) -> tuple[str, ...]:
    return (
        f"{size:,}",
        LABELS["floor"],
        database,
        f"{seconds:.2f}",
        f"{size / seconds:,.0f}",
        "",
        "",
    )


# -- delay --------------------------------------------------------------------------


def delay_report(runs: list[DelayRun], delay: float, tasks: int) -> Report:
    header = (
        "walk",
        "sync",
        "parallel",
        "limit req/s",
        "median s",
        "requests",
        "busiest 1 s",
    )
    rows = [
        (
            run.label,
            run.sync,
            str(run.parallelism),
            f"{run.rate:g}",
            f"{statistics.median(run.seconds):.2f}",
            str(run.requests),
            str(run.busiest_second),
        )
        for run in runs
    ]
    targets = [
        Target(
            f"busiest second / limit, {run.label}, {run.sync}",
            run.busiest_second,
            run.rate,
            True,
        )
        for run in runs
    ]
    for sync in dict.fromkeys(run.sync for run in runs):
        speedup = _speedup([run for run in runs if run.sync == sync])
        if speedup is not None:
            targets.insert(0, speedup)

    title = (
        f"delay mode: {delay * 1000:.0f} ms per request on the server, "
        f"{tasks:,} tasks in 8 accounts, synced into SQLite, then synced again "
        "after 5 % of the statuses changed; 'busiest 1 s' is the most requests "
        "the server saw arrive within any one second"
    )
    lines = [title, *_format([header, *rows]), "targets:"]
    lines.extend(target.line() for target in targets)
    return Report("\n".join(lines), tuple(targets))


def _speedup(runs: list[DelayRun]) -> Target | None:
    """How much faster the first parallel walk was than the serial one."""
    serial = next((run for run in runs if run.parallelism == 1), None)
    parallel = next((run for run in runs if run.parallelism > 1), None)
    if serial is None or parallel is None:
        return None
    speedup = statistics.median(serial.seconds) / statistics.median(parallel.seconds)
    what = f"speed-up of {parallel.label} over {serial.label}, {parallel.sync}"
    return Target(what, speedup, DELAY_SPEEDUP, False)


def _format(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines
