"""Bookkeeping of runs and accounts: what ran, when, and how it ended."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, func, select, update

from etl import store
from etl.accounts import Account
from etl.errors import RunAbandoned
from etl.models import accounts, sync_run_accounts, sync_runs
from etl.store import PageCounts, _insert_statement

log = logging.getLogger(__name__)

OUTCOMES = ("running", "succeeded", "partial", "failed", "stopped", "abandoned")
# On PostgreSQL a run begins holding this lock shared and a refresh of the
# daily counts holds it alone, so that no run begins while one counts. Any
# constant will do, as long as nothing else in the database takes it.
ROLLUP_LOCK = 0x7461736B_726F6C6C  # "taskroll"


def now() -> datetime:
    return datetime.now(UTC)


def start_run(engine: Engine, kind: str, *, lease: float = 60.0) -> int:
    """Record a new run as running, after abandoning crashed ones."""
    abandon_dead_runs(engine, lease)
    started = now()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            store.take_lock_shared(connection, ROLLUP_LOCK)
        result = connection.execute(
            sync_runs.insert().values(
                kind=kind,
                started_at=started,
                heartbeat_at=started,
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


def abandon_dead_runs(engine: Engine, lease: float = 60.0) -> int:
    """Mark abandoned the runs left `running` by a process that is gone: it
    crashed or was killed, and its run will never be finished. On this host
    its pid tells; on any host, so does a heartbeat older than the lease."""
    host = socket.gethostname()
    silent_since = now() - timedelta(seconds=lease)
    abandoned = []
    with engine.begin() as connection:
        running = connection.execute(
            select(
                sync_runs.c.id,
                sync_runs.c.host,
                sync_runs.c.pid,
                sync_runs.c.started_at,
                sync_runs.c.heartbeat_at,
            ).where(sync_runs.c.outcome == "running")
        ).all()
        gone = {row.id for row in running if row.host == host and not is_alive(row.pid)}
        dead = [
            row
            for row in running
            if row.id in gone or (row.heartbeat_at or row.started_at) < silent_since
        ]
        for row in dead:
            result = connection.execute(
                update(sync_runs)
                # Only as read: on PostgreSQL a beat committed meanwhile, by
                # a process that woke, holds this update back until it
                # commits, and then keeps the run running (see `RunGuard`).
                .where(
                    sync_runs.c.id == row.id,
                    sync_runs.c.outcome == "running",
                    _beat_is(row.heartbeat_at),
                )
                .values(
                    outcome="abandoned",
                    finished_at=now(),
                    accounts=_walks_finished(connection, row.id),
                )
            )
            if result.rowcount:
                abandoned.append(row.id)
    for run_id in abandoned:
        why = f"with no heartbeat for longer than the lease ({lease:g} s)"
        if run_id in gone:
            why = "by a process that is gone"
        log.warning("run %s was left running %s: abandoned", run_id, why)
    return len(abandoned)


def start_guarded_run(engine: Engine, kind: str, *, lease: float) -> RunGuard:
    """Record a new run as `start_run` does; the guard of its writes."""
    proved = (time.monotonic(), now())
    run_id = start_run(engine, kind, lease=lease)
    return RunGuard(run_id, lease, proved=proved)


def abandoned_error(run_id: int, lease: float | None = None) -> RunAbandoned:
    lasted = "the lease"
    if lease is not None:
        lasted = f"locks.lease ({lease:g} s)"
    return RunAbandoned(
        f"run {run_id} was marked abandoned by another run, its heartbeat being"
        f" older than {lasted}: its process was paused or hung, or could not write"
        " to the database for that long. It stopped and wrote nothing more; a"
        " later run syncs its accounts"
    )


class RunGuard:
    """Keeps a run from writing once another run has marked it abandoned.

    The next run to start marks abandoned a run whose heartbeat is older
    than the lease (`abandon_dead_runs`), as its process looks gone. But a
    process only paused (stopped by a signal, a frozen virtual machine)
    wakes and goes on: its writes would land unseen by the runs that took
    it for dead, such as a refresh of the daily counts that counted the day
    whole, and its end would overwrite its outcome. So each of its writes
    confirms, in the write's own transaction, that it is still running.
    """

    def __init__(
        self, run_id: int, lease: float, *, proved: tuple[float, datetime] | None
    ) -> None:
        self.run_id = run_id
        self.lease = lease
        self.abandoned = False
        # When the run last showed itself alive, by both clocks, never later
        # than the heartbeat stored then; if not known, the first write asks.
        self._proved = proved or (-math.inf, datetime.min.replace(tzinfo=UTC))

    def beat(self, engine: Engine) -> None:
        """Show that the run is alive; `RunAbandoned` if it was marked abandoned."""
        proof = (time.monotonic(), now())
        with engine.begin() as connection:
            self._beat_in(connection, proof[1])
        self._proved = proof

    def confirm(self, connection: Connection) -> None:
        """Raise `RunAbandoned` if the run was marked abandoned, rolling back
        the write of `connection`'s transaction; called last before its commit.

        It asks the database only when the run's last beat is older than
        half the lease, so that a healthy run, whose heartbeat keeps that
        beat recent, writes a page with no statement more. Another run
        abandons this one only once the beat is older than the whole lease,
        by that run's clock: the half left over is for the hosts' clocks to
        differ and for this commit to be made.
        """
        self.check()
        mono, wall = self._proved
        half = self.lease / 2
        if time.monotonic() - mono < half and now() - wall < timedelta(seconds=half):
            return
        self._beat_in(connection, now())

    def check(self) -> None:
        """Raise `RunAbandoned` if a write or a beat found the run abandoned."""
        if self.abandoned:
            raise self._error()

    def _error(self) -> RunAbandoned:
        return abandoned_error(self.run_id, self.lease)

    def _beat_in(self, connection: Connection, moment: datetime) -> None:
        # On PostgreSQL the row stays locked until the commit: a run
        # abandoning this one waits for it, then finds the beat.
        result = connection.execute(
            update(sync_runs)
            .where(sync_runs.c.id == self.run_id, sync_runs.c.outcome == "running")
            .values(heartbeat_at=moment)
        )
        if result.rowcount == 0:
            self.abandoned = True
            raise self._error()


def _beat_is(moment: datetime | None) -> ColumnElement[bool]:
    beat = sync_runs.c.heartbeat_at
    return beat.is_(None) if moment is None else beat == moment


def _walks_finished(connection: Connection, run_id: int) -> int:
    """How many walks a run finished, each of which left a row.

    A dead run's row holds the counts of every page it committed, added as
    each committed (see `store.PageWriter`); its accounts are counted only
    when it ends, so for a dead one the walks it finished stand in.
    """
    return int(
        connection.execute(
            select(func.count()).where(sync_run_accounts.c.run_id == run_id)
        ).scalar_one()
    )


def is_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (a reused pid counts)."""
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
    accounts_skipped: int = 0,
) -> datetime:
    """Record how the run ended; `RunAbandoned` if another run had marked it
    abandoned, whose record stands."""
    finished = now()
    with engine.begin() as connection:
        result = connection.execute(
            update(sync_runs)
            .where(sync_runs.c.id == run_id, sync_runs.c.outcome == "running")
            .values(
                outcome=outcome,
                finished_at=finished,
                accounts=accounts_total,
                accounts_failed=accounts_failed,
                accounts_skipped=accounts_skipped,
                pages=pages,
                **counts.run_columns(),
                error="\n".join(errors) or None,
            )
        )
    if result.rowcount == 0:
        raise abandoned_error(run_id)
    return finished


