"""Writing pages of task records, each whole in one transaction.

A transaction of one page, or of a few queued together, costs one read of
the stored state of their tasks, then set-based writes of only what
changed: an upsert of groups, an upsert of new and changed tasks, and one
insert of status changes. Unchanged tasks are not written at all, which is
what keeps a re-sync close to the cost of fetching.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import operator
import os
import sqlite3
import threading
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import islice
from time import monotonic
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Dialect,
    Engine,
    Insert,
    String,
    Table,
    case,
    column,
    create_engine,
    event,
    insert,
    inspect,
    literal,
    null,
    select,
    table,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from etl.accounts import Account
from etl.config import DatabaseConfig, database_url_problem
from etl.errors import LockTimeoutError, RunInterrupted, StoreError
from etl.models import groups, sync_rejects, sync_runs, task_status_changes, tasks
from etl.parse import (
    NAIVE_EPOCH,
    UTC_EPOCH,
    GroupRecord,
    ListedTask,
    TaskRecord,
    payload_json,
)

log = logging.getLogger(__name__)

# SQLite before 3.32 allowed 999 bound variables per statement; later 32766.
SQLITE_MAX_VARIABLES = 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999
POSTGRESQL_MAX_VARIABLES = 65535

# Rows up to which a multi-row statement takes exactly the rows it is given,
# and the most it takes (see `_statement_rows`).
EXACT_ROWS = 16
MAX_STATEMENT_ROWS = 256
# Rows fetched at a time when a query may return a whole account's tasks.
STREAMED_ROWS = 2000
# The most ids `SeenIds.unlisted` puts in a set: about 4 MB while it lasts.
# With 100,000, a re-sync of a million tasks in accounts of that size
# peaked at 98 MB; settled by bisection, such accounts make a re-sync up to
# 4 % slower and its peak 6-9 MB lower.
SET_LOOKUP_MOST = 50_000
# The fewest task rows a transaction stages for their upsert on PostgreSQL
# (see `_upsert_staged`). A re-sync writes a few rows a page, which the
# executemany sends in one round trip; staging them all made it 0-10 %
# slower than staging only the transactions of this many rows.
STAGED_LEAST = 50
# The temporary table that stages them.
STAGED_TASKS = "task_etl_staged"
# A task a complete walk missed, and no complete walk listed since (see
# `mark_removals`); built once, as the writer asks it of every page.
_IS_FLAGGED = tasks.c.unlisted_after.is_not(None)

# Seconds between two additions of a writer's page counts to its run's row:
# a run killed in between is left without the counts of that last stretch.
RUN_COUNTS_EVERY = 1.0
# How long SQLite waits for another writer before the wait comes back to
# Python for a moment (see `_begin_immediate`), and the key under which a
# connection in WAL mode keeps it.
BUSY_TURN_SECONDS = 0.1
_BUSY_TURN = "etl.busy_turn"
# PostgreSQL: the key under which a connection keeps its longest wait for a
# lock, and the advisory lock of the transactions that write tasks (see
# `_take_write_turn`); any constant will do, as long as nothing else in the
# database takes it.
_LOCK_WAIT = "etl.lock_wait"
_WRITERS_LOCK = 0x7461736B_77726974  # "taskwrit"
# The tables those transactions write.
_WRITTEN_TABLES = "tasks, task_status_changes, groups, sync_rejects, sync_runs"
# The execution option of a connection that only reads: on SQLite it then
# never waits for another process's writer (see `_tune_sqlite`).
_READS_ONLY = "etl_reads_only"
# Called last in each transaction that writes for a run, to roll it back by
# raising once the run may no longer write (see `runs.RunGuard.confirm`).
Confirm = Callable[[Connection], None]
# The event that ends this thread's waits for the lock (see `lock_waits_end_on`).
_lock_wait_ends_on: ContextVar[threading.Event | None] = ContextVar(
    "_lock_wait_ends_on", default=None
)


@dataclass(frozen=True)
class Reject:
    reason: str
    item: Any


@dataclass(slots=True)  # not frozen, for speed: see TaskRecord
class PreparedTask:
    """A parsed task with the values that depend on its item alone already
    in the driver's form.

    A fetching thread prepares the tasks of a first sync, which are all
    written: the single writer then only assembles rows, and the parsing
    runs while the writer waits on the database. The payload is in
    `values` alone: a record made from a listed item keeps none.
    """

    uuid: str
    content_hash: str
    record: TaskRecord = field(repr=False)
    values: dict[str, Any] = field(repr=False)

    def parsed(self) -> TaskRecord:
        return self.record


Listed = TaskRecord | ListedTask | PreparedTask


@dataclass(frozen=True)
class PageBatch:
    """One fetched page: what the store writes in one transaction.

    Its tasks may be parsed records, prepared tasks, or listed tasks, which
    the store parses only when it writes them.
    """

    account: Account
    endpoint: str
    number: int
    fetched_at: datetime
    records: Sequence[Listed]
    rejects: Sequence[Reject] = ()

    def prepared(self, dialect: str) -> PageBatch:
        """The page with every task parsed and prepared for `dialect`."""
        driver = _DriverValues(dialect)
        tasks = [_prepare(driver, task) for task in self.records]
        return replace(self, records=tasks)


@dataclass
class PageCounts:
    seen: int = 0
    new: int = 0
    changed: int = 0
    restored: int = 0
    removed: int = 0
    status_changes: int = 0
    rejected: int = 0
    bad_values: int = 0

    def add(self, other: PageCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def run_columns(self) -> dict[str, int]:
        """The counts by the `sync_runs` columns that hold them."""
        return {column: getattr(self, name) for name, column in RUN_COLUMNS.items()}


# The column of `sync_runs` that holds each count of `PageCounts`.
RUN_COLUMNS = {
    "seen": "tasks_seen",
    "new": "tasks_new",
    "changed": "tasks_changed",
    "restored": "tasks_restored",
    "removed": "tasks_removed",
    "status_changes": "status_changes",
    "rejected": "rejected",
    "bad_values": "bad_values",
}


@dataclass
class _Plan:
    """What one page will write, decided from the stored rows."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    written: list[TaskRecord] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    counts: PageCounts = field(default_factory=PageCounts)


def connect(database: DatabaseConfig, *, read_only: bool = False) -> Engine:
    """An engine for the configured database, tuned per dialect.

    On SQLite a `read_only` engine refuses writes and never takes the write
    lock, so that a command that only reads, such as `status` watching for
    stale syncs, answers while another process holds that lock."""
    problem = database_url_problem(database.url)
    if problem is not None:
        raise StoreError(f"{database.source}: {problem}")
    try:
        url = make_url(database.url)
        if url.drivername == "postgresql":
            # Before SQLAlchemy 2.1, a URL without a driver meant psycopg2.
            url = url.set(drivername="postgresql+psycopg")
        # Whatever PGCLIENTENCODING or the URL say: psycopg read the
        # server's version as bytes under SQL_ASCII, and a LATIN1
        # connection refused the platform's Chinese text.
        postgresql = url.drivername.startswith("postgresql")
        utf8 = {"client_encoding": "UTF8"} if postgresql else {}
        engine = create_engine(url, pool_pre_ping=True, connect_args=utf8)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise StoreError(f"{database.source}: cannot use it: {exc}") from None
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine, database.busy_timeout, read_only)
    elif engine.dialect.name == "postgresql":
        _tune_postgresql(engine, database)
    return engine


