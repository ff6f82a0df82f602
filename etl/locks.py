"""One writer per account, across processes and machines sharing the database.

A run takes an account's lock before walking it and gives it back after the
account's last write. A second comer waits `locks.wait` seconds, then skips
the account with a `LockBusyError` naming the holder's host and pid.

PostgreSQL has locks of its own: session-level advisory locks, held on one
dedicated connection per run and released by the server the moment that
connection ends, so a process killed with SIGKILL holds nothing. Other
databases (SQLite) get a row per held account in `account_locks` with a
lease: a heartbeat renews it while the run goes on, and a lease that ran out
belongs to a holder that is gone or hung, so the next comer takes it over.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from etl import runs, store
from etl.accounts import Account
from etl.config import LocksConfig
from etl.errors import (
    LockBusyError,
    LockLostError,
    RunAbandoned,
    RunInterrupted,
    StoreError,
)
from etl.models import account_locks
from etl.threads import start_leaving_signals

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a waiting comer tries again; short against any sensible wait.
RETRY_EVERY = 0.25
# How old, when a page is written, the last sign of life of the session
# holding PostgreSQL's advisory locks may be. The server frees a session's
# locks when it ends, and another run may take them at once; the heartbeat
# alone noticed only a third of a lease later, pages written all along, and
# a second still let a fast run write 21 pages. A check is one round trip,
# 0.3 ms over loopback: ten a second are 0.3 % of a run's time.
SESSION_CHECK_SECONDS = 0.1
# PostgreSQL keeps application_name to 63 bytes.
APPLICATION_NAME_LIMIT = 63


@dataclass(frozen=True)
class Holder:
    """Who holds locks: a process on a host, and one run in it."""

    id: str
    host: str
    pid: int

    @classmethod
    def here(cls) -> Holder:
        host, pid = socket.gethostname(), os.getpid()
        return cls(f"{host}:{pid}:{uuid.uuid4().hex[:12]}", host, pid)

    def describe(self) -> str:
        return f"host {self.host} pid {self.pid}"


def advisory_key(account: Account) -> int:
    """The account's PostgreSQL advisory lock key, a signed 64-bit integer.

    Python's own `hash()` of a string is salted afresh in every process, so
    two processes would disagree on it. The first 8 bytes of a SHA-256 of the
    account's ids depend on those bytes alone: every process on every machine
    computes the same key. The prefix keeps clear of keys other software on
    the same database might pick.
    """
    text_key = f"task-etl account\0{account.user_id}\0{account.sub_user_id}"
    digest = hashlib.sha256(text_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class AccountLocks(ABC):
    """The locks one run holds; thread-safe, used by its walking threads."""

    def __init__(
        self,
        engine: Engine,
        config: LocksConfig,
        *,
        stop: threading.Event | None = None,
        holder: Holder | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.holder = holder or Holder.here()
        self._stop = stop or threading.Event()
        self._guard = threading.Lock()
        self._held: set[Account] = set()
        self._lost: set[Account] = set()
        self._closed = False

    def acquire(self, account: Account) -> None:
        """Take the account's lock, waiting up to `locks.wait` seconds."""
        deadline = time.monotonic() + self.config.wait
        while True:
            with self._guard:
                if self._closed:
                    raise LockBusyError("the run is ending", account=account.label)
                busy = self._guarded(self._try, account, "take")
                if busy is None:
                    self._held.add(account)
                    return
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.wait(min(RETRY_EVERY, left)):
                raise LockBusyError(
                    f"another run holds its lock ({busy})", account=account.label
                )

    def confirm(self, account: Account) -> None:
        """Raise `LockLostError` unless this run still holds the lock."""
        with self._guard:
            if account in self._lost or not self._guarded(
                self._confirm, account, "renew"
            ):
                self._lost.add(account)
                raise LockLostError(
                    "this run lost the account's lock (its lease ran out, or the "
                    "connection holding it broke); the account's remaining pages "
                    "were not written",
                    account=account.label,
                )

    def release(self, account: Account) -> None:
        with self._guard:
            if account in self._held:
                self._held.discard(account)
                self._release(account)

    def renew(self) -> None:
        """Keep the held locks alive; called by the heartbeat. A stop ends
        its wait for another writer with `RunInterrupted`."""
        with self._guard, store.lock_waits_end_on(self._stop):
            if self._held:
                self._lost |= self._renew(set(self._held))

    def close(self) -> None:
        """Give back every lock; the object takes no more after this."""
        with self._guard:
            self._closed = True
            for account in list(self._held):
                self._release(account)
            self._held.clear()
            self._close()

    def _guarded(self, step: Callable[[Account], T], account: Account, verb: str) -> T:
        """The step, its database errors named; a stop ends its wait for
        another writer with `RunInterrupted`.

        The step runs under the guard, which every other thread of the run
        that takes, checks or renews a lock then waits for: it waited out
        the busy timeout past a stop, and a page held back by it was written
        after the stop.
        """
        try:
            with store.lock_waits_end_on(self._stop):
                return step(account)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise StoreError(
                f"account {account.label}: could not {verb} its lock: "
                f"{reason[0] if reason else type(exc).__name__}"
            ) from exc

    # -- what each kind of database does ----------------------------------

    @abstractmethod
    def _try(self, account: Account) -> str | None:
        """Take the lock now if free; else describe its holder."""

    @abstractmethod
    def _confirm(self, account: Account) -> bool:
        """Whether the lock is still this run's."""

    @abstractmethod
    def _release(self, account: Account) -> None: ...

    @abstractmethod
    def _renew(self, held: set[Account]) -> set[Account]:
        """Renew; return the accounts whose lock turned out to be lost."""

    def _close(self) -> None:  # noqa: B027 - most kinds hold nothing else
        """Free what the implementation holds besides the locks."""