def record_walk(
    engine: Engine,
    run_id: int,
    account: Account,
    *,
    outcome: str,
    started: datetime,
    pages: int = 0,
    tasks_seen: int = 0,
    error: str | None = None,
    guard: RunGuard | None = None,
) -> None:
    """One row of `sync_run_accounts`: what a run did with one account."""
    with engine.begin() as connection:
        connection.execute(
            sync_run_accounts.insert().values(
                run_id=run_id,
                user_id=account.user_id,
                sub_user_id=account.sub_user_id,
                outcome=outcome,
                started_at=started,
                finished_at=now(),
                pages=pages,
                tasks_seen=tasks_seen,
                error=error,
            )
        )
        if guard is not None:
            guard.confirm(connection)


def register_accounts(
    engine: Engine,
    found: list[Account],
    *,
    seen_at: datetime | None = None,
    guard: RunGuard | None = None,
) -> None:
    """Add accounts not known yet; keep names current."""
    if not found:
        return
    rows = [
        {
            "user_id": account.user_id,
            "sub_user_id": account.sub_user_id,
            "name": account.name,
            "origin": account.origin,
            "first_seen_at": seen_at or now(),
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
        if guard is not None:
            guard.confirm(connection)


def known_sub_accounts(engine: Engine, user_id: str) -> list[Account]:
    """The sub-accounts of a main account that earlier runs discovered."""
    query = (
        select(accounts.c.sub_user_id, accounts.c.name)
        .where(
            accounts.c.user_id == user_id,
            accounts.c.sub_user_id != "",
            accounts.c.origin == "discovered",
        )
        .order_by(accounts.c.sub_user_id)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        Account(user_id, row.sub_user_id, row.name, origin="discovered") for row in rows
    ]


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
    finished: datetime | None = None,
    guard: RunGuard | None = None,
) -> None:
    finished = finished or now()
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
        if guard is not None:
            guard.confirm(connection)


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