def _tune_sqlite(engine: Engine, busy_timeout: float, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        journal = cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        cursor.execute("PRAGMA synchronous = NORMAL")
        # In WAL mode only a checkpoint waits for the disk. SQLite's default
        # of one every 1,000 pages (4 MB) took a quarter of a first sync's
        # writing; every 10,000 copies each often-changed index page back
        # less often, for a WAL file of up to about 40 MB.
        cursor.execute("PRAGMA wal_autocheckpoint = 10000")
        cursor.execute("PRAGMA foreign_keys = ON")
        if read_only:
            cursor.execute("PRAGMA query_only = ON")
        elif journal == ("wal",):
            # Last: the switch to WAL above may wait the whole timeout. From
            # here the connection waits for another writer only to begin a
            # transaction, in turns (see `_begin_immediate`). Without WAL a
            # commit waits for readers too, and keeps the whole timeout.
            turn = max(0.001, min(BUSY_TURN_SECONDS, busy_timeout))
            cursor.execute(f"PRAGMA busy_timeout = {int(turn * 1000)}")
            record.info[_BUSY_TURN] = turn
        cursor.close()

    if read_only:
        # Each statement reads in a transaction of its own; in WAL mode no
        # writer holds a reader back.
        return

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get(_READS_ONLY):
            # Each statement reads in a transaction of its own, as above.
            return
        # A page reads before it writes; taking the write lock up front means
        # a second writer waits for the busy timeout instead of failing on
        # the upgrade from a read lock.
        _begin_immediate(connection, busy_timeout)


def _tune_postgresql(engine: Engine, database: DatabaseConfig) -> None:
    # First of the listeners: a database in another encoding is named here
    # before SQLAlchemy's own listeners trip over it.
    @event.listens_for(engine, "connect", insert=True)
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            encoding = cursor.execute("SHOW server_encoding").fetchone()[0]
            # PostgreSQL waits for a lock without end: a session holding one
            # on a table (a LOCK TABLE by hand, a long migration) hung a run.
            # No wait here is longer than SQLite's for another writer.
            wait = int(database.busy_timeout * 1000)
            cursor.execute(f"SET lock_timeout = {wait}")
        dbapi_connection.commit()
        _refuse_encoding(database, encoding)
        record.info[_LOCK_WAIT] = database.busy_timeout


def _refuse_encoding(database: DatabaseConfig, encoding: str) -> None:
    """Refuse a database that cannot hold any text the platform sends.

    A SQL_ASCII database stores bytes unchecked, and compares and cuts them
    as bytes; any other but UTF8 refuses most Chinese text, page after page.
    """
    if encoding != "UTF8":
        raise StoreError(
            f"{database.source}: the database's encoding is {encoding}; task-etl "
            "needs a database created with ENCODING 'UTF8'"
        )


def _begin_immediate(connection: Connection, busy_timeout: float) -> None:
    """Take SQLite's write lock, waiting up to `busy_timeout` for another
    writer in turns of `BUSY_TURN_SECONDS`.

    SQLite's own wait keeps the thread in C, and a signal's handler runs
    only in the main thread between two bytecodes: a stop, and the second
    signal that should exit at once, waited for the other writer or the
    whole timeout. Between turns the handler runs, and a wait inside
    `lock_waits_end_on` gives up when its event is set.

    A turn is the connection's own busy timeout, set when it connects: every
    transaction here begins by taking the lock, and in WAL mode nothing
    after that waits for it. Setting it around each BEGIN cost two more
    statements a page, each one more wait for Python's lock.
    """
    turn = connection.connection.info.get(_BUSY_TURN, busy_timeout)
    _in_turns(
        lambda: connection.exec_driver_sql("BEGIN IMMEDIATE"),
        _is_busy,
        busy_timeout,
        turn,
    )


def _take_write_turn(
    connection: Connection, then: tuple[str, tuple[Any, ...]] | None = None
) -> list[Any]:
    """PostgreSQL: begin a transaction that writes tasks by waiting for the
    other such transactions to end, in turns of `BUSY_TURN_SECONDS`; the
    rows of the query `then`, run in the same round trip.

    A page is planned from the stored state it reads. Two runs writing
    pages that list the same task at the same time (accounts that share
    tasks, a daemon and a backfill) both read it as not stored, and both
    wrote its `first_seen`. SQLite's writers take turns (see
    `_begin_immediate`); here an advisory lock makes them. Under READ
    COMMITTED each statement after it sees what the writer before committed.

    The tables are locked too, in the mode their writes take anyway, so that
    a lock another session holds on one is waited for here, where a stop
    ends the wait, and not inside a statement, where only the connection's
    `lock_timeout` does.

    The statements go in one query, bound by psycopg: each round trip is one
    more wait for Python's lock, and in a first sync a round trip of their
    own took 7 ms a transaction, 4 % of the run. Bound so, `then` is never
    a prepared statement, which psycopg makes of a query run five times,
    and for which PostgreSQL may keep one plan: made while a first sync's
    table was still nearly empty, the plan of the read of stored tasks
    scanned the whole table for every page after it, and a first sync took
    twice as long.
    """
    sql, parameters = then or ("SELECT 1", ())
    locks = (
        f"SELECT pg_advisory_xact_lock({_WRITERS_LOCK});"
        f" LOCK TABLE {_WRITTEN_TABLES} IN ROW EXCLUSIVE MODE"
    )
    return _locked_in_turns(connection, locks, sql, parameters)


def take_lock_shared(connection: Connection, key: int) -> None:
    """PostgreSQL: take advisory lock `key` shared until the transaction
    ends, waiting in turns like `_take_write_turn`, so that a stop ends the
    wait; nothing else may precede it in the transaction."""
    _locked_in_turns(
        connection, f"SELECT pg_advisory_xact_lock_shared({int(key)})", "SELECT 1", ()
    )


def _locked_in_turns(
    connection: Connection, locks: str, sql: str, parameters: tuple[Any, ...]
) -> list[Any]:
    """Run `locks`, then `sql` in the same round trip, waiting for the locks
    in turns of `BUSY_TURN_SECONDS`; the rows of `sql`."""
    wait = connection.connection.info.get(_LOCK_WAIT, BUSY_TURN_SECONDS)
    turn = min(BUSY_TURN_SECONDS, wait)
    take = (
        f"SET LOCAL lock_timeout = {int(turn * 1000)}; {locks};"
        f" SET LOCAL lock_timeout = {int(wait * 1000)}; {sql}"
    )
    # Imported here, as SQLAlchemy does: a process on SQLite never loads it.
    from psycopg import ClientCursor

    driver_connection: Any = connection.connection.driver_connection
    rows: list[Any] = []

    def attempt() -> None:
        try:
            with ClientCursor(driver_connection) as cursor:
                cursor.execute(take, parameters)
                while cursor.nextset():
                    pass
                rows.extend(cursor.fetchall())
        except Exception as exc:
            if _is_lock_timeout(exc):
                # Nothing was done but the wait: the next turn begins anew.
                driver_connection.rollback()
            raise

    _in_turns(attempt, _is_lock_timeout, wait, turn)
    return rows


def _in_turns(
    attempt: Callable[[], object],
    waited: Callable[[Exception], bool],
    wait: float,
    turn: float,
) -> None:
    """Call `attempt`, which waits up to `turn` seconds for a lock and fails
    as `waited` tells when it is still held, until it succeeds or `wait`
    seconds are over; between turns, raise `RunInterrupted` once this
    thread's `lock_waits_end_on` event is set."""
    ends = None  # known from the first turn that found the lock taken
    while True:
        try:
            attempt()
            return
        except Exception as exc:
            if not waited(exc):
                raise
            now = monotonic()
            ends = ends or now + wait - turn
            if now >= ends:
                raise
        _end_if_halted()


def _end_if_halted() -> None:
    """Raise `RunInterrupted` once this thread's `lock_waits_end_on` event
    is set."""
    halt = _lock_wait_ends_on.get()
    if halt is not None and halt.is_set():
        raise RunInterrupted("stopped while waiting for another writer")


@contextmanager
def lock_waits_end_on(halt: threading.Event) -> Iterator[None]:
    """Within: a wait for SQLite's write lock ends, raising `RunInterrupted`,
    once `halt` is set. Nothing is written by a transaction never begun."""
    waiting = _lock_wait_ends_on.set(halt)
    try:
        yield
    finally:
        _lock_wait_ends_on.reset(waiting)


def _is_lock_timeout(exc: Exception) -> bool:
    # psycopg's LockNotAvailable, told by its code so that psycopg need not
    # be imported.
    return getattr(exc, "sqlstate", None) == "55P03"


def is_lock_wait(exc: Exception) -> bool:
    """Whether `exc` ended a wait for another writer's lock that lasted the
    busy timeout, on either database, raised by SQLAlchemy or the driver."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return _is_busy(exc) or isinstance(orig, Exception) and _is_lock_timeout(orig)


def _is_busy(exc: Exception) -> bool:
    if not isinstance(exc, OperationalError):
        return False
    orig = exc.orig
    # The extended codes (SQLITE_BUSY_SNAPSHOT and others) keep the primary
    # code in their low byte.
    code = getattr(orig, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def write_page(
    engine: Engine,
    run_id: int,
    batch: PageBatch,
    previous_complete: datetime | None,
    *,
    confirm: Confirm | None = None,
) -> PageCounts:
    """Store one page in one transaction and say what changed."""
    with PageWriter(engine, confirm=confirm) as writer:
        return writer.write(run_id, batch, previous_complete)


class PageWriter:
    """Stores pages, each whole in one transaction, over one connection kept
    between them.

    Taking a pooled connection for each page (a ping before it, a rollback
    after it) cost a sixth of the writer's time. A page that fails drops
    the connection, so a broken one is replaced for the next page.
    """

    def __init__(self, engine: Engine, *, confirm: Confirm | None = None) -> None:
        self.engine = engine
        self._confirm = confirm
        self._connection: Connection | None = None
        # Whether its history rows go by COPY (see `_copy_stores_changes`).
        self._copies_changes = False
        # Whether its tasks may be staged (see `_upsert_staged`).
        self._stages_tasks = False
        # The name each script group was stored with by this writer: the
        # same few groups are on every page, and upserting them again each
        # time cost a tenth of a first sync's writing.
        self._groups: dict[str, str | None] = {}
        # Counts of committed pages not yet added to their run's row, and
        # when they last were (see `_add_to_run`): the first page adds them.
        self._unsaved: dict[int, tuple[PageCounts, int]] = {}
        self._saved_at = -math.inf

    def __enter__(self) -> PageWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            _release_writer_connection(connection)

    def write(
        self, run_id: int, batch: PageBatch, previous_complete: datetime | None
    ) -> PageCounts:
        """Store one page in one transaction and say what changed."""
        return self.write_together(run_id, [(batch, previous_complete)])[0]

    def write_together(
        self, run_id: int, pages: Sequence[tuple[PageBatch, datetime | None]]
    ) -> list[PageCounts]:
        """Store pages, each with its account's `previous_complete`, in one
        transaction, and say what each changed.

        Each page is planned against the rows stored before the transaction,
        so pages that share a task fail like a refused statement. Should the
        transaction fail, no page is written, and the error names the page
        only if it is alone.
        """
        listed = [_deduplicate(batch.records) for batch, _ in pages]
        try:
            plans = self._write(run_id, pages, listed)
        except (
            SQLAlchemyError,
            self.engine.dialect.loaded_dbapi.Error,
            ValueError,
            OverflowError,
        ) as exc:
            self.close()
            # A value a driver cannot bind, or a query run by the driver
            # itself, raises outside SQLAlchemy's tree; it fails this page
            # like a refused statement, never the run.
            error = LockTimeoutError if is_lock_wait(exc) else StoreError
            raise error(not_written(pages, exc)) from exc
        except RunInterrupted:
            self.close()
            raise
        return [plan.counts for plan in plans]

    def _write(
        self,
        run_id: int,
        pages: Sequence[tuple[PageBatch, datetime | None]],
        listed: list[list[Listed]],
    ) -> list[_Plan]:
        if self._connection is None:
            self._connection = _writer_connection(self.engine)
            self._copies_changes = _copy_stores_changes(self._connection)
            self._stages_tasks = _may_stage_tasks(self._connection)
        connection = self._connection
        # The groups stored once this transaction commits.
        known = dict(self._groups)
        with connection.begin():
            driver = _DriverValues(connection.dialect.name)
            everything = [task for tasks in listed for task in tasks]
            # On PostgreSQL the read takes the writers' turn.
            stored, unchanged, flagged = _read_stored(connection, driver, everything)
            # A wait for another writer that ended just after a stop: the
            # pages were not yet being written, and were written after it.
            _end_if_halted()
            plans = []
            for (batch, previous_complete), tasks in zip(pages, listed, strict=True):
                plan = _plan(
                    run_id, batch, tasks, (stored, unchanged), previous_complete, driver
                )
                _write_aside(connection, run_id, batch, plan, tasks, flagged, known)
                plans.append(plan)
            # One statement each for all the pages: each is one more wait for
            # Python's lock, as the driver gives it up while the database works.
            rows = [row for plan in plans for row in plan.rows]
            # In key order (see `_BY_UUID`); no two rows share a key.
            rows.sort(key=_BY_UUID)
            _upsert_tasks(connection, rows, staged=self._stages_tasks)
            changes = [change for plan in plans for change in plan.changes]
            changes.sort(key=_BY_TASK_UUID)
            if self._copies_changes:
                _copy_changes(connection, changes)
            else:
                _execute_many(connection, _change_insert, changes)
            unsaved = self._unsaved.get(run_id, (PageCounts(), 0))
            for plan in plans:
                unsaved = _with_page(unsaved, plan.counts)
            saving = monotonic() - self._saved_at >= RUN_COUNTS_EVERY
            if saving:
                _add_to_run(connection, run_id, *unsaved)
            if self._confirm is not None:
                self._confirm(connection)
        # Only once committed: a transaction rolled back stored no group, and
        # counts nothing.
        self._groups = known
        if saving:
            self._unsaved.pop(run_id, None)
            self._saved_at = monotonic()
        else:
            self._unsaved[run_id] = unsaved
        return plans


# Uuids are random, so rows in the order listed land all over the indexes
# keyed by them, and each commit wrote most of their pages anew. Sorted, the
# rows of a transaction fill the pages they share one after another: on
# SQLite, writing the pages of a first sync took 0.91 x the time (a median
# of eight alternating rounds). PostgreSQL took as long either way.
_BY_UUID = operator.itemgetter("uuid")
_BY_TASK_UUID = operator.itemgetter("task_uuid")


def not_written(
    pages: Sequence[tuple[PageBatch, datetime | None]], exc: BaseException
) -> str:
    """Why these pages were not written, naming the page if it is alone."""
    if len(pages) > 1:
        reason = first_line(exc)
        return f"{len(pages)} pages written together were not written: {reason}"
    batch = pages[0][0]
    return (
        f"account {batch.account.label}, endpoint {batch.endpoint}, page "
        f"{batch.number}: the page was not written: {first_line(exc)}"
    )


def _write_aside(
    connection: Connection,
    run_id: int,
    batch: PageBatch,
    plan: _Plan,
    listed: list[Listed],
    flagged: set[str],
    known: dict[str, str | None],
) -> None:
    """Write what a page needs besides its tasks and their changes, and
    finish its counts; `known` gains the groups it stores."""
    if flagged:
        # Listed unchanged, a flagged task is not rewritten; but it was
        # observed now, which its flag must say, or a removal by the next
        # complete walk would date its last sighting too early. Never back:
        # another account's page may have observed it later.
        on_page = [task.uuid for task in listed if task.uuid in flagged]
        later = tasks.c.unlisted_after < batch.fetched_at
        _update_each(connection, on_page, [later], unlisted_after=batch.fetched_at)
    # A group renamed changes the tasks that embed it, so the groups of the
    # tasks written are all that can need an upsert.
    found = _new_groups(plan.written, known)
    _upsert_groups(connection, found, batch.fetched_at)
    known.update((group.id, group.name) for group in found)
    _insert_rejects(connection, run_id, batch)
    plan.counts.seen = len(batch.records)
    plan.counts.rejected = len(batch.rejects)
    plan.counts.bad_values = sum(len(r.bad_fields) for r in plan.written)


def _with_page(
    unsaved: tuple[PageCounts, int], counts: PageCounts
) -> tuple[PageCounts, int]:
    """A run's unsaved counts and pages, with one page more."""
    total = replace(unsaved[0])
    total.add(counts)
    return total, unsaved[1] + 1


def _add_to_run(
    connection: Connection, run_id: int, counts: PageCounts, pages: int
) -> None:
    """Add what committed transactions stored to their run's counts, in one
    more such transaction.

    The run writes its totals when it ends; but a run killed before that
    was left with counts of zero, while its committed pages and their
    history rows pointed to it. A writer adds its pages' counts at most
    every `RUN_COUNTS_EVERY` seconds: in every page, this one more row to
    write made a re-sync's writing a third slower.
    """
    added = {"pages": pages, **counts.run_columns()}
    connection.execute(
        update(sync_runs)
        .where(sync_runs.c.id == run_id)
        .values({name: sync_runs.c[name] + value for name, value in added.items()})
    )


def _writer_connection(engine: Engine) -> Connection:
    """A connection to write pages over; on SQLite, with its temporary
    storage in memory.

    SQLite copies each database page a multi-row statement changes to a
    statement journal, to undo that statement alone if it fails. Past
    64 KiB the journal goes to a temporary file: a first sync wrote about a
    megabyte of it for each page of tasks, a sixth of the writer's time. In
    memory it costs a copy, and is freed when the statement ends.
    """
    connection = engine.connect()
    if connection.dialect.name == "sqlite":
        _sqlite_pragma(connection, "temp_store = MEMORY")
    return connection


def _release_writer_connection(connection: Connection) -> None:
    # The pool hands the connection to other queries next, whose sorts and
    # temporary tables can be large: those keep SQLite's default, a small
    # cache that spills to a file.
    if connection.dialect.name == "sqlite" and not connection.invalidated:
        try:
            _sqlite_pragma(connection, "temp_store = DEFAULT")
        except sqlite3.Error:
            connection.invalidate()
    connection.close()


def _sqlite_pragma(connection: Connection, setting: str) -> Any:
    """The pragma's first row, if it gives one.

    Run by the driver: through SQLAlchemy the statement would begin a
    transaction, and on SQLite every transaction here takes the write lock.
    """
    driver_connection: Any = connection.connection.driver_connection
    return driver_connection.execute(f"PRAGMA {setting}").fetchone()


def _deduplicate(listed: Iterable[Listed]) -> list[Listed]:
    """One task per uuid, the last one listed winning."""
    return list({task.uuid: task for task in listed}.values())


def _read_stored(
    connection: Connection, driver: _DriverValues, listed: list[Listed]
) -> tuple[dict[str, _Stored], set[str], set[str]]:
    """The stored rows of the listed tasks that may have changed, the uuids
    of those that did not, and of those among them that are flagged (see
    `mark_removals`); only the rows that differ get their times converted."""
    listed_hashes = {task.uuid: task.content_hash for task in listed}
    if len(listed_hashes) < len(listed):
        # Of pages written together (each page's own are deduplicated): a
        # task planned twice against one stored row would be written twice.
        raise ValueError("pages written together must not share a task")
    unchanged = set(listed_hashes)
    flagged: set[str] = set()
    stored: dict[str, _Stored] = {}
    for row in _rows_to_plan(connection, listed_hashes):
        if type(row) is str:
            unchanged.discard(row)  # new: not stored at all
            continue
        uuid, _, content_hash, removed_at, _, _, _ = row
        if removed_at is None and content_hash == listed_hashes[uuid]:
            flagged.add(uuid)
        else:
            unchanged.discard(uuid)
            stored[uuid] = _Stored.read(driver, row)
    return stored, unchanged, flagged


class _Stored(NamedTuple):
    """What planning a page or a removal needs of a stored task."""

    uuid: str
    status: int | None
    content_hash: str
    removed_at: datetime | None
    status_str: str | None
    status_seen_at: datetime | None
    unlisted_after: datetime | None

    @classmethod
    def read(cls, driver: _DriverValues, row: tuple[Any, ...]) -> _Stored:
        """From a row of `_rows_to_plan`, its times converted."""
        uuid, status, content_hash, removed_at, status_str, seen_at, unlisted = row
        return cls(
            uuid,
            status,
            content_hash,
            driver.read_time(removed_at),
            status_str,
            driver.read_time(seen_at),
            driver.read_time(unlisted),
        )


def _rows_to_plan(connection: Connection, listed: dict[str, str]) -> list[Any]:
    """What planning needs of the listed tasks that are not stored unchanged
    and unflagged: a stored task's row, its columns those of `_Stored`, and
    a task not stored its uuid alone.

    The database compares the hashes: in a re-sync nearly every task is
    unchanged, and reading all their rows back, only to find them equal,
    was half the writer's time. It is one statement for all the pages
    written together, whose tasks travel as one value: a parameter per
    uuid made SQLite's statements many, and psycopg converts a query of
    more than 50 parameters afresh every time.
    """
    # A uuid is cleaned text, which orjson writes ten times faster than the
    # json module, whose encoding was a fiftieth of a first sync's writer.
    text = orjson.dumps(listed).decode()
    if connection.dialect.name == "postgresql":
        # The first statement of a page's transaction: it takes the turn.
        rows = _take_write_turn(connection, then=(_ROWS_TO_PLAN_FROM_JSON, (text,)))
        # The hash column holds no NULL: a NULL hash is a task not stored.
        return [row[0] if row[2] is None else row for row in rows]
    # SQLite's driver gives up Python's lock for every row it reads, and
    # while the fetching threads parsed, the writer waited to get it back
    # each time: so the rows come back as one JSON text. Every column read
    # is text, an integer or NULL, which JSON carries as it is. A first
    # sync's tasks are all new, and their uuids alone are shorter to read.
    found = connection.exec_driver_sql(_ROWS_TO_PLAN_AS_JSON, (text,)).scalar_one()
    planned: list[Any] = json.loads(found)
    return planned


_PLANNED_COLUMNS = (
    "t.status, t.content_hash, t.removed_at, t.status_str, t.status_seen_at,"
    " t.unlisted_after"
)
# A task to plan is not stored, changed, removed, or flagged. IS NOT and
# IS DISTINCT FROM are true when one side is NULL.
_ROWS_TO_PLAN_AS_JSON = (
    "SELECT json_group_array(CASE WHEN t.uuid IS NULL THEN listed.key"
    f" ELSE json_array(listed.key, {_PLANNED_COLUMNS}) END)"
    " FROM json_each(?) AS listed LEFT JOIN tasks AS t ON t.uuid = listed.key"
    " WHERE t.content_hash IS NOT listed.value OR t.removed_at IS NOT NULL"
    " OR t.unlisted_after IS NOT NULL"
)
_ROWS_TO_PLAN_FROM_JSON = (
    f"SELECT listed.key, {_PLANNED_COLUMNS}"
    " FROM json_each_text(%s::json) AS listed"
    " LEFT JOIN tasks AS t ON t.uuid = listed.key"
    " WHERE t.content_hash IS DISTINCT FROM listed.value"
    " OR t.removed_at IS NOT NULL OR t.unlisted_after IS NOT NULL"
)


def _plan(
    run_id: int,
    batch: PageBatch,
    listed: list[Listed],
    stored: tuple[dict[str, _Stored], set[str]],
    previous_complete: datetime | None,
    driver: _DriverValues,
) -> _Plan:
    plan = _Plan()
    now = batch.fetched_at
    at = driver.time(now)
    rows, unchanged = stored
    for task in listed:
        if task.uuid in unchanged:
            continue
        old = rows.get(task.uuid)
        if old is not None and _listed_later(old, now):
            # Another account's page, fetched after this one, was written
            # first: this older listing would undo a newer one, and a change
            # back to its status would be one the platform never made.
            continue
        prepared = _prepare(driver, task)
        record = prepared.record
        if old is None:
            plan.counts.new += 1
            plan.rows.append(_task_row(prepared, at, status_seen_at=at))
            plan.changes.append(_change(run_id, record, "first_seen", None, at))
        elif old.removed_at is not None:
            plan.counts.restored += 1
            # The walk of the account a task moved from can settle its
            # removal after another account's page listing it was fetched,
            # and before that page is written: the restore is then observed
            # when the removal was, never before the event it follows.
            restored_at = driver.time(max(now, old.removed_at))
            plan.rows.append(
                _task_row(prepared, restored_at, status_seen_at=restored_at)
            )
            plan.changes.append(
                _change(
                    run_id,
                    record,
                    "restored",
                    None,
                    restored_at,
                    driver.time(old.removed_at),
                )
            )
        else:
            plan.counts.changed += 1
            status_changed = old.status != record.status
            seen_at = now if status_changed else old.status_seen_at
            # A task the last complete walk missed stays flagged (see
            # `mark_removals`), now last observed listed here; and that walk
            # did not observe it, so its flag says when one last did.
            flagged = old.unlisted_after is not None
            plan.rows.append(
                _task_row(
                    prepared,
                    at,
                    status_seen_at=driver.time(seen_at),
                    unlisted_after=at if flagged else None,
                )
            )
            if status_changed:
                last_seen = (
                    old.unlisted_after
                    if flagged
                    else _latest(old.status_seen_at, previous_complete)
                )
                plan.changes.append(
                    _change(run_id, record, "changed", old, at, driver.time(last_seen))
                )
        plan.written.append(record)
    plan.counts.status_changes = len(plan.changes)
    return plan


def _listed_later(old: _Stored, moment: datetime) -> bool:
    """Whether the stored row holds a listing of the task made after
    `moment`: its status first seen, or the task last observed listed, then.

    A removal is no listing: a task listed again is restored (see `_plan`).
    """
    if old.removed_at is not None:
        return False
    last = old.unlisted_after or old.status_seen_at
    return last is not None and last > moment


class _DriverValues:
    """Values as the database driver takes them.

    The rows of a page are written by one executemany of the driver: having
    SQLAlchemy convert every value of every row, one at a time, took a third
    of a first sync. Only times and the JSON payload need converting. Times
    take the form SQLAlchemy's own types give them (a test holds them to
    it); payloads take `payload_json`'s, which their hashes are taken of.
    """

    def __init__(self, dialect: str) -> None:
        # SQLite has no time type: SQLAlchemy stores naive UTC text with
        # microseconds, and comparisons between times rely on that one form.
        self.times_as_text = dialect == "sqlite"

    def time(self, moment: datetime | None) -> Any:
        if moment is None:
            return None
        if moment.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        if self.times_as_text:
            # By arithmetic, not `astimezone` and `replace`: see UTC_EPOCH.
            naive = NAIVE_EPOCH + (moment - UTC_EPOCH)
            return naive.isoformat(" ", "microseconds")
        return moment.astimezone(UTC)

    def read_time(self, value: Any) -> datetime | None:
        """A time as the driver reads it back, aware and in UTC."""
        if value is None:
            return None
        moment: datetime = (
            datetime.fromisoformat(value) if self.times_as_text else value
        )
        if moment.tzinfo is None:  # SQLAlchemy's form on SQLite: naive, UTC
            return UTC_EPOCH + (moment - NAIVE_EPOCH)
        # PostgreSQL's, or on SQLite a time some other tool wrote.
        return moment.astimezone(UTC)

    @staticmethod
    def json(value: Any) -> str:
        return payload_json(value)


def _prepare(driver: _DriverValues, task: Listed) -> PreparedTask:
    if isinstance(task, PreparedTask):
        return task
    record = task.parsed()
    values = {
        "uuid": record.uuid,
        "user_id": record.user_id,
        "sub_user_id": record.sub_user_id,
        "name": record.name,
        "status": record.status,
        "status_str": record.status_str,
        "created_at": driver.time(record.created_at),
        "altered_at": driver.time(record.altered_at),
        "maximumcall": record.maximumcall,
        "dial_time_id": record.dial_time_id,
        "destination_extension": record.destination_extension,
        "caller_line_id": record.caller_line_id,
        "bridge_group_id": record.bridge_group_id,
        "group_id": record.group_id,
        "enable": record.enable,
        "remark": record.remark,
        "raw": record.raw_json or driver.json(record.raw),
        "content_hash": record.content_hash,
    }
    if isinstance(task, ListedTask):
        # The record was made here, and its payload is in `values` now: the
        # item it keeps was a third of the memory of the pages in flight.
        record.raw, record.raw_json = {}, None
    return PreparedTask(record.uuid, record.content_hash, record, values)


def _task_row(
    task: PreparedTask, at: Any, *, status_seen_at: Any, unlisted_after: Any = None
) -> dict[str, Any]:
    """The task's row, written `at`; all times in the driver's form."""
    return {
        **task.values,
        "first_seen_at": at,
        "last_changed_at": at,
        "status_seen_at": status_seen_at,
        "removed_at": None,
        "unlisted_after": unlisted_after,
    }


def _change(
    run_id: int,
    record: TaskRecord,
    event_name: str,
    old: _Stored | None,
    observed_at: Any,
    old_seen_at: Any = None,
) -> dict[str, Any]:
    """A row of the status history; both times in the driver's form."""
    return {
        "task_uuid": record.uuid,
        "run_id": run_id,
        "event": event_name,
        "old_status": old.status if old is not None else None,
        "old_status_str": old.status_str if old is not None else None,
        "new_status": record.status,
        "new_status_str": record.status_str,
        "old_seen_at": old_seen_at,
        "observed_at": observed_at,
    }


def _latest(*moments: datetime | None) -> datetime | None:
    known = [moment for moment in moments if moment is not None]
    return max(known) if known else None


def _new_groups(
    records: list[TaskRecord], stored: dict[str, str | None]
) -> list[GroupRecord]:
    """The groups of the records, less those stored with the same name."""
    found = {r.group.id: r.group for r in records if r.group is not None}
    return [g for g in found.values() if g.id not in stored or stored[g.id] != g.name]


def _upsert_groups(
    connection: Connection, found: list[GroupRecord], now: datetime
) -> None:
    rows = [
        {"id": g.id, "name": g.name, "first_seen_at": now, "last_changed_at": now}
        for g in found
    ]
    if rows:
        statement = _group_upsert(connection.dialect.name)
        _execute_chunked(connection, statement, rows, len(groups.c))


# The upserts are built once per dialect: building one costs about as much
# as running it for a page.
@functools.cache
def _group_upsert(dialect: str) -> Any:
    statement = _dialect_insert(dialect, groups)
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=[groups.c.id],
        set_={"name": excluded.name, "last_changed_at": excluded.last_changed_at},
        where=groups.c.name.is_distinct_from(excluded.name),
    )


