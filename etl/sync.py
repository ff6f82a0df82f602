"""A run: resolve the accounts, walk them, store every page, record the outcome.

Accounts are walked, and main accounts' sub-accounts listed, by a pool of
fetching threads under the client's global rate limit. Every page goes
through one bounded queue to this module's single writer, so the database
sees one writer per run (SQLite allows no more, and it keeps the history
free of races between accounts listing the same task) and memory stays
bounded by the queue, not by the data.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from etl import archive, garbage, locks, rollup, runs, store
from etl.accounts import ID_LENGTH, Account
from etl.client import Client, Page
from etl.config import Config, MainAccount
from etl.errors import (
    ApiError,
    ArchiveError,
    EtlError,
    LockBusyError,
    LockTimeoutError,
    RunAbandoned,
    RunInterrupted,
    RunNotBegun,
    StopNotRecorded,
    StoreError,
    bare_traceback,
)
from etl.parse import RejectedItem, clean, identify_task, to_text
from etl.store import PageBatch, PageCounts, Reject
from etl.threads import start_leaving_signals

log = logging.getLogger(__name__)

# 4: nothing failed, but another run held the lock of some account (or of
# every one: outcome "skipped"); 130: stopped by a signal, as shells report.
EXIT_CODES = {
    "succeeded": 0,
    "failed": 1,
    "partial": 3,
    "skipped": 4,
    "stopped": 130,
}
EXIT_SKIPPED = 4
# How often the writer and the stop watcher look up from waiting.
POLL_SECONDS = 0.1
# Pages queued together that the writer stores in one transaction at most.
PAGES_PER_TRANSACTION = 16
# Pages the queue holds beyond two per fetching thread (see `_Run`).
EXTRA_QUEUED_PAGES = 8


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    kind: str
    outcome: str
    accounts: int
    accounts_failed: int
    pages: int
    counts: PageCounts
    errors: tuple[str, ...]
    seconds: float
    accounts_skipped: int = 0

    @property
    def exit_code(self) -> int:
        if self.outcome == "succeeded" and self.accounts_skipped:
            return EXIT_SKIPPED
        return EXIT_CODES.get(self.outcome, 1)


@dataclass(frozen=True)
class Filters:
    """Narrow a walk. A filtered walk never marks anything removed."""

    name: str | None = None
    statuses: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return self.name is None and not self.statuses


@dataclass(frozen=True)
class Progress:
    """How far a run has got, for a progress display."""

    done: int
    total: int
    pages: int
    tasks: int
    unit: str = "accounts"


@dataclass(frozen=True)
class _WalkEnd:
    account: Account
    started: datetime
    complete: bool
    error: str | None
    skipped: str | None = None


@dataclass(frozen=True)
class _Discover:
    """A walker's job: list the sub-accounts of a main account."""

    main: MainAccount


@dataclass(frozen=True)
class _Discovered:
    """The sub-accounts a discovery listed (or earlier runs found, when the
    list failed), for the writer to add to the run."""

    user_id: str
    accounts: list[Account]


@dataclass
class _AccountState:
    started: datetime | None = None
    previous_complete: datetime | None = None
    seen: store.SeenIds = field(default_factory=store.SeenIds)
    failed: bool = False
    error: str | None = None
    walk_started: datetime | None = None
    pages: int = 0
    tasks_seen: int = 0
    ended: bool = False
    skipped: bool = False
    # Set by the walker before it queues a page: no task of the account was
    # stored and listed when its walk began (see `_settle`).
    began_empty: bool = False


def run_sync(
    config: Config,
    *,
    kind: str = "sync",
    only: Sequence[str] = (),
    filters: Filters = Filters(),
    engine: Engine | None = None,
    client: Client | None = None,
    progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    deadline: float | None = None,
) -> RunSummary:
    """One run over the configured accounts (or those named in `only`).

    Setting `stop` ends the run after the pages being written, recorded as
    "stopped"; a run still going `deadline` seconds after it began ends the
    same way, recorded as "failed". Walks stop between pages and in retry
    sleeps; an HTTP read in flight is bounded by `api.read_timeout`.
    """
    engine = engine or store.connect(config.database)
    store.check_schema(engine)
    halt = threading.Event()
    own_client = client is None
    client = client or make_client(config, sleep=interruptible_sleep(halt))
    run = _Run(config, engine, client, kind, filters, progress, halt)
    try:
        with garbage.looking_less_often():
            summary = run.execute(only, stop=stop, deadline=deadline)
    except SQLAlchemyError as exc:
        # Outside a page (a file locked past the busy timeout, a server gone):
        # the run cannot go on, and says so in one line.
        if run.halted_by == "stopped":
            # Recording the stop, or the walks it cut short, which another
            # writer held up past the busy timeout: it read as a failure of
            # its own, exit 1.
            raise StopNotRecorded(
                f"stopped, but the stop could not be recorded: {describe_crash(exc)};"
                " the next run marks this one abandoned"
            ) from exc
        raise StoreError(describe_crash(exc)) from exc
    finally:
        if own_client:
            client.close()
    rollup.refresh_after_run(engine, config.api.zone)
    return summary


