"""Plain-text descriptions of runs and of the database, for the terminal."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine, func, select

from etl import runs
from etl.models import accounts
from etl.sync import RunSummary


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
    lines.extend(f"Failed: {error}" for error in summary.errors)
    return "\n".join(lines)


def describe_status(engine: Engine, limit: int = 10) -> str:
    """Recent runs, each account's last sync, and the age of the last good one."""
    lines = ["Recent runs:"]
    for run in runs.latest_runs(engine, limit):
        lines.append(
            f"  #{run['id']} {run['kind']:<8} {_when(run['started_at'])}  "
            f"{run['outcome']:<10} {run['accounts']} accounts, {run['pages']} pages, "
            f"{run['tasks_new']} new, {run['tasks_changed']} changed, "
            f"{run['tasks_removed']} removed"
        )
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
        newest = connection.execute(
            select(func.max(accounts.c.last_success_at))
        ).scalar()
    for row in rows:
        label = row["user_id"] + (
            f":{row['sub_user_id']}" if row["sub_user_id"] else ""
        )
        state = row["last_outcome"] or "never synced"
        line = f"  {label:<40} {state:<10} last success {_when(row['last_success_at'])}"
        if row["last_error"]:
            line += f"\n      last error: {row['last_error']}"
        lines.append(line)
    age = f"{(runs.now() - newest).total_seconds():.0f} s ago" if newest else "never"
    lines.append(f"Last good sync: {age}")
    return "\n".join(lines)


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"