def _task_upsert(dialect: str) -> Any:
    return _on_conflict(_dialect_insert(dialect, tasks))


def _on_conflict(statement: Any) -> Any:
    excluded = statement.excluded
    kept = {"uuid", "first_seen_at"}
    values = {c.name: excluded[c.name] for c in tasks.c if c.name not in kept}
    # A flag says the owner's last complete walk missed the task: a task that
    # moved to another account is listed there, and keeps no flag.
    same_owner = (tasks.c.user_id == excluded.user_id) & (
        tasks.c.sub_user_id == excluded.sub_user_id
    )
    values["unlisted_after"] = case((same_owner, excluded.unlisted_after), else_=null())
    return statement.on_conflict_do_update(
        index_elements=[tasks.c.uuid],
        set_=values,
        # Repeats the planner's decision in SQL, so a row another writer
        # changed meanwhile is still compared, not blindly overwritten.
        where=tasks.c.content_hash.is_distinct_from(excluded.content_hash)
        | tasks.c.removed_at.is_not(None),
    )


def _change_insert(dialect: str) -> Any:
    return _dialect_insert(dialect, task_status_changes)


# Compiled once per dialect and statement: compiling costs about as much as
# running the statement for a page.
@functools.lru_cache(maxsize=32)
def _driver_sql(
    dialect: Dialect, build: Callable[[str], Any], columns: tuple[str, ...]
) -> str:
    if dialect.positional:
        # Named parameters, so the driver takes the rows' dicts as they are.
        dialect = type(dialect)(paramstyle="named")  # type: ignore[call-arg]
    return str(_compiled(dialect, build, columns).string)


