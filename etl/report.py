"""Plain-text descriptions of runs and of the database, for the terminal.

Everything shown comes from our own columns and messages, which never hold
a token or a callback URL.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TextIO

from sqlalchemy import Engine, func, select

from etl import runs
from etl.backfill import ReplaySummary
from etl.models import accounts
from etl.sync import Progress, RunSummary

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"\s*(\d+)\s*([smhd])\s*", re.IGNORECASE)
# Redrawing more often than this only costs the terminal time.
PROGRESS_INTERVAL = 0.2
# How many stale accounts `status --max-age` names; it counts them all.
STALE_SHOWN = 3


def describe_run(summary: RunSummary) -> str:
    counts = summary.counts
    lines = [
        f"Run {summary.run_id} ({summary.kind}) {summary.outcome} in "
        f"{summary.seconds:.1f} s: {summary.accounts} accounts "
        f"({summary.accounts_failed} failed), {summary.pages} pages.",
        f"Tasks: {counts.seen} seen, {counts.new} new, {counts.changed} changed, "
        f"{counts.removed} removed, {counts.restored} restored; "
        f"{counts.status_changes} status changes; {counts.rejected} rejected items; "
        f"{counts.bad_values} unreadable values stored as NULL.",
    ]
    if summary.accounts_skipped == 1:
        lines.append(
            "Skipped: 1 account, whose lock another run held (the warnings name it)."
        )
    elif summary.accounts_skipped:
        lines.append(
            f"Skipped: {summary.accounts_skipped} accounts, whose lock another run "
            "held (the warnings name them)."
        )
    lines.extend(f"Failed: {error}" for error in summary.errors)
    return "\n".join(lines)


def describe_replay(summary: ReplaySummary) -> str:
    replayed = f"{summary.walks} walks replayed"
    if summary.run.outcome == "stopped":
        replayed = (
            f"stopped after {summary.ended} of {summary.walks} walks (replaying "
            "again goes on from there)"
        )
    walks = (
        f"Archive: {replayed}, {summary.skipped} skipped as no newer than the database"
    )
    if summary.unfinished:
        walks += f", {summary.unfinished} unfinished (stored without removals)"
    return f"{describe_run(summary.run)}\n{walks}."


def describe_progress(progress: Progress) -> str:
    return (
        f"{progress.done}/{progress.total} {progress.unit} done, "
        f"{progress.pages} pages, {progress.tasks} tasks"
    )


def describe_status(
    engine: Engine, limit: int = 10, now: datetime | None = None
) -> str:
    """Recent runs, each account's last sync, and the age of the last good one."""
    now = now or runs.now()
    lines = ["Recent runs:"]
    for run in runs.latest_runs(engine, limit):
        lines.append(_describe_run_row(run))
    if len(lines) == 1:
        lines.append("  none yet")

    lines.append("Accounts:")
    with engine.connect() as connection:
        rows = (
            connection.execute(
                select(accounts).order_by(accounts.c.user_id, accounts.c.sub_user_id)
            )
            .mappings()
            .all()
        )
    width = max((len(_label(row)) for row in rows), default=0)
    lines.extend(_describe_account_row(row, width, now) for row in rows)
    if not rows:
        lines.append("  none yet")

    newest = newest_success(engine)
    lines.append(f"Last good sync: {_when(newest)}{_ago(newest, now)}")
    return "\n".join(lines)


def _describe_run_row(run: dict[str, Any]) -> str:
    line = (
        f"  #{run['id']} {run['kind']:<8} {_when(run['started_at'])}  "
        f"{run['outcome']:<10} {run['accounts']} accounts "
        f"({run['accounts_failed']} failed), {run['pages']} pages, "
        f"{run['tasks_seen']} seen, {run['tasks_new']} new, "
        f"{run['tasks_changed']} changed, {run['tasks_removed']} removed"
    )
    # Only the next run marks a dead one abandoned: until then a killed run
    # would read as still going. Another host's processes cannot be seen.
    gone = run["host"] == socket.gethostname() and not runs.is_alive(run["pid"])
    if run["outcome"] == "running" and gone:
        line += "; its process is gone, and the next run marks it abandoned"
    return line


def _label(row: Any) -> str:
    sub_user_id: str = row["sub_user_id"]
    return f"{row['user_id']}:{sub_user_id}" if sub_user_id else str(row["user_id"])


def _describe_account_row(row: Any, width: int, now: datetime) -> str:
    state = row["last_outcome"] or "never synced"
    success, complete = row["last_success_at"], row["last_complete_at"]
    # Only a complete walk marks removals: an account whose walks succeed
    # but never complete keeps tasks listed that the platform dropped.
    line = (
        f"  {_label(row):<{width}}  {state:<12} last success "
        f"{_when(success)}{_ago(success, now)}, last complete walk "
        f"{_when(complete)}{_ago(complete, now)}"
    )
    if row["last_error"]:
        line += f"\n      last error: {row['last_error']}"
    return line


def newest_success(engine: Engine) -> datetime | None:
    """When an account's walk last succeeded, of all accounts."""
    with engine.connect() as connection:
        value: datetime | None = connection.execute(
            select(func.max(accounts.c.last_success_at))
        ).scalar()
    return value