def describe_crash(exc: BaseException) -> str:
    """What a run's record says of an error that ended it outside any
    account: the database's own words, ours, or that the run crashed."""
    if isinstance(exc, SQLAlchemyError):
        return f"the database failed: {store.first_line(exc)}"
    if isinstance(exc, EtlError):
        return str(exc)
    return "the run crashed"


def make_client(config: Config, sleep: Callable[[float], None] = time.sleep) -> Client:
    tokens = {account.user_id: account.token for account in config.accounts}
    return Client(config.api, {k: v for k, v in tokens.items() if v}, sleep=sleep)


def interruptible_sleep(halt: threading.Event) -> Callable[[float], None]:
    """A sleep for the client's retries and rate limit that a halt cuts short."""

    def sleep(seconds: float) -> None:
        if halt.wait(seconds):
            raise RunInterrupted("the run was stopped")

    return sleep


class _Run:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        client: Client,
        kind: str,
        filters: Filters,
        progress: Callable[[Progress], None] | None = None,
        halt: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.walks_ended = 0
        self.recorders: dict[Account, archive.WalkRecorder] = {}
        self.engine = engine
        self.client = client
        self.kind = kind
        self.filters = filters
        self.counts = PageCounts()
        self.pages = 0
        self.errors: list[str] = []
        # Failed lists of sub-accounts by main account, set by the walkers;
        # the run reports them first, in the configuration's order.
        self.list_errors: dict[str, str] = {}
        self.states: dict[Account, _AccountState] = {}
        self.discovery_errors: dict[tuple[str, str], str] = {}
        # The accounts named by `only` (all when empty), and the keys of
        # those taken into the run so far.
        self.wanted: set[str] = set()
        self.keys: set[tuple[str, str]] = set()
        # The walkers' jobs: main accounts to discover, then accounts to
        # walk, and once no more can come, one None for each walker.
        self.jobs: queue.SimpleQueue[_Discover | Account | None] = queue.SimpleQueue()
        self.walkers = 0
        # Kept by the writer: walks not ended, main accounts whose discovery
        # it has not had yet, and the ends of walks held until it has.
        self.walking = 0
        self.discovering: dict[str, MainAccount] = {}
        self.held_ends: dict[str, list[_WalkEnd]] = {}
        # Set to end the walks: by a stop request, the deadline, or an error.
        self.stop = halt or threading.Event()
        self.halted_by: str | None = None
        self.cut_short = False
        self.locks: locks.AccountLocks | None = None
        # Room for two pages per fetcher keeps them busy while the writer
        # works, and bounds memory whatever the number of pages. A few more
        # let the writer take more pages into each transaction, each of
        # which costs it several waits for Python's lock: with four fetchers
        # and room for two each only, a first sync of 100,000 tasks took a
        # tenth longer. A few, not more per fetcher: the queued pages of a
        # re-sync keep their items, and with 64 fetchers and room for four
        # each, a re-sync's peak memory grew by a quarter.
        self.queue: queue.Queue[PageBatch | _WalkEnd | _Discovered] = queue.Queue(
            maxsize=2 * config.api.parallelism + EXTRA_QUEUED_PAGES
        )
        # An item taken from the queue but not yet handled (see
        # `_pages_together`).
        self.put_back: PageBatch | _WalkEnd | _Discovered | None = None

    def execute(
        self,
        only: Sequence[str],
        *,
        stop: threading.Event | None = None,
        deadline: float | None = None,
    ) -> RunSummary:
        began = time.monotonic()
        watcher = self._watch(stop, deadline)
        run_id = self._start(watcher, deadline)
        holding = locks.hold(self.engine, self.config.locks, self.guard, stop=self.stop)
        try:
            with holding as self.locks:
                self._walk_all(only)
                self._end_cut_walks(deadline)
        except RunInterrupted:
            self.cut_short = True
            self._end_cut_walks(deadline)
        except BaseException as exc:
            self.stop.set()
            if not self.guard.abandoned:
                runs.finish_run(
                    self.engine,
                    run_id,
                    "failed",
                    self.counts,
                    accounts_total=len(self.states),
                    accounts_failed=len(self.states),
                    pages=self.pages,
                    errors=self._errors() or [describe_crash(exc)],
                )
            raise
        finally:
            self.stop.set()
            watcher.join()

        self.guard.check()
        failed = sum(1 for state in self.states.values() if state.failed)
        skipped = sum(1 for state in self.states.values() if state.skipped)
        outcome = self._outcome(failed, skipped)
        runs.finish_run(
            self.engine,
            run_id,
            outcome,
            self.counts,
            accounts_total=len(self.states),
            accounts_failed=failed,
            pages=self.pages,
            errors=self._errors(),
            accounts_skipped=skipped,
        )
        summary = RunSummary(
            run_id=run_id,
            kind=self.kind,
            outcome=outcome,
            accounts=len(self.states),
            accounts_failed=failed,
            pages=self.pages,
            counts=self.counts,
            errors=tuple(self._errors()),
            seconds=time.monotonic() - began,
            accounts_skipped=skipped,
        )
        _log_summary(summary)
        return summary

    def _start(self, watcher: threading.Thread, deadline: float | None) -> int:
        """Record the run's start; its id.

        On SQLite that waits for another process's writer, which a stop or
        the deadline ends like the wait of a page, before anything is done.
        """
        try:
            with store.lock_waits_end_on(self.stop):
                self.guard = runs.start_guarded_run(
                    self.engine, self.kind, lease=self.config.locks.lease
                )
        except BaseException as exc:
            self.stop.set()
            watcher.join()
            if isinstance(exc, RunInterrupted):
                raise self._not_begun(deadline) from None
            if isinstance(exc, Exception) and store.is_lock_wait(exc):
                waited = self.config.database.busy_timeout
                raise StoreError(
                    f"the run had not begun after {waited:g} s"
                    " (database.busy_timeout), waiting for another writer of the"
                    f" database: {store.first_line(exc)}"
                ) from exc
            raise
        self.run_id = self.guard.run_id
        # Each page's transaction confirms that the run may still write.
        self.writer = store.PageWriter(self.engine, confirm=self.guard.confirm)
        return self.run_id

    def _not_begun(self, deadline: float | None) -> RunNotBegun:
        waiting = "while waiting for another writer of the database"
        if self.halted_by == "deadline":
            return RunNotBegun(
                f"deadline exceeded: the run had not begun after {deadline:g} s "
                f"(schedule.deadline), {waiting}",
                exit_code=EXIT_CODES["failed"],
            )
        return RunNotBegun(
            f"stopped before the run began, {waiting}", exit_code=EXIT_CODES["stopped"]
        )

    def _watch(
        self, stop: threading.Event | None, deadline: float | None
    ) -> threading.Thread:
        """Halt the walks when a stop is requested or the deadline passes."""
        ends = time.monotonic() + deadline if deadline else float("inf")

        if stop is not None and stop.is_set():
            # Stopped already, during a backfill's check of its selectors:
            # the run asks the platform for nothing more.
            self.halted_by = "stopped"
            self.stop.set()

        def watch() -> None:
            while not self.stop.wait(POLL_SECONDS):
                if stop is not None and stop.is_set():
                    self.halted_by = "stopped"
                    log.info("stopping the run after the pages being written")
                elif time.monotonic() >= ends:
                    self.halted_by = "deadline"
                else:
                    continue
                self.stop.set()

        thread = threading.Thread(target=watch, name="run-watch", daemon=True)
        start_leaving_signals(thread)
        return thread

    def _end_cut_walks(self, deadline: float | None) -> None:
        """Record the walks a halt cut short; nothing of them is removed."""
        self.guard.check()
        cut = [account for account, state in self.states.items() if not state.ended]
        self.cut_short = self.cut_short or bool(cut)
        if not self.cut_short:
            return
        if self.halted_by == "deadline":
            message = (
                f"deadline exceeded: the run was still going after {deadline:g} s "
                "(schedule.deadline) and was stopped"
            )
            log.error("run %s: %s", self.run_id, message)
            self.errors.append(message)
        for account in cut:
            state = self.states[account]
            if self.halted_by == "deadline":
                # Counted failed even if never begun: the run was due to
                # sync it and did not, and the summary must not say none
                # failed. Its record is left alone, as no walk began.
                state.failed = True
                state.error = state.error or "deadline exceeded"
            if state.walk_started is None:
                continue
            outcome = "failed" if state.failed else "stopped"
            runs.record_account(
                self.engine,
                account,
                self.run_id,
                started=state.walk_started,
                outcome=outcome,
                error=self._error(account),
                complete=False,
                guard=self.guard,
            )
            self._record_walk(account, outcome)

    def _outcome(self, failed: int, skipped: int) -> str:
        if self.cut_short and self.halted_by == "stopped":
            return "stopped"
        if self.cut_short and self.halted_by == "deadline":
            return "failed"
        walked = len(self.states) - skipped
        if skipped and not walked and not self._errors():
            return "skipped"
        return _outcome(walked, failed, len(self._errors()))

    def _errors(self) -> list[str]:
        """The run's errors: failed lists of sub-accounts first, as when
        every list was read before any walk, whatever order they failed in."""
        mains = dict.fromkeys(main.user_id for main in self.config.accounts)
        lists = [self.list_errors[m] for m in mains if m in self.list_errors]
        return lists + self.errors

    def _record_walk(self, account: Account, outcome: str) -> None:
        state = self.states[account]
        runs.record_walk(
            self.engine,
            self.run_id,
            account,
            outcome=outcome,
            started=state.walk_started or runs.now(),
            pages=state.pages,
            tasks_seen=state.tasks_seen,
            error=self._error(account),
            guard=self.guard,
        )

    def _error(self, account: Account) -> str | None:
        """What to record as the account's error: its walk's, and a failed
        discovery of sub-accounts that it carries, or its record would look
        fine while the list of sub-accounts is failing (see `_discover`)."""
        parts = (self.states[account].error, self.discovery_errors.get(_key(account)))
        return "; ".join(part for part in parts if part) or None

    def _walk_all(self, only: Sequence[str]) -> None:
        """Walk the configured accounts while the main accounts' sub-accounts
        are discovered, and those as they are found.

        Each discovery is a walker's job, queued before the walks: one
        walker asks for every list before any walk, as a run did before it
        discovered in parallel, and several start walking at once instead
        of waiting for the lists.
        """
        if self.stop.is_set():
            # Stopped already, during a backfill's check of its selectors.
            raise RunInterrupted("the run was stopped")
        self.wanted = set(only)
        configured = self._new_accounts(
            account for main in self.config.accounts for account in _configured(main)
        )
        runs.register_accounts(self.engine, configured, guard=self.guard)
        for main in self.config.accounts:
            # Once for each main account, should a Config name one twice.
            if main.discover_sub_accounts and main.user_id not in self.discovering:
                self.discovering[main.user_id] = main
                self.jobs.put(_Discover(main))
        for account in configured:
            self._add(account)
        walkers = self._start_walkers()
        if not self.discovering:
            self._no_more_jobs()
        try:
            with self.writer:
                self._write_until_done()
        except BaseException:
            # Release fetchers blocked on the full queue, or waiting for
            # them would last for ever.
            self.stop.set()
            raise
        finally:
            if not self.stop.is_set():
                for thread in walkers:
                    thread.join()

    def _new_accounts(self, accounts: Iterable[Account]) -> list[Account]:
        """Those of `accounts` that the run wants and does not have yet."""
        new = []
        for account in accounts:
            key = _key(account)
            wanted = not self.wanted or bool(
                {account.label, account.user_id} & self.wanted
            )
            if wanted and key not in self.keys:
                self.keys.add(key)
                new.append(account)
        return new

    def _add(self, account: Account) -> None:
        self.states[account] = _AccountState()
        self.walking += 1
        self.jobs.put(account)

    def _no_more_jobs(self) -> None:
        """Every account of the run is known: name those asked for but not
        found, and let each walker end once the walks queued are taken."""
        found = {a.label for a in self.states} | {a.user_id for a in self.states}
        for label in sorted(self.wanted - found):
            self.errors.append(f"account {label}: not configured or discovered")
        for _ in range(self.walkers):
            self.jobs.put(None)

    def _start_walkers(self) -> list[threading.Thread]:
        """Threads that take the jobs, api.parallelism at a time.

        Daemon threads: a walk that a halt cut short while it waited for an
        HTTP answer holds back neither the run nor the process's exit, which
        would otherwise wait for that answer or api.read_timeout and its
        retries. Its page would be dropped anyway.
        """

        def work_until_no_more() -> None:
            while not self.stop.is_set():
                try:
                    job = self.jobs.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                if job is None:
                    return
                if isinstance(job, _Discover):
                    self._discover(job.main)
                else:
                    self._fetch(job)

        parallelism = self.config.api.parallelism
        # How many accounts discovery adds is not known yet.
        jobs = len(self.states) if not self.discovering else parallelism
        self.walkers = max(1, min(parallelism, jobs))
        threads = [
            threading.Thread(target=work_until_no_more, name=f"walk-{n}", daemon=True)
            for n in range(self.walkers)
        ]
        for thread in threads:
            start_leaving_signals(thread)
        return threads

    def _discover(self, main: MainAccount) -> None:
        """List a main account's sub-accounts in a walker thread.

        A failed list is kept here, not by the writer, so that a stop coming
        right after it still reports it.
        """
        listed: list[Account] = []
        try:
            listed, error = _discover_or_recall(
                self.client, main.user_id, self.engine, self.stop
            )
        except RunInterrupted:
            return  # the run is ending and waits for nothing more
        except Exception as exc:  # a bug must fail the list, not hang the run
            log.error(
                "unexpected error listing the sub-accounts of %s\n%s",
                main.user_id,
                bare_traceback(exc),
            )
            error = (
                f"sub-account discovery failed: internal error "
                f"({type(exc).__name__}); see the log"
            )
        if self.stop.is_set():
            return  # an answer that came after a stop, like a walk's page
        if error is not None:
            self.list_errors[main.user_id] = error
            # The main account's record shows it; without a walk of its
            # own, the record of every sub-account walked in its stead.
            carriers = [Account(main.user_id)] if main.sync_own_tasks else listed
            self.discovery_errors.update((_key(a), error) for a in carriers)
        self._put(_Discovered(main.user_id, listed))

    def _fetch(self, account: Account) -> None:
        """Walk one account in a walker thread and queue what it finds."""
        refused = self._take_lock(account)
        if refused is not None:
            self._put(refused)
            return
        started = runs.now()
        self.states[account].walk_started = started
        recorder = archive.WalkRecorder(
            self.config.archive,
            account,
            run_id=self.run_id,
            kind=self.kind,
            started=started,
        )
        self.recorders[account] = recorder
        try:
            # Every task of an account with none stored is new and will be
            # written: parsed here, it is parsed while the writer waits on
            # the database. Otherwise most tasks are unchanged, and the
            # writer parses only those it writes.
            dialect = self.engine.dialect.name
            prepare = not store.has_listed_tasks(self.engine, account)
            self.states[account].began_empty = prepare
            walk = self.client.walk_tasks(
                account, name=self.filters.name, statuses=self.filters.statuses
            )
            for page in walk:
                if self.stop.is_set() or self.states[account].failed:
                    self._put(_WalkEnd(account, started, False, None))
                    return
                # Archived before it is stored, so no stored page is missing
                # from the archive, and a failure stops the walk here.
                recorder.add(page)
                batch = parse_page(page, self.config.api.zone)
                self._put(batch.prepared(dialect) if prepare else batch)
            self._put(_WalkEnd(account, started, walk.is_complete, None))
        except RunInterrupted:
            self._put(_WalkEnd(account, started, False, None))
        except EtlError as exc:
            self._put(_WalkEnd(account, started, False, str(exc)))
        except Exception as exc:  # a bug must fail one account, not hang the run
            log.error(
                "unexpected error walking account %s\n%s",
                account.label,
                bare_traceback(exc),
            )
            # The type only: an exception's text can quote a task's data.
            error = f"internal error ({type(exc).__name__}); see the log"
            self._put(_WalkEnd(account, started, False, error))

    def _take_lock(self, account: Account) -> _WalkEnd | None:
        """Lock the account for this run, or say why the walk cannot start."""
        assert self.locks is not None, "locks are taken inside locks.hold()"
        try:
            self.locks.acquire(account)
        except RunInterrupted:
            return _WalkEnd(account, runs.now(), False, None)  # cut short
        except LockBusyError as exc:
            log.warning("%s; skipped", exc)
            return _WalkEnd(account, runs.now(), False, None, skipped=str(exc))
        except EtlError as exc:
            return _WalkEnd(account, runs.now(), False, str(exc))
        return None

    def _put(self, item: PageBatch | _WalkEnd | _Discovered) -> None:
        while True:
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if self.stop.is_set():
                    return

    def _write_until_done(self) -> None:
        # A halt ends the loop after the pages being written; queued pages
        # are dropped, and their walks count as cut short.
        while (self.walking or self.discovering) and not self.stop.is_set():
            item = self._next_item()
            if item is None:
                continue
            if self.stop.is_set():
                break
            if isinstance(item, _Discovered):
                self._add_discovered(item)
            elif isinstance(item, _WalkEnd):
                self._walk_ended(item)
            else:
                self._write(self._pages_together(item))

    def _next_item(self) -> PageBatch | _WalkEnd | _Discovered | None:
        """The item put back by `_pages_together`, or the next one queued;
        None after `POLL_SECONDS` without one."""
        if self.put_back is not None:
            item, self.put_back = self.put_back, None
            return item
        try:
            return self.queue.get(timeout=POLL_SECONDS)
        except queue.Empty:
            return None

    def _pages_together(self, first: PageBatch) -> list[PageBatch]:
        """The page with the pages queued right behind it, to be written in
        one transaction.

        Each statement of a page is one more wait for Python's lock, which
        the database driver gives up while the database works, and a
        fetching thread then holds: in a re-sync, where the writer sets the
        pace, those waits were most of its time. A page sharing a task with
        the ones taken, or any other item, ends them and is put back.
        """
        pages = [first]
        uuids = {record.uuid for record in first.records}
        while len(pages) < PAGES_PER_TRANSACTION:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, PageBatch) or not uuids.isdisjoint(
                record.uuid for record in item.records
            ):
                self.put_back = item
                break
            pages.append(item)
            uuids.update(record.uuid for record in item.records)
        return pages

    def _add_discovered(self, found: _Discovered) -> None:
        new = self._new_accounts(found.accounts)
        # Written between pages: a halt ends its wait for SQLite's write
        # lock like theirs.
        with store.lock_waits_end_on(self.stop):
            runs.register_accounts(self.engine, new, guard=self.guard)
        for account in new:
            self._add(account)
        del self.discovering[found.user_id]
        for held in self.held_ends.pop(found.user_id, []):
            self._walk_ended(held)
        if not self.discovering:
            self._no_more_jobs()

    def _walk_ended(self, end: _WalkEnd) -> None:
        main = self.discovering.get(end.account.user_id)
        if main is not None and end.account.is_main == main.sync_own_tasks:
            # A record that would carry a failed list of its main account's
            # sub-accounts (see `_discover`) waits for the list; and so does
            # the release of the account's lock.
            self.held_ends.setdefault(main.user_id, []).append(end)
            return
        self._end_walk(end)
        self.walking -= 1

    def _write(self, pages: list[PageBatch]) -> None:
        # A halt drops the pages while they wait for SQLite's write lock,
        # held by another process, instead of writing them after the stop.
        with store.lock_waits_end_on(self.stop):
            ready = [batch for batch in pages if self._is_ready(batch)]
            if len(ready) > 1 and self._write_together(ready):
                return
            for batch in ready:
                self._write_one(batch)

    def _is_ready(self, batch: PageBatch) -> bool:
        """Whether the page can be written: its account has not failed, and
        this run still holds the account's lock."""
        state = self.states[batch.account]
        if state.failed:
            return False
        if state.started is None:
            state.previous_complete = runs.previous_complete(self.engine, batch.account)
            state.started = batch.fetched_at
        assert self.locks is not None, "locks are taken inside locks.hold()"
        try:
            self.locks.confirm(batch.account)
        except RunInterrupted:
            raise  # not the account's fault: the run ends as cut short
        except EtlError as exc:
            self._fail(batch.account, str(exc))
            return False
        return True

    def _write_together(self, pages: list[PageBatch]) -> bool:
        """Write the pages in one transaction; False if it failed."""
        try:
            counts = self.writer.write_together(
                self.run_id,
                [(b, self.states[b.account].previous_complete) for b in pages],
            )
        except LockTimeoutError as exc:
            # Another writer held its lock the whole busy timeout: each page
            # on its own would wait as long again, and so would the run.
            reason = exc.__cause__ or exc
            for batch in pages:
                if not self.states[batch.account].failed:
                    message = store.not_written([(batch, None)], reason)
                    self._fail(batch.account, message)
            return True
        except StoreError as exc:
            # One page's error must fail its own account only, named with
            # its page: each is written again on its own.
            log.debug("%s; writing them one at a time", exc)
            return False
        for batch, page_counts in zip(pages, counts, strict=True):
            self._count(batch, page_counts)
        return True

    def _write_one(self, batch: PageBatch) -> None:
        state = self.states[batch.account]
        if state.failed:
            return
        try:
            counts = self.writer.write(self.run_id, batch, state.previous_complete)
        except RunInterrupted:
            raise  # not the account's fault: the run ends as cut short
        except EtlError as exc:
            self._fail(batch.account, str(exc))
            return
        self._count(batch, counts)

    def _count(self, batch: PageBatch, counts: PageCounts) -> None:
        state = self.states[batch.account]
        state.pages += 1
        state.tasks_seen += len(batch.records)
        state.seen.update(record.uuid for record in batch.records)
        self.counts.add(counts)
        self.pages += 1
        self._report_progress()

    def _end_walk(self, end: _WalkEnd) -> None:
        state = self.states[end.account]
        state.ended = True
        if end.skipped is not None:
            state.skipped, state.error = True, end.skipped
            state.walk_started = end.started
            self._record_walk(end.account, "skipped")
            self.walks_ended += 1
            self._report_progress()
            return
        if end.error and not state.failed:
            self._fail(end.account, end.error)
        complete = end.complete and not state.failed and self.filters.is_empty
        if complete:
            complete = self._listed_each_once(end.account, state)
        # One moment for the end marker, the removals and the account's
        # record, so that a replay of the archive reproduces all three.
        ended = runs.now()
        recorder = self.recorders.pop(end.account, None)
        complete = self._archive_end(recorder, end.account, complete, ended)
        if complete:
            try:
                removed = self._settle(end.account, state, ended)
            except RunAbandoned:
                raise  # not the account's fault: the run writes nothing more
            except EtlError as exc:
                # The pages are stored; the next complete walk marks removals.
                self._fail(end.account, str(exc))
                complete, removed = False, 0
                # The marker says complete: a replay would settle the tasks
                # this run could not, and count the walk as one of the two
                # complete walks a removal needs.
                self._archive_end(recorder, end.account, complete, ended)
            self.counts.removed += removed
            self.counts.status_changes += removed
        outcome = "failed" if state.failed else "succeeded"
        runs.record_account(
            self.engine,
            end.account,
            self.run_id,
            started=end.started,
            outcome=outcome,
            error=self._error(end.account),
            complete=complete,
            finished=ended,
            guard=self.guard,
        )
        self._record_walk(end.account, outcome)
        assert self.locks is not None, "locks are taken inside locks.hold()"
        self.locks.release(end.account)
        state.seen = store.SeenIds()
        self.walks_ended += 1
        self._report_progress()

    def _listed_each_once(self, account: Account, state: _AccountState) -> bool:
        """Whether the walk listed no task twice; if it did, it says so.

        A list whose order is not stable between pages (ties in its sort
        key, or a task moved while the walk went on) shows one task twice,
        on pages that need not be next to each other, and hides another
        one, with every page full and the total adding up: such a walk
        must mark no task removed.
        """
        repeats = state.seen.repeats()
        if repeats:
            log.warning(
                "account %s, endpoint %s: the walk listed tasks it had listed"
                " already (%s time(s)); the list shifted or its order is not"
                " stable, so this walk marks no removals",
                account.label,
                self.config.api.endpoints.task_list,
                repeats,
            )
        return not repeats

    def _settle(self, account: Account, state: _AccountState, ended: datetime) -> int:
        """Settle the removals after a complete walk; the count removed.

        A walk that began with nothing of its account listed stored every
        listed task of the account itself: only its lock holder writes
        tasks of an account, so none was missed and none is flagged.
        Reading them all back was half of what a first sync of several
        accounts did after its last page arrived.
        """
        if state.began_empty:
            return 0
        return store.mark_removals(
            self.engine,
            self.run_id,
            account,
            state.seen,
            ended,
            state.previous_complete,
            confirm=self.guard.confirm,
        )

    def _archive_end(
        self,
        recorder: archive.WalkRecorder | None,
        account: Account,
        complete: bool,
        ended: datetime,
    ) -> bool:
        """Write the walk's end marker; if that fails, so does the account."""
        state = self.states[account]
        if recorder is None:
            return complete
        try:
            recorder.finish(
                ended=ended, complete=complete, failed=state.failed, error=state.error
            )
        except ArchiveError as exc:
            self._fail(account, str(exc))
            return False
        return complete

    def _fail(self, account: Account, message: str) -> None:
        named = f"account {account.label}"
        # Most errors name the account, endpoint and page already; the run's
        # errors and this line must name it exactly once.
        if not message.startswith((f"{named},", f"{named}:")):
            message = f"{named}: {message}"
        log.error("%s", message)
        state = self.states[account]
        state.failed = True
        state.error = state.error or message
        self.errors.append(message)

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress(
                Progress(
                    done=self.walks_ended,
                    total=len(self.states),
                    pages=self.pages,
                    tasks=self.counts.seen,
                )
            )