def _compiled(
    dialect: Dialect, build: Callable[[str], Any], columns: tuple[str, ...]
) -> Any:
    # Compiled as for an executemany, which returns nothing: on PostgreSQL
    # an INSERT ... RETURNING of each row costs several times the insert.
    return build(dialect.name).compile(
        dialect=dialect, column_keys=list(columns), for_executemany=True
    )


def _execute_many(
    connection: Connection,
    build: Callable[[str], Any],
    rows: list[dict[str, Any]],
) -> None:
    """Run the statement `build` makes once per row, through the driver; the
    rows hold `_DriverValues`."""
    if not rows:
        return
    columns = tuple(rows[0])
    if connection.dialect.name == "sqlite":
        _execute_as_values(connection, build, columns, rows)
        return
    sql = _driver_sql(connection.dialect, build, columns)
    connection.exec_driver_sql(sql, rows)


def _copy_stores_changes(connection: Connection) -> bool:
    """Whether history rows may go in by COPY: on PostgreSQL, when it
    stores them as an INSERT would.

    A first sync writes a history row for every task, and PostgreSQL runs
    each row of an executemany as a statement of its own: by COPY, which
    does the same inserts, foreign key checks and index updates without
    a statement per row, a first sync of 100,000 tasks took 0.82-0.89 x
    the time. But COPY refuses a table under row-level security, and
    skips the rules that rewrite its INSERTs, both of which a database's
    owner may add; then the rows go by INSERT.
    """
    if connection.dialect.name != "postgresql":
        return False
    with connection.begin():
        found = connection.exec_driver_sql(
            _COPY_STORES_CHANGES, (task_status_changes.name,)
        ).scalar()
    return bool(found)


