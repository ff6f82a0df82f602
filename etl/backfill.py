"""Backfill: a one-off full pull of chosen accounts, or a replay of the archive.

A pull is a sync run of kind "backfill" over the accounts the selectors
name. A replay feeds archived pages, in the order they were fetched, through
the same parse and store steps as a sync, with the times they were fetched:
the tasks and their status history come out as the live runs made them.

A replay never rewrites history backwards: a walk is skipped when it started
at or before the account's last recorded sync, and a replayed walk becomes
the account's last sync. Replaying the same archive twice, or into the
database its live runs wrote, therefore changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.exc import SQLAlchemyError

from etl import archive, locks, rollup, runs, store
from etl.accounts import Account
from etl.archive import ArchivedPage, ArchivedWalk
from etl.client import Client
from etl.config import Config
from etl.errors import (
    ConfigError,
    EtlError,
    RunAbandoned,
    RunInterrupted,
    RunNotBegun,
    StoreError,
)
from etl.models import accounts
from etl.store import PageBatch, PageCounts
from etl.sync import (
    EXIT_CODES,
    Filters,
    Progress,
    RunSummary,
    describe_crash,
    interruptible_sleep,
    make_client,
    parse_page,
    resolve_accounts,
    run_sync,
)

log = logging.getLogger(__name__)

ProgressCallback = Callable[[Progress], None]
NO_FILTERS = Filters()


@dataclass(frozen=True)
class ReplaySummary:
    """A replay run, and what became of the archived walks."""

    run: RunSummary
    walks: int
    skipped: int
    unfinished: int
    # Of `walks`, those replayed to their end: fewer after a stop.
    ended: int = 0

    @property
    def exit_code(self) -> int:
        return self.run.exit_code


def is_selected(account: Account, selector: str) -> bool:
    """`USER` selects a main account and its sub-accounts; `USER:SUB` one."""
    return selector in (account.user_id, account.label)


def select_accounts(
    found: Iterable[Account], selectors: Sequence[str], where: str
) -> list[Account]:
    """The accounts the selectors name; a selector naming none is an error."""
    found = list(found)
    if not selectors:
        return found
    unmatched = [s for s in selectors if not any(is_selected(a, s) for a in found)]
    if unmatched:
        raise ConfigError(
            f"no {where} matches {', '.join(dict.fromkeys(unmatched))}",
            key="--account",
        )
    return [a for a in found if any(is_selected(a, s) for s in selectors)]


def run_backfill(
    config: Config,
    *,
    selectors: Sequence[str] = (),
    filters: Filters = NO_FILTERS,
    engine: Engine | None = None,
    client: Client | None = None,
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """A full pull of the selected accounts (all by default), as one run.

    Setting `stop` ends it after the page being written, as for a sync.
    """
    engine = engine or store.connect(config.database)
    store.check_schema(engine)
    if selectors:
        _check_selectors(config, client, engine, selectors, stop)
    # Without a client given, the run makes its own, whose retry and rate
    # limit waits a stop or the deadline cuts short.
    return run_sync(
        config,
        kind="backfill",
        only=selectors,
        filters=filters,
        engine=engine,
        client=client,
        progress=progress,
        stop=stop,
        deadline=config.schedule.deadline,
    )


def _check_selectors(
    config: Config,
    client: Client | None,
    engine: Engine,
    selectors: Sequence[str],
    stop: threading.Event | None,
) -> None:
    """Refuse selectors that name no account before a run is recorded; after
    a stop, leave the run to record it."""
    if client is None:
        # Waits that a stop cuts short: a list answered "retry after 60 s"
        # five times held a stopped backfill for minutes.
        halt = stop or threading.Event()
        with make_client(config, sleep=interruptible_sleep(halt)) as own:
            _check_selectors(config, own, engine, selectors, stop)
        return
    # With the engine, a failed discovery still knows the earlier runs'
    # sub-accounts, so naming one of them is not refused.
    found, errors = resolve_accounts(config, client, engine, stop)
    if stop is not None and stop.is_set():
        return
    try:
        select_accounts(found, selectors, "configured or discovered account")
    except ConfigError as exc:
        if not errors:
            raise
        # The account may exist and discovery have failed: not a usage error.
        raise EtlError(f"{exc}; {'; '.join(errors)}") from None


def replay_archive(
    config: Config,
    directory: Path,
    *,
    selectors: Sequence[str] = (),
    engine: Engine | None = None,
    progress: ProgressCallback | None = None,
    stop: threading.Event | None = None,
) -> ReplaySummary:
    """Replay the archive's walks of the selected accounts into the database.

    Setting `stop` ends it after the page being written, recorded as
    "stopped"; replaying again goes on from there.
    """
    engine = engine or store.connect(config.database)
    store.check_schema(engine)
    walks = archive.read_archive(directory)
    chosen = set(
        select_accounts({w.account for w in walks}, selectors, "account in the archive")
    )
    walks = [walk for walk in walks if walk.account in chosen]
    try:
        summary = _Replay(config, engine, progress, stop).execute(walks)
    except SQLAlchemyError as exc:
        # Outside a page, as in `run_sync`: one line, not a traceback.
        raise StoreError(describe_crash(exc)) from exc
    # Like every run: the daily counts include what the replay stored.
    rollup.refresh_after_run(engine, config.api.zone)
    return summary


@dataclass
class _WalkState:
    previous_complete: datetime | None = None
    seen: store.SeenIds = field(default_factory=store.SeenIds)
    has_started: bool = False


@dataclass(frozen=True)
class _Event:
    """A page to store, or (page None) the end of its walk, at its time."""

    at: datetime
    walk: int
    page: ArchivedPage | None


class _Replay:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        progress: ProgressCallback | None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.engine = engine
        self.progress = progress
        self.counts = PageCounts()
        self.pages = 0
        self.walks_ended = 0
        self.unfinished = 0
        self.errors: list[str] = []
        self.failed: set[tuple[str, str]] = set()
        self.held: locks.AccountLocks | None = None

    def execute(self, walks: list[ArchivedWalk]) -> ReplaySummary:
        began = time.monotonic()
        # A stop ends a wait for another process's writer here too.
        try:
            with store.lock_waits_end_on(self.stop):
                self.guard = runs.start_guarded_run(
                    self.engine, "replay", lease=self.config.locks.lease
                )
        except RunInterrupted:
            raise RunNotBegun(
                "stopped before the replay began, while waiting for another "
                "writer of the database",
                exit_code=EXIT_CODES["stopped"],
            ) from None
        self.run_id = self.guard.run_id
        self.walks = []
        replayed: set[tuple[str, str]] = set()
        newer: list[ArchivedWalk] = []
        try:
            # The accounts' locks, as a sync takes them: a run writing an
            # account meanwhile would have the replay store older pages over
            # its newer ones, and settle removals against an older list.
            with locks.hold(
                self.engine, self.config.locks, self.guard, stop=self.stop
            ) as self.held:
                walks = self._lock_accounts(self.held, walks)
                # Only once locked: a run that ended meanwhile counts.
                newer = _newer_than_database(self.engine, walks)
                self.walks = newer
                self.states = [_WalkState() for _ in newer]
                replayed = {_key(walk.account) for walk in newer} | self.failed
                _register(self.engine, newer, self.guard)
                for event in _events(newer):
                    if self.stop.is_set():
                        break
                    self._play(event)
        except BaseException as exc:
            self.errors = self.errors or [describe_crash(exc)]
            if not self.guard.abandoned:
                self._finish("failed", len(replayed), len(replayed), began)
            raise

        self.guard.check()
        failed = len(self.failed)
        outcome = "succeeded" if not failed else "partial"
        if failed and failed == len(replayed):
            outcome = "failed"
        if self.stop.is_set():
            log.info("replay stopped after the page being written")
            outcome = "stopped"
        summary = self._finish(outcome, len(replayed), failed, began)
        return ReplaySummary(
            summary,
            len(newer),
            len(walks) - len(newer),
            self.unfinished,
            self.walks_ended,
        )

    def _lock_accounts(
        self, held: locks.AccountLocks, walks: list[ArchivedWalk]
    ) -> list[ArchivedWalk]:
        """The walks of the accounts whose locks this replay took; an account
        another run holds fails, and replaying again takes it up."""
        taken = set()
        for account in sorted({walk.account for walk in walks}, key=_key):
            try:
                held.acquire(account)
            except RunInterrupted:
                break  # stopped: the accounts not locked are not replayed
            except EtlError as exc:
                log.error("account %s failed: %s", account.label, exc)
                self.failed.add(_key(account))
                self.errors.append(str(exc))
            else:
                taken.add(account)
        return [walk for walk in walks if walk.account in taken]

    def _play(self, event: _Event) -> None:
        walk = self.walks[event.walk]
        if _key(walk.account) in self.failed:
            return
        if event.page is None:
            self._end(walk, self.states[event.walk])
        else:
            self._write(walk, self.states[event.walk], event.page)

    def _write(self, walk: ArchivedWalk, state: _WalkState, page: ArchivedPage) -> None:
        batch = parse_page(page.read(), self.config.api.zone)
        try:
            # A stop drops the page while it waits for SQLite's write lock,
            # as in a sync; replaying again writes it.
            with store.lock_waits_end_on(self.stop):
                counts = self._store(walk, state, batch)
        except RunAbandoned:
            raise
        except RunInterrupted:
            return
        except EtlError as exc:
            self._fail(walk, str(exc))
            return
        state.seen.update(record.uuid for record in batch.records)
        self.counts.add(counts)
        self.pages += 1
        self._report_progress()

    def _store(
        self, walk: ArchivedWalk, state: _WalkState, batch: PageBatch
    ) -> PageCounts:
        if not state.has_started:
            state.previous_complete = runs.previous_complete(self.engine, walk.account)
            state.has_started = True
        assert self.held is not None, "pages are replayed inside locks.hold()"
        self.held.confirm(walk.account)
        previous_complete = state.previous_complete
        return store.write_page(
            self.engine,
            self.run_id,
            batch,
            previous_complete,
            confirm=self.guard.confirm,
        )

    def _end(self, walk: ArchivedWalk, state: _WalkState) -> None:
        self.walks_ended += 1
        self._report_progress()
        end = walk.end
        if end is None:
            # As in the live run, which never got to record this walk.
            self.unfinished += 1
            log.warning("%s: no end marker; its pages were stored", walk.path)
            return
        complete = end.complete and walk.is_finished
        if walk.missing_pages:
            self.unfinished += 1
            log.warning(
                "%s: %s page(s) missing; no removals", walk.path, walk.missing_pages
            )
        if complete:
            removed = store.mark_removals(
                self.engine,
                self.run_id,
                walk.account,
                state.seen,
                end.ended_at,
                state.previous_complete,
                confirm=self.guard.confirm,
            )
            self.counts.removed += removed
            self.counts.status_changes += removed
        runs.record_account(
            self.engine,
            walk.account,
            self.run_id,
            started=walk.started_at,
            outcome=end.outcome,
            error=end.error,
            complete=complete,
            finished=end.ended_at,
            guard=self.guard,
        )

    def _fail(self, walk: ArchivedWalk, message: str) -> None:
        # The account's later walks are left too, and its record untouched,
        # so that replaying again resumes at this walk.
        log.error("account %s failed: %s", walk.account.label, message)
        self.failed.add(_key(walk.account))
        self.errors.append(message)

    def _report_progress(self) -> None:
        if self.progress is not None:
            self.progress(
                Progress(
                    done=self.walks_ended,
                    total=len(self.walks),
                    pages=self.pages,
                    tasks=self.counts.seen,
                    unit="walks",
                )
            )

    def _finish(
        self, outcome: str, accounts_total: int, failed: int, began: float
    ) -> RunSummary:
        runs.finish_run(
            self.engine,
            self.run_id,
            outcome,
            self.counts,
            accounts_total=accounts_total,
            accounts_failed=failed,
            pages=self.pages,
            errors=self.errors,
        )
        return RunSummary(
            run_id=self.run_id,
            kind="replay",
            outcome=outcome,
            accounts=accounts_total,
            accounts_failed=failed,
            pages=self.pages,
            counts=self.counts,
            errors=tuple(self.errors),
            seconds=time.monotonic() - began,
        )


def _newer_than_database(
    engine: Engine, walks: list[ArchivedWalk]
) -> list[ArchivedWalk]:
    """The walks that started after their account's last recorded sync."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(accounts.c.user_id, accounts.c.sub_user_id, accounts.c.last_sync_at)
        ).all()
    last_sync = {(row.user_id, row.sub_user_id): row.last_sync_at for row in rows}
    newer = []
    for walk in walks:
        last = last_sync.get(_key(walk.account))
        if last is None or walk.started_at > last:
            newer.append(walk)
    return newer


def _register(engine: Engine, walks: list[ArchivedWalk], guard: runs.RunGuard) -> None:
    """Add the accounts of the walks, first seen when their first walk began."""
    first: dict[tuple[str, str], ArchivedWalk] = {}
    for walk in sorted(walks, key=lambda w: w.started_at):
        first.setdefault(_key(walk.account), walk)
    for walk in first.values():
        runs.register_accounts(
            engine, [walk.account], seen_at=walk.started_at, guard=guard
        )


def _events(walks: list[ArchivedWalk]) -> list[_Event]:
    """Pages and walk ends in the order they happened; a walk with no end
    marker ends just after its last page, as far as the replay can tell."""
    events = []
    for index, walk in enumerate(walks):
        for page in walk.pages:
            events.append(_Event(page.fetched_at, index, page))
        ended = walk.end.ended_at if walk.end else walk.pages[-1].fetched_at
        events.append(_Event(ended, index, None))
    # A page sorts before the end of its walk when their times are equal.
    return sorted(
        events,
        key=lambda e: (e.at, e.page is None, e.walk, e.page.number if e.page else 0),
    )


def _key(account: Account) -> tuple[str, str]:
    return (account.user_id, account.sub_user_id)
