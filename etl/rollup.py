"""Daily status counts: a rollup brought up to date at the end of every run.

Deriving how many tasks were in each status at the end of every day from the
whole history costs more each day the history grows. The rollup instead
keeps one row per day, account and status, and a refresh recomputes only
the days that can have changed since the previous refresh: from the stored
counts of the day before, adding the status changes observed since. A
refresh therefore reads the changes of about one day, whatever the age of
the database.

Which days can have changed: the day of the previous refresh (it was only
counted so far), and every day on which a run that had not finished by then
observed a change (a replay of archived pages observes changes in the past).
Days are calendar days in the platform's time zone, kept in `settings`; a
refresh under another time zone rebuilds the whole rollup.

Within one day a refresh adds only the changes of the runs since the
previous one to the day's stored counts, when those counts are known to
hold every change of the earlier runs and none of a later one: no run was
running during the previous refresh, and no earlier run wrote since (a run
marked abandoned while its process was only paused writes on when it
wakes). Recounting the whole day instead cost a re-sync of 100,000 tasks a
tenth of its time, the day of a first sync holding 100,000 changes. The
first refresh of a new day recounts the day before from the history,
whatever happened to it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    delete,
    func,
    insert,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from etl import runs, store
from etl.errors import StoreError
from etl.models import daily_status_rollup, settings, sync_runs, task_status_changes
from etl.models import tasks as tasks_table

log = logging.getLogger(__name__)

TIMEZONE = "timezone"
COUNTED_DAY = "daily_counts_day"
NEXT_RUN = "daily_counts_next_run"
# "1" when the counted day's counts hold exactly the changes of the runs
# before NEXT_RUN: no run was running while they were counted.
COUNTED_WHOLE_RUNS = "daily_counts_whole_runs"
# The largest id of a change when they were counted.
LAST_CHANGE = "daily_counts_last_change"

_INSERT_ROWS = 1000

# (user_id, sub_user_id, status)
Key = tuple[str, str, int | None]


@dataclass(frozen=True)
class Refresh:
    """What a refresh recomputed."""

    first_day: date | None
    last_day: date
    rows: int
    rebuilt: bool
    # The first run whose changes it read; 0 when it read every run's.
    from_run: int = 0


@dataclass(frozen=True)
class _Counted:
    """What the previous refresh left in `settings`."""

    day: date
    next_run: int
    whole: bool
    last_change: int


def refresh_daily_counts(
    engine: Engine,
    zone: ZoneInfo,
    *,
    rebuild: bool = False,
    now: datetime | None = None,
) -> Refresh:
    """Bring daily_status_rollup up to date, through the day of `now`; call
    it when no run of this process is still writing."""
    try:
        with engine.begin() as connection:
            _serialize(connection)
            result = _refresh(connection, zone, rebuild, now or runs.now())
    except SQLAlchemyError as exc:
        raise StoreError(
            f"the daily status counts were not refreshed: {store.first_line(exc)}"
        ) from exc
    log.info(
        "daily status counts %s from %s to %s: %s rows",
        "rebuilt" if result.rebuilt else "refreshed",
        result.first_day or result.last_day,
        result.last_day,
        result.rows,
    )
    return result


def refresh_after_run(engine: Engine, zone: ZoneInfo) -> None:
    """Refresh at the end of a run; a failure waits for the next run."""
    try:
        refresh_daily_counts(engine, zone)
    except StoreError as exc:
        log.error("%s; the next run will catch up", exc)


def _serialize(connection: Connection) -> None:
    # SQLite transactions of this product begin IMMEDIATE, which already
    # serializes writers; PostgreSQL needs the two refreshes of two runs
    # ending together to take turns, or both would rewrite the same days.
    # A run begins under the same lock shared (see `runs.start_run`), so no
    # run begins while a refresh counts.
    if connection.dialect.name == "postgresql":
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": runs.ROLLUP_LOCK}
        )


def _refresh(
    connection: Connection, zone: ZoneInfo, rebuild: bool, now: datetime
) -> Refresh:
    stored = dict(connection.execute(select(settings.c.key, settings.c.value)).all())
    counted = None if rebuild else _counted(stored, zone)
    last_day = local_day(now, zone)
    # Known before counting, as no run can begin until this transaction ends.
    quiet = not _any_running(connection)
    last_change = _last_change(connection)
    first_day: date | None
    if counted is None:
        first_day = _first_change_day(connection, zone)
        counts, since_run = Counter[Key](), 0
        connection.execute(delete(daily_status_rollup))
    else:
        first_day = _first_stale_day(connection, zone, counted)
        counts, since_run = _counts_before(connection, counted, first_day, last_day)
        connection.execute(
            delete(daily_status_rollup).where(daily_status_rollup.c.day >= first_day)
        )

    rows = 0
    if first_day is not None and first_day <= last_day:
        changes = _changes_by_day(connection, zone, first_day, last_day, since_run)
        rows = _write_days(connection, counts, changes, first_day, last_day)

    _write_settings(
        connection,
        {
            TIMEZONE: zone.key,
            COUNTED_DAY: last_day.isoformat(),
            NEXT_RUN: str(_next_unfinished_run(connection)),
            COUNTED_WHOLE_RUNS: "1" if quiet else "0",
            LAST_CHANGE: str(last_change),
        },
        now,
    )
    return Refresh(first_day, last_day, rows, counted is None, since_run)


def _counted(stored: dict[str, str], zone: ZoneInfo) -> _Counted | None:
    """The previous refresh's state; None when there was none, it counted
    under another time zone, or it cannot be read: the rollup is rebuilt."""
    if stored.get(TIMEZONE) != zone.key:
        return None
    try:
        return _Counted(
            day=date.fromisoformat(stored[COUNTED_DAY]),
            next_run=_whole_number(stored.get(NEXT_RUN, "0")),
            whole=stored.get(COUNTED_WHOLE_RUNS) == "1" and NEXT_RUN in stored,
            last_change=_whole_number(stored.get(LAST_CHANGE, "0")),
        )
    except (KeyError, ValueError):
        return None


def _whole_number(text: str) -> int:
    # int() also reads "1_0" as 10, and " 5" or "+5".
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text)


def _counts_before(
    connection: Connection, counted: _Counted, first_day: date, last_day: date
) -> tuple[Counter[Key], int]:
    """The counts the changes from `first_day` on are added to, and the
    first run whose changes those are: the stored counts of the day last
    counted when they are whole and the day goes on, else the counts at the
    end of the day before, from the changes of every run."""
    goes_on = first_day == counted.day == last_day
    if counted.whole and goes_on and _counted_exactly(connection, counted):
        return _counts_at_end_of(connection, counted.day), counted.next_run
    return _counts_at_end_of(connection, first_day - timedelta(days=1)), 0


def _counted_exactly(connection: Connection, counted: _Counted) -> bool:
    """Whether the changes counted are still those of the runs before the
    next run: none of those wrote a change since (a run marked abandoned
    while its process was only paused writes on when it wakes), and none of
    a later run was counted (a next run set by hand too low)."""
    change = task_status_changes.c
    late = select(change.id).where(
        change.id > counted.last_change, change.run_id < counted.next_run
    )
    early = select(change.id).where(
        _of_runs_since(counted.next_run), change.id <= counted.last_change
    )
    return not any(
        connection.execute(query.limit(1)).first() for query in (late, early)
    )


def _last_change(connection: Connection) -> int:
    return int(
        connection.execute(select(func.max(task_status_changes.c.id))).scalar() or 0
    )


def local_day(moment: datetime, zone: ZoneInfo) -> date:
    return moment.astimezone(zone).date()


def start_of_day(day: date, zone: ZoneInfo) -> datetime:
    """The UTC moment at which `day` begins in `zone`."""
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _first_change_day(connection: Connection, zone: ZoneInfo) -> date | None:
    first = connection.execute(
        select(func.min(task_status_changes.c.observed_at))
    ).scalar()
    return local_day(first, zone) if first is not None else None


def _first_stale_day(connection: Connection, zone: ZoneInfo, counted: _Counted) -> date:
    earliest = connection.execute(
        select(func.min(task_status_changes.c.observed_at)).where(
            _of_runs_since(counted.next_run)
        )
    ).scalar()
    if earliest is None:
        return counted.day
    return min(counted.day, local_day(earliest, zone))


def _any_running(connection: Connection) -> bool:
    running = select(sync_runs.c.id).where(sync_runs.c.outcome == "running")
    return connection.execute(running.limit(1)).first() is not None


def _next_unfinished_run(connection: Connection) -> int:
    """The first run whose changes the next refresh must look at again."""
    running = connection.execute(
        select(func.min(sync_runs.c.id)).where(sync_runs.c.outcome == "running")
    ).scalar()
    if running is not None:
        return int(running)
    newest = connection.execute(select(func.max(sync_runs.c.id))).scalar()
    return int(newest or 0) + 1


def _counts_at_end_of(connection: Connection, day: date) -> Counter[Key]:
    rollup = daily_status_rollup.c
    query = select(rollup.user_id, rollup.sub_user_id, rollup.status, rollup.tasks)
    counts: Counter[Key] = Counter()
    for row in connection.execute(query.where(rollup.day == day)):
        counts[(row.user_id, row.sub_user_id, row.status)] = row.tasks
    return counts


def _changes_by_day(
    connection: Connection,
    zone: ZoneInfo,
    first_day: date,
    last_day: date,
    since_run: int,
) -> dict[date, Counter[Key]]:
    """Per day, how each count moved: -1 for a status left, +1 for one
    entered, by the changes of run `since_run` and later ones.

    The database counts the changes of each day: reading them one by one
    into Python cost a second per 100,000, which a first sync observes in
    one day.
    """
    change = task_status_changes.c
    tasks = tasks_table.c
    grouped = (tasks.user_id, tasks.sub_user_id, change.event)
    statuses = (change.old_status, change.new_status)
    query = (
        select(*grouped, *statuses, func.count().label("changes"))
        .join_from(task_status_changes, tasks_table, tasks.uuid == change.task_uuid)
        .group_by(*grouped, *statuses)
    )
    if since_run:
        query = query.where(_of_runs_since(since_run))
    moves: dict[date, Counter[Key]] = {}
    day = first_day
    while day <= last_day:
        begins, ends = (
            start_of_day(day, zone),
            start_of_day(day + timedelta(days=1), zone),
        )
        day_query = query.where(change.observed_at >= begins, change.observed_at < ends)
        day_moves = moves.setdefault(day, Counter())
        for row in connection.execute(day_query):
            account = (row.user_id, row.sub_user_id)
            if row.event in ("changed", "removed"):
                day_moves[(*account, row.old_status)] -= row.changes
            if row.event in ("first_seen", "changed", "restored"):
                day_moves[(*account, row.new_status)] += row.changes
        day += timedelta(days=1)
    return moves


def _of_runs_since(first_run: int) -> ColumnElement[bool]:
    """The changes of run `first_run` and later ones.

    Asked as `run_id >= first_run`, SQLite took the index on `observed_at`
    instead of the one on `(run_id, observed_at)`, and read every change of
    the day, or for the earliest change, of the whole history. Asked as the
    runs' ids, it looks each run up in the index.
    """
    later = select(sync_runs.c.id).where(sync_runs.c.id >= first_run)
    return task_status_changes.c.run_id.in_(later)


def _write_days(
    connection: Connection,
    counts: Counter[Key],
    moves: dict[date, Counter[Key]],
    first_day: date,
    last_day: date,
) -> int:
    written = 0
    for chunk in _chunks(_day_rows(counts, moves, first_day, last_day)):
        connection.execute(insert(daily_status_rollup), chunk)
        written += len(chunk)
    return written


def _day_rows(
    counts: Counter[Key],
    moves: dict[date, Counter[Key]],
    first_day: date,
    last_day: date,
) -> Iterator[dict[str, Any]]:
    # Every day gets rows, changes or not: a chart of the view has no gaps.
    day = first_day
    while day <= last_day:
        counts.update(moves.get(day, Counter()))
        for (user_id, sub_user_id, status), tasks in sorted(
            counts.items(), key=_sort_key
        ):
            if tasks:
                yield {
                    "day": day,
                    "user_id": user_id,
                    "sub_user_id": sub_user_id,
                    "status": status,
                    "tasks": tasks,
                }
        day += timedelta(days=1)


def _sort_key(item: tuple[Key, int]) -> tuple[str, str, int]:
    (user_id, sub_user_id, status), _ = item
    return (user_id, sub_user_id, -1 if status is None else status)


def _chunks(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == _INSERT_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_settings(
    connection: Connection, values: dict[str, str], now: datetime
) -> None:
    connection.execute(delete(settings).where(settings.c.key.in_(list(values))))
    connection.execute(
        insert(settings),
        [
            {"key": key, "value": value, "updated_at": now}
            for key, value in values.items()
        ],
    )