class AdvisoryLocks(AccountLocks):
    """PostgreSQL: session-level advisory locks on one dedicated connection."""

    def __init__(self, engine: Engine, config: LocksConfig, **options: Any) -> None:
        super().__init__(engine, config, **options)
        self._connection: Connection | None = None
        self._broken = False
        self._alive_at = -math.inf

    def _session(self) -> Connection:
        if self._connection is None:
            # Autocommit: a session lock needs no transaction, and an idle open
            # one would hold back the server's cleanup for the whole run.
            connection = self.engine.connect().execution_options(
                isolation_level="AUTOCOMMIT"
            )
            name = f"task-etl: {self.holder.describe()}"[:APPLICATION_NAME_LIMIT]
            connection.execute(
                text("SELECT set_config('application_name', :name, false)"),
                {"name": name},
            )
            self._connection = connection
        return self._connection

    def _try(self, account: Account) -> str | None:
        key = advisory_key(account)
        session = self._session()
        taken = session.execute(
            text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
        ).scalar_one()
        return None if taken else self._holder_of(session, key)

    def _holder_of(self, session: Connection, key: int) -> str:
        # A bigint key shows in pg_locks as two 32-bit halves.
        unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
        row = session.execute(
            text(
                "SELECT a.application_name, l.pid FROM pg_locks l"
                " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                " AND l.classid = CAST(:high AS oid) AND l.objid = CAST(:low AS oid)"
            ),
            {"high": unsigned >> 32, "low": unsigned & 0xFFFF_FFFF},
        ).first()
        if row is None:
            return "a session that has just let go of it"
        name = row.application_name or ""
        if name.startswith("task-etl: "):
            return name.removeprefix("task-etl: ")
        return f"PostgreSQL backend {row.pid}"

    def _confirm(self, account: Account) -> bool:
        if time.monotonic() - self._alive_at >= SESSION_CHECK_SECONDS:
            self._check_session()
        return not self._broken

    def _release(self, account: Account) -> None:
        if self._connection is None or self._broken:
            return
        try:
            self._connection.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": advisory_key(account)}
            )
        except SQLAlchemyError as exc:
            # The server frees a session's locks when the session ends.
            log.warning(
                "account %s: could not unlock: %s", account.label, store.first_line(exc)
            )
            self._broken = True

    def _renew(self, held: set[Account]) -> set[Account]:
        self._check_session()
        return held if self._broken else set()

    def _check_session(self) -> None:
        """Ask the session holding the locks whether it still lives; if it
        does not, the locks are gone, and `_broken` says so from now on."""
        if self._connection is None or self._broken:
            return
        try:
            self._connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.error(
                "the connection holding the account locks broke (%s); the locks "
                "are gone and their accounts stop being written",
                store.first_line(exc),
            )
            self._broken = True
            return
        self._alive_at = time.monotonic()

    def _close(self) -> None:
        if self._connection is None:
            return
        try:
            if not self._broken:
                self._connection.execute(text("SELECT pg_advisory_unlock_all()"))
                self._connection.execute(text("RESET application_name"))
            self._connection.close()
        except SQLAlchemyError as exc:
            log.warning("closing the lock connection failed: %s", store.first_line(exc))
        self._connection = None


