"""Another process's writer, for tests of what a run does while SQLite's
write lock is held by someone else."""

from __future__ import annotations

import sqlite3
import threading
import time

from etl.sync import Progress


def other_writer(sqlite_url: str) -> sqlite3.Connection:
    """A connection of the test's own, to hold SQLite's write lock with."""
    path = sqlite_url.removeprefix("sqlite:///")
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False)


class LockAfterFirstPage:
    """A run's progress callback: once the first page is stored, another
    connection takes the write lock, `stop` is set 0.3 s later, and the lock
    is let go after `hold` seconds, long after a stopped run has given up
    waiting."""

    def __init__(
        self, sqlite_url: str, stop: threading.Event, hold: float = 3.0
    ) -> None:
        self.holder = other_writer(sqlite_url)
        self.stop = stop
        self.hold = hold
        # The tasks stored when the lock was taken, and when `stop` is set.
        self.stored_then: int | None = None
        self.stopped_at: float | None = None
        self.letting_go: threading.Timer | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.pages != 1 or self.stored_then is not None:
            return
        self.holder.execute("BEGIN IMMEDIATE")
        count = self.holder.execute("SELECT count(*) FROM tasks").fetchone()[0]
        self.stored_then = int(count)
        self.stopped_at = time.monotonic() + 0.3
        threading.Timer(0.3, self.stop.set).start()
        self.letting_go = threading.Timer(self.hold, self.holder.rollback)
        self.letting_go.start()

    def close(self) -> None:
        """Let go of the lock now, if not yet, and close the connection."""
        if self.letting_go is not None:
            self.letting_go.cancel()
            self.letting_go.join()
        self.holder.close()