@dataclass(frozen=True)
class Freshness:
    """What `check_freshness` holds every account's last moment of to an age."""

    column: str
    option: str
    what: str
    never: str


GOOD_SYNC = Freshness(
    "last_success_at",
    "--max-age",
    "good sync",
    "no account has ever synced successfully",
)
# Only a complete walk settles removals: an account whose walks succeed but
# never complete keeps listing tasks that the platform dropped.
COMPLETE_WALK = Freshness(
    "last_complete_at",
    "--max-complete-age",
    "complete walk",
    "no account has ever had a complete walk",
)


def check_freshness(
    engine: Engine,
    max_age: timedelta,
    now: datetime | None = None,
    main_user_ids: Collection[str] | None = None,
    freshness: Freshness = GOOD_SYNC,
) -> str | None:
    """Why some account has no good sync (or `freshness`'s other moment)
    within `max_age`; None when all do.

    Every account counts, not only the newest success: an account failing
    for ever must not hide behind the others. `main_user_ids`, the
    configured main accounts, leaves out the rows of main accounts no
    longer configured, and a configured one with no row counts as never
    synced.
    """
    moments = _last_moments(engine, main_user_ids, freshness.column)
    if all(moment is None for moment in moments.values()):
        return freshness.never
    now = now or runs.now()
    stale = [
        (label, moment)
        for label, moment in moments.items()
        if moment is None or now - moment > max_age
    ]
    if not stale:
        return None
    # The never synced first, then the oldest: the ones to look at first.
    stale.sort(key=lambda item: (item[1] is not None, item[1] or now, item[0]))
    shown = ", ".join(
        f"{label} ({_last_moment(moment, now)})"
        for label, moment in stale[:STALE_SHOWN]
    )
    more = f" and {len(stale) - STALE_SHOWN} more" if len(stale) > STALE_SHOWN else ""
    return (
        f"{len(stale)} of {len(moments)} accounts had no {freshness.what} within "
        f"{freshness.option} {describe_age(max_age)}: {shown}{more}"
    )


def _last_moment(moment: datetime | None, now: datetime) -> str:
    return f"last {describe_age(now - moment)} ago" if moment else "never"


def _last_moments(
    engine: Engine, main_user_ids: Collection[str] | None, column: str
) -> dict[str, datetime | None]:
    """Each account's moment in `column` by label, of the given main accounts."""
    query = select(accounts).order_by(accounts.c.user_id, accounts.c.sub_user_id)
    if main_user_ids is not None:
        query = query.where(accounts.c.user_id.in_(main_user_ids))
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    moments = {_label(row): row[column] for row in rows}
    known = {row["user_id"] for row in rows}
    for user_id in main_user_ids or ():
        if user_id not in known:
            moments[user_id] = None
    return moments


def parse_duration(text: str) -> timedelta:
    """A duration such as 90s, 30m, 2h or 1d; raise ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: give a number and a unit, s, m, h or d "
            "(90s, 30m, 2h, 1d)"
        )
    number, unit = match.groups()
    try:
        return timedelta(seconds=int(number) * DURATION_UNITS[unit.lower()])
    except OverflowError:
        raise ValueError(f"{text!r} is longer than any duration can be") from None


def describe_age(age: timedelta) -> str:
    """An age to the two largest units that matter: 45 s, 3 h 20 min, 2 d 4 h."""
    seconds = max(0, int(age.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {seconds} s" if seconds else f"{minutes} min"
    return f"{seconds} s"


class ProgressLine:
    """One line of progress redrawn in place, on a terminal only.

    On anything else (a file, a pipe, cron's mail) it writes nothing at all,
    so logs and captured output stay clean. Use it as a context manager: the
    line is ended when the work is, and while it is shown a log record first
    clears it, to be drawn again on the next update.
    """

    def __init__(
        self, stream: TextIO, label: str, interval: float = PROGRESS_INTERVAL
    ) -> None:
        self._stream = stream
        self._label = label
        self._interval = interval
        self._is_terminal = stream.isatty()
        self._lock = threading.RLock()
        self._drawn_at = -math.inf
        self._is_visible = False
        self._text = ""

    def __call__(self, progress: Progress) -> None:
        if not self._is_terminal:
            return
        with self._lock:
            self._text = f"{self._label}: {describe_progress(progress)}"
            moment = time.monotonic()
            if not self._is_visible or moment - self._drawn_at >= self._interval:
                self._drawn_at = moment
                self._draw()

    def __enter__(self) -> ProgressLine:
        if self._is_terminal:
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._clear)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if not self._is_terminal:
            return
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._clear)
        with self._lock:
            if self._text:
                self._draw()
                self._stream.write("\n")
                self._stream.flush()

    def _draw(self) -> None:
        # \r goes back to the start of the line and ESC [K clears the rest.
        self._stream.write(f"\r\x1b[K{self._text}")
        self._stream.flush()
        self._is_visible = True

    def _clear(self, record: logging.LogRecord) -> bool:
        with self._lock:
            if self._is_visible:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
                self._is_visible = False
        return True


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"


def _ago(moment: datetime | None, now: datetime) -> str:
    return f" ({describe_age(now - moment)} ago)" if moment else ""
