"""Bookkeeping of runs and accounts: what ran, when, and how it ended."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict
from typing import Any
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, Engine, func, select, update

from etl.accounts import Account
from etl.models import accounts, sync_runs
from etl.store import PageCounts, _insert_statement

log = logging.getLogger(__name__)

OUTCOMES = ("running", "succeeded", "partial", "failed", "stopped", "abandoned")


def now() -> datetime:
    return datetime.now(UTC)


def start_run(engine: Engine, kind: str) -> int:
    """Record a new run as running, after abandoning crashed ones."""
    abandon_dead_runs(engine)
    with engine.begin() as connection:
        result = connection.execute(
            sync_runs.insert().values(
                kind=kind,
                started_at=now(),
                outcome="running",
                host=socket.gethostname(),
                pid=os.getpid(),
            )
        )
        (run_id,) = result.inserted_primary_key or (None,)
    if run_id is None:
        raise RuntimeError("the database did not return the new run's id")
    log.info("run %s (%s) started", run_id, kind)
    return int(run_id)


def abandon_dead_runs(engine: Engine) -> int:
    """Mark abandoned the runs left `running` by a process of this host that
    is gone: it crashed or was killed, and its run will never be finished."""
    host = socket.gethostname()
    with engine.begin() as connection:
        running = connection.execute(
            select(sync_runs.c.id, sync_runs.c.pid).where(
                sync_runs.c.outcome == "running", sync_runs.c.host == host
            )
        ).all()
        dead = [row.id for row in running if not _is_alive(row.pid)]
        if dead:
            connection.execute(
                update(sync_runs)
                .where(sync_runs.c.id.in_(dead))
                .values(outcome="abandoned", finished_at=now())
            )
    for run_id in dead:
        log.warning(
            "run %s was left running by a process that is gone: abandoned", run_id
        )
    return len(dead)


def _is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finish_run(
    engine: Engine,
    run_id: int,
    outcome: str,
    counts: PageCounts,
    *,
    accounts_total: int,
    accounts_failed: int,
    pages: int,
    errors: list[str],
) -> datetime:
    finished = now()
    values = asdict(counts)
    values.pop("seen")
    with engine.begin() as connection:
        connection.execute(
            update(sync_runs)
            .where(sync_runs.c.id == run_id)
            .values(
                outcome=outcome,
                finished_at=finished,
                accounts=accounts_total,
                accounts_failed=accounts_failed,
                pages=pages,
                tasks_seen=counts.seen,
                tasks_new=values["new"],
                tasks_changed=values["changed"],
                tasks_removed=values["removed"],
                tasks_restored=values["restored"],
                status_changes=values["status_changes"],
                rejected=values["rejected"],
                bad_values=values["bad_values"],
                error="\n".join(errors) or None,
            )
        )
    return finished


def register_accounts(engine: Engine, found: list[Account]) -> None:
    """Add accounts not known yet; keep names current."""
    if not found:
        return
    rows = [
        {
            "user_id": account.user_id,
            "sub_user_id": account.sub_user_id,
            "name": account.name,
            "origin": account.origin,
            "first_seen_at": now(),
        }
        for account in found
    ]
    with engine.begin() as connection:
        statement = _insert_statement(connection, accounts)
        statement = statement.on_conflict_do_update(
            index_elements=[accounts.c.user_id, accounts.c.sub_user_id],
            set_={"name": statement.excluded.name},
            where=accounts.c.name.is_distinct_from(statement.excluded.name),
        )
        connection.execute(statement, rows)


def previous_complete(engine: Engine, account: Account) -> datetime | None:
    """When a complete walk of this account last ended, if ever."""
    with engine.connect() as connection:
        value = connection.execute(
            select(accounts.c.last_complete_at).where(*_key(account))
        ).scalar()
    return value


def record_account(
    engine: Engine,
    account: Account,
    run_id: int,
    *,
    started: datetime,
    outcome: str,
    error: str | None,
    complete: bool,
) -> None:
    finished = now()
    values: dict[str, object] = {
        "last_sync_at": started,
        "last_outcome": outcome,
        "last_error": error,
        "last_run_id": run_id,
    }
    if outcome == "succeeded":
        values["last_success_at"] = finished
    if complete:
        # The walk's start, not its end: every task it listed was observed
        # at or after this moment, never before.
        values["last_complete_at"] = started
    with engine.begin() as connection:
        connection.execute(update(accounts).where(*_key(account)).values(**values))


def _key(account: Account) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return (
        accounts.c.user_id == account.user_id,
        accounts.c.sub_user_id == account.sub_user_id,
    )


def latest_runs(engine: Engine, limit: int = 10) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(sync_runs).order_by(sync_runs.c.id.desc()).limit(limit)
        ).mappings()
        return [dict(row) for row in rows]


def count_runs(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(sync_runs)).scalar_one()
        )