def parse_page(page: Page, zone: tzinfo) -> PageBatch:
    """Identify a page's tasks for the store, which parses those it writes;
    refused items are kept."""
    records, rejects = [], []
    for item in page.items:
        try:
            records.append(identify_task(item, page.account, zone))
        except RejectedItem as exc:
            log.warning(
                "account %s, endpoint %s, page %s: item rejected: %s",
                page.account.label,
                page.endpoint,
                page.number,
                exc,
            )
            rejects.append(Reject(str(exc), clean(item) if exc.kept else None))
    return PageBatch(
        account=page.account,
        endpoint=page.endpoint,
        number=page.number,
        fetched_at=page.fetched_at,
        records=records,
        rejects=rejects,
    )


def resolve_accounts(
    config: Config,
    client: Client,
    engine: Engine | None = None,
    stop: threading.Event | None = None,
) -> tuple[list[Account], list[str]]:
    """The accounts of a run: configured ones, then discovered sub-accounts;
    once `stop` is set, only those found by then. A run finds them as it
    walks; this is for checking what a run would walk before it begins."""
    found: dict[tuple[str, str], Account] = {}
    errors: list[str] = []
    for main in config.accounts:
        if stop is not None and stop.is_set():
            break
        found.update((_key(account), account) for account in _configured(main))
        if not main.discover_sub_accounts:
            continue
        try:
            listed, error = _discover_or_recall(client, main.user_id, engine, stop)
        except RunInterrupted:
            break  # stopped in a retry's or the rate limit's wait
        for account in listed:
            found.setdefault(_key(account), account)
        if error is not None:
            errors.append(error)
    return list(found.values()), errors


