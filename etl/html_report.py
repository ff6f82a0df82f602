"""`task-etl report`: tasks per status per account, and what changed in a
period, as text for the terminal and as one self-contained HTML page.

Everything is read through the BI views, so the report shows what a BI tool
would. Days are counted in the platform's time zone (`api.timezone`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from html import escape
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, Engine, func, or_, select

from etl import charts, runs, store
from etl.charts import Series
from etl.config import Config
from etl.errors import EtlError
from etl.models import task_status_changes
from etl.parse import STATUS_LABELS
from etl.views import current_tasks, daily_status_counts, task_status_periods

log = logging.getLogger(__name__)

DEFAULT_DAYS = 7
LABELS = (*STATUS_LABELS.values(), "unknown")
EVENTS = ("changed", "first_seen", "removed", "restored")


@dataclass(frozen=True)
class AccountRow:
    label: str
    counts: tuple[int, ...]  # in the order of LABELS


@dataclass(frozen=True)
class Report:
    since: datetime
    until: datetime
    zone: ZoneInfo
    accounts: tuple[AccountRow, ...]
    events: tuple[tuple[str, int], ...]
    transitions: tuple[tuple[str, str, int], ...]
    days: tuple[date, ...]
    daily: tuple[Series, ...]
    hours: tuple[tuple[str, float], ...]


def run_report(
    config: Config,
    *,
    days: int | None = None,
    since: datetime | None = None,
    html_path: Path | None = None,
) -> str:
    """The text summary; with `html_path`, the HTML page written there too."""
    engine = store.connect(config.database)
    store.check_schema(engine)
    until = runs.now()
    start = since or until - timedelta(days=days or DEFAULT_DAYS)
    report = build_report(engine, config.api.zone, start, until)
    engine.dispose()
    if html_path is not None:
        write_html(report, html_path)
    return describe(report)


def build_report(
    engine: Engine, zone: ZoneInfo, since: datetime, until: datetime
) -> Report:
    with engine.connect() as connection:
        accounts = _accounts_now(connection)
        events, transitions = _changes(connection, since, until)
        days, daily = _daily(connection, zone, since, until)
        hours = _hours_per_status(connection, since, until)
    return Report(since, until, zone, accounts, events, transitions, days, daily, hours)


def _accounts_now(connection: Connection) -> tuple[AccountRow, ...]:
    c = current_tasks.c
    query = (
        select(c.user_id, c.sub_user_id, c.account_name, c.status_label, func.count())
        .where(c.is_listed)
        .group_by(c.user_id, c.sub_user_id, c.account_name, c.status_label)
    )
    found: dict[str, Counter[str]] = {}
    for user_id, sub_user_id, name, label, count in connection.execute(query):
        account = user_id + (f":{sub_user_id}" if sub_user_id else "")
        key = f"{account} {name}".strip() if name else account
        found.setdefault(key, Counter())[label] = count
    return tuple(
        AccountRow(key, tuple(counts[label] for label in LABELS))
        for key, counts in sorted(found.items())
    )


def _changes(
    connection: Connection, since: datetime, until: datetime
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str, int], ...]]:
    c = task_status_changes.c
    query = (
        select(c.event, c.old_status, c.new_status, func.count())
        .where(c.observed_at >= since, c.observed_at < until)
        .group_by(c.event, c.old_status, c.new_status)
    )
    events: Counter[str] = Counter()
    moves: Counter[tuple[str, str]] = Counter()
    for event, old, new, count in connection.execute(query):
        events[event] += count
        if event == "changed":
            moves[(_label(old), _label(new))] += count
    ordered = tuple((event, events[event]) for event in EVENTS)
    transitions = tuple(
        (old, new, count) for (old, new), count in sorted(moves.items())
    )
    return ordered, transitions


def _label(status: int | None) -> str:
    return STATUS_LABELS.get(status, "unknown") if status is not None else "unknown"


def _daily(
    connection: Connection, zone: ZoneInfo, since: datetime, until: datetime
) -> tuple[tuple[date, ...], tuple[Series, ...]]:
    first, last = since.astimezone(zone).date(), until.astimezone(zone).date()
    d = daily_status_counts.c
    query = (
        select(d.day, d.status_label, func.sum(d.tasks))
        .where(d.day >= first, d.day <= last)
        .group_by(d.day, d.status_label)
    )
    counts = {
        (day, label): int(total) for day, label, total in connection.execute(query)
    }
    # Before its first counted day the history says nothing, not zero.
    first = min((day for day, _ in counts), default=last)
    days = tuple(first + timedelta(days=n) for n in range((last - first).days + 1))
    shown = [label for label in LABELS if label != "unknown"]
    if any(label == "unknown" for _, label in counts):
        shown.append("unknown")
    series = tuple(
        Series(label, tuple(float(counts.get((day, label), 0)) for day in days))
        for label in shown
    )
    return days, series


def _hours_per_status(
    connection: Connection, since: datetime, until: datetime
) -> tuple[tuple[str, float], ...]:
    """Task-hours spent in each status within the period."""
    p = task_status_periods.c
    query = select(p.status_label, p.started_at, p.ended_at).where(
        or_(p.ended_at.is_(None), p.ended_at > since), p.started_at < until
    )
    seconds: Counter[str] = Counter()
    for label, started, ended in connection.execute(query):
        begin, end = max(started, since), min(ended or until, until)
        if end > begin:
            seconds[label] += (end - begin).total_seconds()
    return tuple((label, seconds[label] / 3600) for label in LABELS if seconds[label])


def describe(report: Report) -> str:
    """The report as plain text, for the terminal."""
    lines = [f"Report for {_period(report)}.", "", "Tasks now, per account:"]
    width = max([len("all accounts"), *(len(row.label) for row in report.accounts)])
    header = "".join(f"{label:>9}" for label in LABELS)
    lines.append(f"  {'account':<{width}}{header}{'total':>9}")
    for row in report.accounts:
        lines.append(_count_line(row.label, row.counts, width))
    totals = [sum(row.counts[n] for row in report.accounts) for n in range(len(LABELS))]
    lines.append(_count_line("all accounts", tuple(totals), width))

    return "\n".join([*lines, "", *_describe_changes(report)])


def _describe_changes(report: Report) -> list[str]:
    events = dict(report.events)
    lines = [
        f"Changes in the period: {events['changed']} status changes, "
        f"{events['first_seen']} tasks first seen, {events['removed']} removed, "
        f"{events['restored']} restored."
    ]
    lines += [f"  {old} -> {new}: {n}" for old, new, n in report.transitions]
    hours = ", ".join(f"{label} {value:,.1f}" for label, value in report.hours)
    lines.append(f"Task-hours per status in the period: {hours or 'none'}.")
    return lines


def _count_line(label: str, counts: tuple[int, ...], width: int) -> str:
    cells = "".join(f"{count:>9}" for count in counts)
    return f"  {label:<{width}}{cells}{sum(counts):>9}"


def _period(report: Report) -> str:
    def local(moment: datetime) -> str:
        return moment.astimezone(report.zone).strftime("%Y-%m-%d %H:%M")

    return f"{local(report.since)} to {local(report.until)} ({report.zone.key})"


def to_html(report: Report) -> str:
    """The report as one HTML page that needs nothing but itself."""
    days = [day.strftime("%m-%d") for day in report.days]
    daily = charts.line_chart(
        "Tasks per status at the end of each day", days, report.daily
    )
    hours = charts.bar_chart("Task-hours per status", report.hours, "h")
    return _PAGE.format(
        period=escape(_period(report)),
        accounts=_accounts_table(report),
        daily=daily,
        hours=hours,
        changes=escape("\n".join(_describe_changes(report))),
    )


def _accounts_table(report: Report) -> str:
    head = "".join(f"<th>{label}</th>" for label in (*LABELS, "total"))
    rows = [
        f"<tr><td>{escape(row.label)}</td>"
        + "".join(f"<td>{n}</td>" for n in (*row.counts, sum(row.counts)))
        + "</tr>"
        for row in report.accounts
    ]
    return f"<table><tr><th>account</th>{head}</tr>{''.join(rows)}</table>"


def write_html(report: Report, path: Path) -> None:
    try:
        path.write_text(to_html(report), encoding="utf-8")
    except OSError as exc:
        raise EtlError(f"--html {path}: cannot write it: {exc.strerror}") from None
    log.info("report written to %s", path)


_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>task-etl report</title>
<style>
body {{ font-family: sans-serif; margin: 24px auto; max-width: 920px;
       color: #111827; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #e5e7eb; padding: 4px 10px;
          text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
pre {{ font-size: 13px; background: #f9fafb; padding: 10px; }}
svg {{ max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>Call tasks: {period}</h1>
<h2>Tasks per status at the end of each day</h2>
{daily}
<h2>Task-hours per status in the period</h2>
{hours}
<h2>Tasks now, per account</h2>
{accounts}
<h2>Changes in the period</h2>
<pre>{changes}</pre>
</body>
</html>
"""
