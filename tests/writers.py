"""Another process's writer, for tests of what a run does while the lock it
needs to write is held by someone else: SQLite's write lock, or on
PostgreSQL a session's lock on the tasks table."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine

from etl.sync import Progress


def other_writer(sqlite_url: str) -> sqlite3.Connection:
    """A connection of the test's own, to hold SQLite's write lock with."""
    path = sqlite_url.removeprefix("sqlite:///")
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


@contextmanager
def write_lock_held(sqlite_url: str) -> Iterator[None]:
    """SQLite's write lock, held by a connection of the test's own within."""
    holder = other_writer(sqlite_url)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


class TasksLock:
    """A connection of the test's own that locks the tasks table against
    writes, and lets it go; other sessions can still read it."""

    def __init__(self, db_url: str) -> None:
        self.sqlite = db_url.startswith("sqlite")
        if self.sqlite:
            self.holder = other_writer(db_url)
        else:
            self.engine = create_engine(db_url)
            self.connection = self.engine.connect()

    def rows(self, table: str) -> int:
        """The rows of `table`, read without taking any lock."""
        query = f"SELECT count(*) FROM {table}"
        if self.sqlite:
            return int(self.holder.execute(query).fetchone()[0])
        with self.engine.connect() as connection:
            return int(connection.exec_driver_sql(query).scalar_one())

    def take(self) -> int:
        """Lock the table; the tasks stored then."""
        if self.sqlite:
            self.holder.execute("BEGIN IMMEDIATE")
            return int(self.holder.execute("SELECT count(*) FROM tasks").fetchone()[0])
        self.connection.exec_driver_sql("LOCK TABLE tasks IN EXCLUSIVE MODE")
        stored = self.connection.exec_driver_sql("SELECT count(*) FROM tasks")
        return int(stored.scalar_one())

    def let_go(self) -> None:
        if self.sqlite:
            self.holder.rollback()
        else:
            self.connection.rollback()

    def close(self) -> None:
        if self.sqlite:
            self.holder.close()
        else:
            self.connection.close()
            self.engine.dispose()


class LockAfterFirstPage:
    """A run's progress callback: once the first page is stored, another
    connection takes the lock writes need, `stop` is set 0.3 s later, and
    the lock is let go after `hold` seconds, long after a stopped run has
    given up waiting. With `accounts_locked`, it waits for the first page
    stored once the run holds that many accounts' locks."""

    def __init__(
        self,
        db_url: str,
        stop: threading.Event,
        hold: float = 3.0,
        accounts_locked: int = 0,
    ) -> None:
        self.lock = TasksLock(db_url)
        self.stop = stop
        self.hold = hold
        self.accounts_locked = accounts_locked
        # The tasks stored when the lock was taken, and when `stop` is set.
        self.stored_then: int | None = None
        self.stopped_at: float | None = None
        self.letting_go: threading.Timer | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.pages < 1 or self.stored_then is not None:
            return
        if self.accounts_locked and self.lock.rows("account_locks") < (
            self.accounts_locked
        ):
            return
        self.stored_then = self.lock.take()
        self.stopped_at = time.monotonic() + 0.3
        threading.Timer(0.3, self.stop.set).start()
        self.letting_go = threading.Timer(self.hold, self.lock.let_go)
        self.letting_go.start()

    def close(self) -> None:
        """Let go of the lock now, if not yet, and close the connection."""
        if self.letting_go is not None:
            self.letting_go.cancel()
            self.letting_go.join()
        self.lock.close()