class LeaseLocks(AccountLocks):
    """A row per held account in `account_locks`, valid until its lease ends."""

    def __init__(
        self,
        engine: Engine,
        config: LocksConfig,
        *,
        clock: Callable[[], datetime] = runs.now,
        **options: Any,
    ) -> None:
        super().__init__(engine, config, **options)
        self._clock = clock
        # When each held lease was last renewed, by this run's clock.
        self._renewed: dict[Account, datetime] = {}
        with _OPEN_HOLDERS_GUARD:
            _OPEN_HOLDERS.add(self.holder.id)

    def _try(self, account: Account) -> str | None:
        now = self._clock()
        values = {
            "holder": self.holder.id,
            "host": self.holder.host,
            "pid": self.holder.pid,
            "acquired_at": now,
            "expires_at": self._expiry(now),
        }
        try:
            # On SQLite the engine begins every transaction IMMEDIATE: this
            # read and the write after it cannot interleave with another's.
            with self.engine.begin() as connection:
                row = connection.execute(
                    select(account_locks).where(*_key(account))
                ).first()
                if row is None:
                    connection.execute(
                        insert(account_locks).values(
                            user_id=account.user_id,
                            sub_user_id=account.sub_user_id,
                            **values,
                        )
                    )
                    self._renewed[account] = now
                    return None
                if row.holder != self.holder.id and not self._is_stale(row, now):
                    until = f"{row.expires_at:%H:%M:%S} UTC"
                    return f"host {row.host} pid {row.pid}, lease until {until}"
                connection.execute(
                    update(account_locks).where(*_key(account)).values(**values)
                )
        except IntegrityError:
            return "a run that took it at the same moment"
        self._renewed[account] = now
        if row.holder != self.holder.id:
            log.warning(
                "account %s: took over the lock of host %s pid %s, %s",
                account.label,
                row.host,
                row.pid,
                _why_stale(row, now),
            )
        return None

    def _is_stale(self, row: Any, now: datetime) -> bool:
        if row.expires_at <= now:
            return True
        if _is_this_process(row):
            # A run of this process that ended without letting go: a stopped
            # run's releases do not wait for another writer (see `_release`).
            with _OPEN_HOLDERS_GUARD:
                return row.holder not in _OPEN_HOLDERS
        # On this host a pid settles it at once; the lease covers other hosts.
        return bool(row.host == self.holder.host and not runs.is_alive(row.pid))

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.config.lease)

    def _confirm(self, account: Account) -> bool:
        renewed = self._renewed.get(account)
        fresh = timedelta(seconds=self.config.lease / 3)
        if renewed is not None and self._clock() - renewed < fresh:
            # No other run may take a lease over before it runs out, so one
            # renewed this recently is still ours: checking it before every
            # page would cost a commit per page.
            return True
        # Renewing is also the check: a holder that was suspended past its
        # lease finds its row taken and writes nothing.
        return self._renew_rows({account}) == {account}

    def _release(self, account: Account) -> None:
        self._renewed.pop(account, None)
        try:
            # Once the run is stopped, a release gives up at once when another
            # process holds the write lock: waiting `database.busy_timeout`
            # for each account held, a stop took minutes. The lease, the pid
            # on this host, and in this process `_is_stale`, free it instead.
            with store.lock_waits_end_on(self._stop), self.engine.begin() as conn:
                conn.execute(
                    delete(account_locks).where(
                        *_key(account), account_locks.c.holder == self.holder.id
                    )
                )
        except (SQLAlchemyError, RunInterrupted) as exc:
            log.warning(
                "account %s: could not release the lock; its lease of %s s will "
                "free it: %s",
                account.label,
                self.config.lease,
                store.first_line(exc),
            )

    def _close(self) -> None:
        with _OPEN_HOLDERS_GUARD:
            _OPEN_HOLDERS.discard(self.holder.id)

    def _renew(self, held: set[Account]) -> set[Account]:
        kept = self._renew_rows(held)
        for account in held - kept:
            log.error("account %s: this run's lock was taken over", account.label)
        return held - kept

    def _renew_rows(self, accounts: set[Account]) -> set[Account]:
        now = self._clock()
        expires = self._expiry(now)
        mine = account_locks.c.holder == self.holder.id
        with self.engine.begin() as connection:
            connection.execute(
                update(account_locks).where(mine).values(expires_at=expires)
            )
            rows = connection.execute(
                select(account_locks.c.user_id, account_locks.c.sub_user_id).where(mine)
            ).all()
        kept = {(row.user_id, row.sub_user_id) for row in rows}
        renewed = {a for a in accounts if (a.user_id, a.sub_user_id) in kept}
        self._renewed.update(dict.fromkeys(renewed, now))
        return renewed