# True when row-level security does not apply to this user and no rule
# rewrites an INSERT (event type 3); no row when there is no such table.
_COPY_STORES_CHANGES = (
    "SELECT NOT row_security_active(c.oid) AND NOT EXISTS ("
    " SELECT 1 FROM pg_rewrite AS r WHERE r.ev_class = c.oid AND r.ev_type = '3')"
    " FROM pg_class AS c WHERE c.oid = to_regclass(%s)"
)


def _may_stage_tasks(connection: Connection) -> bool:
    """Whether tasks may be staged (see `_upsert_staged`): on PostgreSQL,
    when the user may create temporary tables, which a database's owner
    can withhold; then the rows go by executemany."""
    if connection.dialect.name != "postgresql":
        return False
    with connection.begin():
        allowed = connection.exec_driver_sql(
            "SELECT has_database_privilege(current_database(), 'TEMPORARY')"
        ).scalar()
    return bool(allowed)


def _upsert_tasks(
    connection: Connection, rows: list[dict[str, Any]], *, staged: bool
) -> None:
    """Upsert the task rows of the pages written together."""
    if staged and len(rows) >= STAGED_LEAST:
        _upsert_staged(connection, rows)
    else:
        _execute_many(connection, _task_upsert, rows)


def _upsert_staged(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Upsert task rows on PostgreSQL by COPY into a temporary table, and
    one INSERT ... SELECT from it with the executemany's ON CONFLICT.

    PostgreSQL runs each row of an executemany as a statement of its own,
    and a first sync's writer spent most of its time waiting on them. The
    one statement passes the same constraints, row triggers, rules and
    row-level security (a statement trigger fires once, not once a row): a
    first sync took 0.80-0.88 x the time at 10,000 tasks and 0.84-0.86 x at
    100,000.

    The table is made in each transaction and dropped as it ends. Kept
    for the session, it kept the types `tasks` had then, and a connection
    lasts many runs: a column widened since refused what it now holds.
    Made per transaction, it cost nothing measurable.
    """
    create, upsert = _staged_sql(connection.dialect, tuple(rows[0]))
    driver_connection: Any = connection.connection.driver_connection
    with driver_connection.cursor() as cursor:
        cursor.execute(create)
        _copy_rows(connection, f"pg_temp.{STAGED_TASKS}", rows)
        cursor.execute(upsert)
    log.debug("upserted into %s from pg_temp.%s", tasks.name, STAGED_TASKS)


@functools.lru_cache(maxsize=8)
def _staged_sql(dialect: Dialect, columns: tuple[str, ...]) -> tuple[str, str]:
    """The statements that create the staging table of `columns` and upsert
    from it.

    The table takes the columns' types from `tasks` and none of its
    constraints: a column the database's owner added to `tasks`, NOT NULL
    with a default, is not staged, and takes its default as it would from
    the executemany. It is named in the session's own schema: a search
    path may put another schema first, and a table of that name there,
    which another user could fill, would be read instead.
    """
    names = ", ".join(columns)
    create = (
        f"CREATE TEMPORARY TABLE pg_temp.{STAGED_TASKS} ON COMMIT DROP"
        f" AS SELECT {names} FROM {tasks.name} WITH NO DATA"
    )
    staged = table(STAGED_TASKS, *(column(name) for name in columns), schema="pg_temp")
    upsert = _on_conflict(
        postgresql.insert(tasks).from_select(list(columns), select(*staged.c))
    )
    return create, str(upsert.compile(dialect=dialect))


def _copy_changes(connection: Connection, changes: list[dict[str, Any]]) -> None:
    """Insert history rows by PostgreSQL's COPY (see `_copy_stores_changes`),
    in the transaction of their pages."""
    if changes:
        _copy_rows(connection, task_status_changes.name, changes)


def _copy_rows(connection: Connection, target: str, rows: list[dict[str, Any]]) -> None:
    """COPY the rows, of the driver values, into the table `target`, through
    the driver's connection, whose dumpers turn them into COPY's text."""
    columns = tuple(rows[0])
    values = operator.itemgetter(*columns)
    statement = f"COPY {target} ({', '.join(columns)}) FROM STDIN"
    # The driver's statement passes SQLAlchemy's echo by: the debug log has it.
    log.debug("%s: %d row(s)", statement, len(rows))
    driver_connection: Any = connection.connection.driver_connection
    with driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(values(row))


def _execute_as_values(
    connection: Connection,
    build: Callable[[str], Any],
    columns: tuple[str, ...],
    rows: list[dict[str, Any]],
) -> None:
    """The rows as a few statements of many VALUES rows each.

    SQLite's driver gives up Python's lock for every row of an executemany,
    and while the fetching threads parsed, the writer waited to get it back
    each time: in a first sync it spent half its time waiting. A statement
    waits once.

    A statement takes at most `MAX_STATEMENT_ROWS` rows. Several pages are
    often written together, and statements of a thousand rows made a first
    sync's peak memory 8 MB higher (the prepared statements of the larger
    sizes, and the statement journal, in memory, of the pages each changes)
    for 2 % less time.
    """
    start = 0
    largest = min(MAX_STATEMENT_ROWS, SQLITE_MAX_VARIABLES // len(columns))
    for count in _statement_rows(len(rows), largest):
        sql, order = _values_sql(connection.dialect, build, columns, count)
        chunk = rows[start : start + count]
        connection.exec_driver_sql(
            sql, tuple([r[name] for r in chunk for name in order])
        )
        start += count


def _statement_rows(total: int, largest: int) -> list[int]:
    """How many rows each multi-row statement takes: powers of two, largest
    first, adding up to `total`; or all in one, if at most `EXACT_ROWS`.

    Each row count is a statement text of its own, which SQLite's driver
    keeps prepared for as long as the connection lasts, at about 2.3 kB a
    row. A statement for every count that pages happened to have kept
    hundreds of megabytes when pages of many sizes changed many rows; powers
    of two allow a handful of counts, and a handful of statements a page.
    The few rows a re-sync writes take one statement, not two or three:
    each is one more wait for Python's lock (see `_execute_as_values`),
    and the small counts add about 300 kB.
    """
    if total <= min(EXACT_ROWS, largest):
        return [total] if total else []
    top = 1 << (max(1, largest).bit_length() - 1)
    counts = [top] * (total // top)
    rest = total % top
    bits = reversed(range(rest.bit_length()))
    return counts + [1 << bit for bit in bits if rest >> bit & 1]


# Holds every count `_statement_rows` gives, for both statements: those up to
# EXACT_ROWS, and the powers of two above, of which there are fewer than 16.
@functools.lru_cache(maxsize=2 * (EXACT_ROWS + 16))
def _values_sql(
    dialect: Dialect, build: Callable[[str], Any], columns: tuple[str, ...], count: int
) -> tuple[str, tuple[str, ...]]:
    """The statement for `count` rows, and the order of a row's values in it."""
    compiled = _compiled(dialect, build, columns)
    sql, order = str(compiled.string), tuple(compiled.positiontup or ())
    one_row = "(" + ", ".join(["?"] * len(order)) + ")"
    if len(order) != len(columns) or sql.count(one_row) != 1:
        raise AssertionError(f"unexpected form of a one-row insert: {sql}")
    return sql.replace(one_row, ", ".join([one_row] * count)), order