def _configured(main: MainAccount) -> list[Account]:
    """The accounts that the configuration names for a main account."""
    own = [Account(main.user_id, "", main.name)] if main.sync_own_tasks else []
    return own + [Account(main.user_id, sub) for sub in main.sub_accounts]


def _discover_or_recall(
    client: Client,
    user_id: str,
    engine: Engine | None,
    stop: threading.Event | None = None,
) -> tuple[list[Account], str | None]:
    """A main account's sub-accounts from the platform, and None; when the
    list fails, those earlier runs discovered, and the error. Skipping them
    would leave them unsynced while their records still looked fine."""
    try:
        return discover_sub_accounts(client, user_id), None
    except ApiError as exc:
        error = f"sub-account discovery failed: {exc}"
    log.error("%s", error)
    if stop is not None and stop.is_set():
        return [], error  # nothing more is read for a run that has ended
    known = runs.known_sub_accounts(engine, user_id) if engine is not None else []
    if known:
        log.warning(
            "account %s: sub-account discovery failed; walking the %d sub-accounts "
            "discovered by earlier runs instead",
            user_id,
            len(known),
        )
    return known, error


def _key(account: Account) -> tuple[str, str]:
    return (account.user_id, account.sub_user_id)


def discover_sub_accounts(client: Client, user_id: str) -> list[Account]:
    """Sub-accounts from the platform's list; only ids and names are kept."""
    found: list[Account] = []
    for page in client.walk_sub_accounts(user_id):
        for item in page.items:
            # Cleaned like a task: a name with NUL or half an emoji would
            # fail the accounts table on one database or the other.
            item = clean(item)
            sub_id = to_text(item.get("id"))
            if sub_id is None or len(sub_id) > ID_LENGTH:
                log.warning(
                    "account %s, endpoint %s, page %s: sub-account without a"
                    " usable id skipped",
                    user_id,
                    page.endpoint,
                    page.number,
                )
                continue
            name = to_text(item.get("name")) or ""
            found.append(Account(user_id, sub_id, name, origin="discovered"))
    return found


def _outcome(accounts: int, failed: int, errors: int) -> str:
    if failed and failed == accounts:
        return "failed"
    if failed or errors:
        return "partial" if accounts > failed else "failed"
    return "succeeded"


def _log_summary(summary: RunSummary) -> None:
    counts = summary.counts
    log.info(
        "run %s %s in %.1f s: %s accounts (%s failed, %s skipped), %s pages, "
        "%s tasks seen, %s new, %s changed, %s removed, %s restored, "
        "%s status changes, %s rejected",
        summary.run_id,
        summary.outcome,
        summary.seconds,
        summary.accounts,
        summary.accounts_failed,
        summary.accounts_skipped,
        summary.pages,
        counts.seen,
        counts.new,
        counts.changed,
        counts.removed,
        counts.restored,
        counts.status_changes,
        counts.rejected,
    )