# The holders of this process's lease locks not yet closed: a lock row of this
# host and pid whose holder is not among them was left by an ended run.
_OPEN_HOLDERS: set[str] = set()
_OPEN_HOLDERS_GUARD = threading.Lock()


def _is_this_process(row: Any) -> bool:
    return bool(row.host == socket.gethostname() and row.pid == os.getpid())


def _why_stale(row: Any, now: datetime) -> str:
    if row.expires_at <= now:
        return "whose lease ran out"
    if _is_this_process(row):
        return "left by an earlier run of this process"
    return "which is gone"


def open_locks(
    engine: Engine, config: LocksConfig, *, stop: threading.Event | None = None
) -> AccountLocks:
    """The kind of locks the database supports best."""
    if engine.dialect.name == "postgresql":
        return AdvisoryLocks(engine, config, stop=stop)
    return LeaseLocks(engine, config, stop=stop)


class Heartbeat:
    """Marks a run alive and renews its locks every third of the lease.

    A run whose heartbeat is older than the lease belongs to a process that
    is gone (or hung), wherever it ran: the next run marks it abandoned. A
    beat that finds its run so marked stops the run.
    """

    def __init__(
        self,
        engine: Engine,
        guard: runs.RunGuard,
        locks: AccountLocks,
        stop: threading.Event | None = None,
    ) -> None:
        self._engine = engine
        self._guard = guard
        self._locks = locks
        self._stop = stop or threading.Event()
        self._every = locks.config.lease / 3
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat-{guard.run_id}", daemon=True
        )

    def start(self) -> None:
        start_leaving_signals(self._thread)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=self._every + 5)

    def _beat(self) -> None:
        while not self._done.wait(self._every):
            try:
                # A stopped run ends soon: the end waited for a beat that
                # waited out another writer, up to the busy timeout.
                with store.lock_waits_end_on(self._stop):
                    self._guard.beat(self._engine)
                self._locks.renew()
            except RunAbandoned:
                # Its guard now refuses the run's every write: the run ends,
                # and says why.
                self._stop.set()
                return
            except SQLAlchemyError as exc:
                # A missed beat is no harm while the lease is longer; retry.
                log.warning(
                    "run %s: heartbeat failed: %s",
                    self._guard.run_id,
                    store.first_line(exc),
                )
            except RunInterrupted:
                continue  # stopped: the run gives its locks back next


@contextmanager
def hold(
    engine: Engine,
    config: LocksConfig,
    guard: runs.RunGuard,
    *,
    stop: threading.Event | None = None,
) -> Iterator[AccountLocks]:
    """Locks for one run, with its heartbeat; everything is given back after."""
    locks = open_locks(engine, config, stop=stop)
    heartbeat = Heartbeat(engine, guard, locks, stop=stop)
    heartbeat.start()
    try:
        yield locks
    finally:
        heartbeat.stop()
        locks.close()


def _key(account: Account) -> tuple[Any, Any]:
    return (
        account_locks.c.user_id == account.user_id,
        account_locks.c.sub_user_id == account.sub_user_id,
    )