def _insert_rejects(connection: Connection, run_id: int, batch: PageBatch) -> None:
    rows = [
        {
            "run_id": run_id,
            "user_id": batch.account.user_id,
            "sub_user_id": batch.account.sub_user_id,
            "endpoint": batch.endpoint,
            "page": batch.number,
            "reason": reject.reason,
            "item": reject.item,
            "rejected_at": batch.fetched_at,
        }
        for reject in batch.rejects
    ]
    _insert(connection, sync_rejects, rows)


def _insert(connection: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    if rows:
        _execute_chunked(connection, insert(table), rows, len(rows[0]))


def _insert_statement(connection: Connection, table: Table) -> Any:
    """The dialect's own INSERT, which knows ON CONFLICT."""
    return _dialect_insert(connection.dialect.name, table)


def _dialect_insert(dialect: str, table: Table) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise StoreError(f"unsupported database: {dialect}")


def _execute_chunked(
    connection: Connection,
    statement: Insert,
    rows: list[dict[str, Any]],
    columns: int,
) -> None:
    for chunk in _chunks(rows, _rows_per_statement(connection, columns)):
        connection.execute(statement, chunk)


def _rows_per_statement(connection: Connection, columns: int) -> int:
    limit = (
        SQLITE_MAX_VARIABLES
        if connection.dialect.name == "sqlite"
        else POSTGRESQL_MAX_VARIABLES
    )
    return max(1, limit // max(1, columns))


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SeenIds:
    """The task ids a walk listed, for `mark_removals`, kept as 8-byte digests.

    As strings they took about 115 bytes each, and with several large
    accounts walked at once they were most of a run's memory. Two ids with
    one digest (about one chance in 10**14 in an account of 100,000 tasks)
    would at worst leave a removed task marked listed until a later walk;
    a task is never marked removed because of a digest.
    """

    def __init__(self, uuids: Iterable[str] = ()) -> None:
        self._digests = array("q")
        self._is_sorted = True
        self.update(uuids)

    def update(self, uuids: Iterable[str]) -> None:
        self._digests.extend(map(_digest, uuids))
        self._is_sorted = False

    def __contains__(self, uuid: object) -> bool:
        if not isinstance(uuid, str):
            return False
        self._sort()
        key = _digest(uuid)
        at = bisect_left(self._digests, key)
        return at < len(self._digests) and self._digests[at] == key

    def __len__(self) -> int:
        return len(self._digests)

    def unlisted(self, uuids: Iterable[str]) -> list[str]:
        """Those of `uuids` the walk did not list, in their order.

        Settling a re-sync looks up every stored task of the account: one
        at a time through `in`, that was a sixth of the writer's samples in
        a profile. Through a set of the digests, an account of 12,500 tasks
        took 10 ms instead of 26, for about 80 bytes a task while the set
        lasts; past `SET_LOOKUP_MOST` ids the bisection keeps memory bounded.
        """
        self._sort()
        if len(self._digests) > SET_LOOKUP_MOST:
            return [uuid for uuid in uuids if uuid not in self]
        listed = set(self._digests)
        # As `in` says: only text was listed. On SQLite another tool can
        # store an id as bytes, whose hash is that of the same text.
        return [
            uuid
            for uuid in uuids
            if not isinstance(uuid, str) or _digest(uuid) not in listed
        ]

    def repeats(self) -> int:
        """How many of the ids were listed again after their first time."""
        self._sort()
        digests = self._digests
        return sum(map(operator.eq, digests, islice(digests, 1, None)))

    def _sort(self) -> None:
        if not self._is_sorted:
            self._digests = array("q", sorted(self._digests))
            self._is_sorted = True


def _digest(uuid: str) -> int:
    # Python's own hash of the string: salted afresh in every process, which
    # a set held in memory does not mind, and kept in the string once taken,
    # as the page's deduplication already did. A blake2b digest of each id,
    # taken twice per task, was a twentieth of a sync's writing.
    return hash(uuid)


def shrink_wal(engine: Engine) -> None:
    """On SQLite, copy the WAL into the database and empty its file, unless
    a reader or a writer is in the way; for a daemon, between its runs.

    The WAL grows to about 40 MB between checkpoints (see `_tune_sqlite`),
    and its file never shrinks while connections stay open: beside a small
    database a daemon left one thirty times the database's size. Nothing
    is waited for beyond a turn of the busy timeout: a reader in the way
    leaves it for the end of the next run.
    """
    if engine.dialect.name != "sqlite":
        return
    try:
        with engine.connect() as connection:
            busy, _, _ = _sqlite_pragma(connection, "wal_checkpoint(TRUNCATE)")
    except (SQLAlchemyError, sqlite3.Error) as exc:
        log.debug("the WAL was not emptied: %s", first_line(exc))
        return
    if busy:
        log.debug("the WAL was not emptied: another connection was using it")


def has_listed_tasks(engine: Engine, account: Account) -> bool:
    """Whether any task of the account is stored and not marked removed."""
    owned = (tasks.c.user_id == account.user_id) & (
        tasks.c.sub_user_id == account.sub_user_id
    )
    query = select(tasks.c.uuid).where(owned, tasks.c.removed_at.is_(None)).limit(1)
    try:
        with engine.connect() as connection:
            return connection.execute(query).first() is not None
    except SQLAlchemyError as exc:
        raise StoreError(
            f"account {account.label}: cannot read its stored tasks: {first_line(exc)}"
        ) from exc


def mark_removals(
    engine: Engine,
    run_id: int,
    account: Account,
    seen: SeenIds,
    observed_at: datetime,
    previous_complete: datetime | None,
    *,
    confirm: Confirm | None = None,
) -> int:
    """Settle the account's listed tasks after a complete walk; the count removed.

    A task is marked removed only when this walk and the complete walk
    before it both missed it. A list that shifts between two pages while
    they are read (a task deleted from a page already read pushes the next
    one onto it) hides a live task from that one walk, and nothing in the
    walk shows it; the next walk lists it again. So a task the walk missed
    is first only flagged, with when it was last observed listed
    (`unlisted_after`). The next complete walk that lists it clears the
    flag; a page of any other walk that lists it moves the flag's time on.
    """
    owned = (tasks.c.user_id == account.user_id) & (
        tasks.c.sub_user_id == account.sub_user_id
    )
    listed = owned & tasks.c.removed_at.is_(None)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                _take_write_turn(connection)
            # Only listed tasks are ever flagged, so this reads the partial
            # index alone: with `removed_at` in the query, SQLite chose the
            # account's index and read every task of the account.
            flagged = connection.execute(
                select(
                    tasks.c.uuid,
                    tasks.c.status,
                    tasks.c.status_str,
                    tasks.c.unlisted_after,
                ).where(owned, _IS_FLAGGED)
            ).all()
            back = [row.uuid for row in flagged if row.uuid in seen]
            _update_each(connection, back, [owned, _IS_FLAGGED], unlisted_after=None)
            missed = _missed(connection, listed, seen)
            missed = _set_unlisted(connection, missed, listed, previous_complete)
            gone = [row for row in flagged if row.uuid not in seen]
            gone = _remove(connection, run_id, gone, listed & _IS_FLAGGED, observed_at)
            if confirm is not None:
                confirm(connection)
    except (SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:
        raise StoreError(
            f"account {account.label}: removals were not marked: {first_line(exc)}"
        ) from exc
    _log_settled(account, len(missed), gone)
    return len(gone)


def _missed(
    connection: Connection, listed: ColumnElement[bool], seen: SeenIds
) -> list[str]:
    """The listed, unflagged tasks that the walk did not list."""
    # Streamed, and only uuids: holding every row of a large account at
    # once, only to keep the few that are missing, doubled a run's peak
    # memory.
    rows = connection.execute(
        select(tasks.c.uuid).where(listed, tasks.c.unlisted_after.is_(None)),
        execution_options={"yield_per": STREAMED_ROWS},
    )
    return seen.unlisted(rows.scalars())


def _set_unlisted(
    connection: Connection,
    uuids: list[str],
    listed: ColumnElement[bool],
    previous_complete: datetime | None,
) -> list[str]:
    """Flag tasks a complete walk missed, with when they were last observed;
    the uuids flagged.

    That is the later of when their status was first observed and when the
    previous complete walk began, which listed them, or they would be
    flagged already. It becomes the removal's `old_seen_at`.
    """
    last_observed: Any = tasks.c.status_seen_at
    if previous_complete is not None:
        walk_began = literal(previous_complete, tasks.c.status_seen_at.type)
        last_observed = case(
            (tasks.c.status_seen_at > walk_began, tasks.c.status_seen_at),
            else_=walk_began,
        )
    unflagged = [listed, tasks.c.unlisted_after.is_(None)]
    return _update_each(connection, uuids, unflagged, unlisted_after=last_observed)


def _remove(
    connection: Connection,
    run_id: int,
    rows: list[Any],
    still: ColumnElement[bool],
    observed_at: datetime,
) -> list[Any]:
    """Mark removed the flagged tasks of `rows` that `still` holds for, with
    their history rows; those removed."""
    uuids = [row.uuid for row in rows]
    removed = set(
        _update_each(
            connection,
            uuids,
            [still],
            removed_at=observed_at,
            last_changed_at=observed_at,
            unlisted_after=None,
        )
    )
    gone = [row for row in rows if row.uuid in removed]
    driver = _DriverValues(connection.dialect.name)
    _execute_many(
        connection,
        _change_insert,
        [_removal(driver, run_id, row, observed_at) for row in gone],
    )
    counts = PageCounts(removed=len(gone), status_changes=len(gone))
    _add_to_run(connection, run_id, counts, 0)
    return gone


def _update_each(
    connection: Connection,
    uuids: list[str],
    where: Sequence[ColumnElement[bool]] = (),
    **values: Any,
) -> list[str]:
    """Update those of these tasks that `where` still holds for; the uuids
    updated.

    On PostgreSQL another process may have written a task since it was
    read, moving it to another account, say: the update then leaves it, and
    says so. A database that cannot say which rows it updated (SQLite
    before 3.35) is one whose transaction holds its only write lock, where
    nothing changes between the read and the update.
    """
    updated: list[str] = []
    for chunk in _chunks(uuids, _rows_per_statement(connection, 1)):
        statement = update(tasks).where(tasks.c.uuid.in_(chunk), *where).values(values)
        if connection.dialect.update_returning:
            result = connection.execute(statement.returning(tasks.c.uuid))
            updated.extend(result.scalars())
        else:
            connection.execute(statement)
            updated.extend(chunk)
    return updated


def _removal(
    driver: _DriverValues, run_id: int, row: Any, observed_at: datetime
) -> dict[str, Any]:
    return {
        "task_uuid": row.uuid,
        "run_id": run_id,
        "event": "removed",
        "old_status": row.status,
        "old_status_str": row.status_str,
        "new_status": None,
        "new_status_str": None,
        "old_seen_at": driver.time(row.unlisted_after),
        "observed_at": driver.time(observed_at),
    }


def _log_settled(account: Account, missed: int, gone: list[Any]) -> None:
    # One line per account keeps a daemon's log readable; each removed task
    # is in task_status_changes, and in the log at DEBUG.
    if missed:
        log.info(
            "account %s: %d task(s) not listed; marked removed if the next "
            "complete walk misses them too",
            account.label,
            missed,
        )
    if gone:
        log.info(
            "account %s: %d task(s) no longer listed, marked removed",
            account.label,
            len(gone),
        )
    for row in gone:
        log.debug("task %s of account %s removed", row.uuid, account.label)


def first_line(exc: BaseException) -> str:
    """The first line of the error, for a one-line message: SQLAlchemy's
    own text goes on with the statement and a link."""
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


# The newest revision in migrations/versions, which `check_schema`
# requires without reading the revision files through Alembic (see
# `schema_revision`); a test holds it to `head_revision()`.
SCHEMA_HEAD = "c7f3a9e1d004"
_VERSION_TABLE = "alembic_version"
_version_num = column("version_num", String)


def _alembic_config() -> Any:
    from alembic.config import Config as AlembicConfig

    # The revisions ship as the package etl.migrations (see pyproject.toml).
    scripts = importlib.import_module("etl.migrations").__path__[0]
    config = AlembicConfig()
    config.set_main_option("script_location", scripts)
    return config


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Bring the database to the current schema; return (before, after)."""
    from alembic import command
    from alembic.util import CommandError

    config = _alembic_config()
    before = schema_revision(engine)
    _refuse_unknown_schema(engine, before)
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise StoreError(f"migration failed: {first_line(exc)}") from exc
    except CommandError as exc:
        # A revision this version does not know: written by a newer
        # task-etl, or another program's Alembic table in the same database.
        raise StoreError(f"migration failed: {first_line(exc)}") from exc
    after = schema_revision(engine)
    if before != after:
        log.info("database migrated from %s to %s", before or "empty", after)
    return before, after or ""


def _refuse_unknown_schema(engine: Engine, current: str | None) -> None:
    """Refuse a schema that `migrate` cannot bring to the head: a revision
    this version does not know, or task-etl's tables without the record of
    their revision. `migrate` failed on either in words that did not say
    what was wrong, after `sync` had advised running it."""
    if current is None:
        if _holds_tasks_table(engine):
            raise StoreError(
                f"the database holds task-etl's tables but no {_VERSION_TABLE},"
                " the record of their schema, so no migration can tell where to"
                " begin: restore the database, or migrate a new one"
            )
        return
    known = _known_revisions()
    unknown = sorted(set(current.split(", ")) - known)
    if unknown:
        raise StoreError(
            f"the database is at schema {current}, which this version of"
            " task-etl does not know (a newer version migrated it, or another"
            f" program wrote {_VERSION_TABLE}): use a task-etl that knows it"
        )


def _holds_tasks_table(engine: Engine) -> bool:
    with engine.connect().execution_options(**{_READS_ONLY: True}) as connection:
        return bool(inspect(connection).has_table(tasks.name))


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(_alembic_config())
    return {script.revision for script in scripts.walk_revisions()}


def head_revision() -> str:
    """The newest revision, as Alembic reads it from the revision files."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    return head or ""


def schema_revision(engine: Engine) -> str | None:
    """The revision the database is at, None before the first migration.

    Read from Alembic's own table without Alembic: importing it took about
    60 ms, which every sync, and every `status`, spent before its first
    request only to check the schema.
    """
    try:
        # Before a run begins, where nothing ends a wait for the write lock.
        with engine.connect().execution_options(**{_READS_ONLY: True}) as connection:
            if not inspect(connection).has_table(_VERSION_TABLE):
                return None
            found = (
                connection.execute(
                    select(_version_num).select_from(table(_VERSION_TABLE))
                )
                .scalars()
                .all()
            )
    except SQLAlchemyError as exc:
        raise StoreError(
            f"cannot open the database{_where(engine)}: {first_line(exc)}"
        ) from exc
    # Alembic keeps one row per head: more than one means branches. A table
    # written by hand may hold anything; it is named, never a traceback.
    return ", ".join(sorted(str(value) for value in found if value is not None)) or None


def _where(engine: Engine) -> str:
    """Which SQLite file, for an error opening it; and why, when its
    directory is missing (SQLite says only "unable to open database file")."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        return ""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f" file {path} (its directory {directory} does not exist)"
    return f" file {path}"


def check_schema(engine: Engine) -> None:
    """Refuse to sync into a database that is not at the current schema."""
    path = engine.url.database
    if engine.dialect.name == "sqlite" and path and path != ":memory:":
        # Connecting would create an empty file, left behind by a typo.
        if not os.path.exists(path):
            raise StoreError(
                f"the database file {path} does not exist: run `task-etl migrate` "
                "first to create it"
            )
    current, head = schema_revision(engine), SCHEMA_HEAD
    if current != head:
        _refuse_unknown_schema(engine, current)
        raise StoreError(
            f"the database is at schema {current or 'none'}, not {head}: "
            "run `task-etl migrate` first"
        )
