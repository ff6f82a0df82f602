"""A run: resolve the accounts, walk them, store every page, record the outcome.

Accounts are walked by a pool of fetching threads under the client's global
rate limit. Every page goes through one bounded queue to this module's
single writer, so the database sees one writer per run (SQLite allows no
more, and it keeps the history free of races between accounts listing the
same task) and memory stays bounded by the queue, not by the data.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine

from etl import runs, store
from etl.accounts import Account
from etl.client import Client, Page
from etl.config import Config
from etl.errors import ApiError, EtlError
from etl.parse import RejectedItem, clean, parse_task, to_text
from etl.store import PageBatch, PageCounts, Reject

log = logging.getLogger(__name__)

EXIT_CODES = {"succeeded": 0, "failed": 1, "partial": 3, "stopped": 0}


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

    @property
    def exit_code(self) -> int:
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
class _WalkEnd:
    account: Account
    started: datetime
    complete: bool
    error: str | None


@dataclass
class _AccountState:
    started: datetime | None = None
    previous_complete: datetime | None = None
    seen: set[str] = field(default_factory=set)
    failed: bool = False


def run_sync(
    config: Config,
    *,
    kind: str = "sync",
    only: Sequence[str] = (),
    filters: Filters = Filters(),
    engine: Engine | None = None,
    client: Client | None = None,
) -> RunSummary:
    """One run over the configured accounts (or those named in `only`)."""
    engine = engine or store.connect(config.database)
    store.check_schema(engine)
    own_client = client is None
    client = client or make_client(config)
    try:
        return _Run(config, engine, client, kind, filters).execute(only)
    finally:
        if own_client:
            client.close()


def make_client(config: Config) -> Client:
    tokens = {account.user_id: account.token for account in config.accounts}
    return Client(config.api, {k: v for k, v in tokens.items() if v})


class _Run:
    def __init__(
        self,
        config: Config,
        engine: Engine,
        client: Client,
        kind: str,
        filters: Filters,
    ) -> None:
        self.config = config
        self.engine = engine
        self.client = client
        self.kind = kind
        self.filters = filters
        self.counts = PageCounts()
        self.pages = 0
        self.errors: list[str] = []
        self.states: dict[Account, _AccountState] = {}
        self.stop = threading.Event()
        # Room for two pages per fetcher keeps them busy while the writer
        # works, and bounds memory whatever the number of pages.
        self.queue: queue.Queue[PageBatch | _WalkEnd] = queue.Queue(
            maxsize=2 * config.api.parallelism
        )

    def execute(self, only: Sequence[str]) -> RunSummary:
        began = time.monotonic()
        run_id = runs.start_run(self.engine, self.kind)
        self.run_id = run_id
        try:
            found = self._resolve(only)
            runs.register_accounts(self.engine, found)
            self._walk_all(found)
        except BaseException:
            self.stop.set()
            runs.finish_run(
                self.engine,
                run_id,
                "failed",
                self.counts,
                accounts_total=len(self.states),
                accounts_failed=len(self.states),
                pages=self.pages,
                errors=self.errors or ["the run crashed"],
            )
            raise

        failed = sum(1 for state in self.states.values() if state.failed)
        outcome = _outcome(len(self.states), failed, len(self.errors))
        runs.finish_run(
            self.engine,
            run_id,
            outcome,
            self.counts,
            accounts_total=len(self.states),
            accounts_failed=failed,
            pages=self.pages,
            errors=self.errors,
        )
        summary = RunSummary(
            run_id=run_id,
            kind=self.kind,
            outcome=outcome,
            accounts=len(self.states),
            accounts_failed=failed,
            pages=self.pages,
            counts=self.counts,
            errors=tuple(self.errors),
            seconds=time.monotonic() - began,
        )
        _log_summary(summary)
        return summary

    def _resolve(self, only: Sequence[str]) -> list[Account]:
        found, errors = resolve_accounts(self.config, self.client)
        self.errors.extend(errors)
        if only:
            wanted = set(only)
            found = [a for a in found if a.label in wanted or a.user_id in wanted]
            missing = wanted - {a.label for a in found} - {a.user_id for a in found}
            for label in sorted(missing):
                self.errors.append(f"account {label}: not configured or discovered")
        return found

    def _walk_all(self, found: list[Account]) -> None:
        for account in found:
            self.states[account] = _AccountState()
        workers = max(1, min(self.config.api.parallelism, len(found)))
        with ThreadPoolExecutor(workers, thread_name_prefix="walk") as pool:
            for account in found:
                pool.submit(self._fetch, account)
            try:
                self._write_until_done(len(found))
            except BaseException:
                # Release fetchers blocked on the full queue, or leaving the
                # pool would wait for them for ever.
                self.stop.set()
                raise

    def _fetch(self, account: Account) -> None:
        """Walk one account in a pool thread and queue what it finds."""
        started = runs.now()
        try:
            walk = self.client.walk_tasks(
                account, name=self.filters.name, statuses=self.filters.statuses
            )
            for page in walk:
                if self.stop.is_set() or self.states[account].failed:
                    self._put(_WalkEnd(account, started, False, None))
                    return
                self._put(self._parse(page))
            self._put(_WalkEnd(account, started, walk.is_complete, None))
        except EtlError as exc:
            self._put(_WalkEnd(account, started, False, str(exc)))
        except Exception as exc:  # a bug must fail one account, not hang the run
            log.exception("unexpected error walking account %s", account.label)
            self._put(_WalkEnd(account, started, False, f"internal error: {exc!r}"))

    def _put(self, item: PageBatch | _WalkEnd) -> None:
        while True:
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if self.stop.is_set():
                    return

    def _parse(self, page: Page) -> PageBatch:
        zone = self.config.api.zone
        records, rejects = [], []
        for item in page.items:
            try:
                records.append(parse_task(item, page.account, zone))
            except RejectedItem as exc:
                log.warning(
                    "account %s, endpoint %s, page %s: item rejected: %s",
                    page.account.label,
                    page.endpoint,
                    page.number,
                    exc,
                )
                rejects.append(Reject(str(exc), clean(item)))
        return PageBatch(
            account=page.account,
            endpoint=page.endpoint,
            number=page.number,
            fetched_at=page.fetched_at,
            records=records,
            rejects=rejects,
        )

    def _write_until_done(self, walking: int) -> None:
        while walking:
            item = self.queue.get()
            if isinstance(item, _WalkEnd):
                self._end_walk(item)
                walking -= 1
            else:
                self._write(item)

    def _write(self, batch: PageBatch) -> None:
        state = self.states[batch.account]
        if state.failed:
            return
        if state.started is None:
            state.started = batch.fetched_at
            state.previous_complete = runs.previous_complete(self.engine, batch.account)
        try:
            counts = store.write_page(
                self.engine, self.run_id, batch, state.previous_complete
            )
        except EtlError as exc:
            state.failed = True
            self._fail(batch.account, str(exc))
            return
        state.seen.update(record.uuid for record in batch.records)
        self.counts.add(counts)
        self.pages += 1

    def _end_walk(self, end: _WalkEnd) -> None:
        state = self.states[end.account]
        if end.error and not state.failed:
            state.failed = True
            self._fail(end.account, end.error)
        complete = end.complete and not state.failed and self.filters.is_empty
        if complete:
            removed = store.mark_removals(
                self.engine,
                self.run_id,
                end.account,
                state.seen,
                runs.now(),
                state.previous_complete,
            )
            self.counts.removed += removed
            self.counts.status_changes += removed
        outcome = "failed" if state.failed else "succeeded"
        error = end.error if state.failed else None
        runs.record_account(
            self.engine,
            end.account,
            self.run_id,
            started=end.started,
            outcome=outcome,
            error=error,
            complete=complete,
        )
        state.seen = set()

    def _fail(self, account: Account, message: str) -> None:
        log.error("account %s failed: %s", account.label, message)
        self.errors.append(message)


def resolve_accounts(config: Config, client: Client) -> tuple[list[Account], list[str]]:
    """The accounts of a run: configured ones, then discovered sub-accounts."""
    found: dict[tuple[str, str], Account] = {}
    errors: list[str] = []
    for main in config.accounts:
        if main.sync_own_tasks:
            found[(main.user_id, "")] = Account(main.user_id, "", main.name)
        for sub in main.sub_accounts:
            found[(main.user_id, sub)] = Account(main.user_id, sub)
        if main.discover_sub_accounts:
            try:
                for account in discover_sub_accounts(client, main.user_id):
                    found.setdefault((account.user_id, account.sub_user_id), account)
            except ApiError as exc:
                message = f"sub-account discovery failed: {exc}"
                log.error("%s", message)
                errors.append(message)
    return list(found.values()), errors


def discover_sub_accounts(client: Client, user_id: str) -> list[Account]:
    """Sub-accounts from the platform's list; only ids and names are kept."""
    found: list[Account] = []
    for page in client.walk_sub_accounts(user_id):
        for item in page.items:
            sub_id = to_text(item.get("id")) if isinstance(item, dict) else None
            if sub_id is None:
                log.warning(
                    "account %s, endpoint %s, page %s: sub-account without id skipped",
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
        "run %s %s in %.1f s: %s accounts (%s failed), %s pages, %s tasks seen, "
        "%s new, %s changed, %s removed, %s restored, %s status changes, "
        "%s rejected",
        summary.run_id,
        summary.outcome,
        summary.seconds,
        summary.accounts,
        summary.accounts_failed,
        summary.pages,
        counts.seen,
        counts.new,
        counts.changed,
        counts.removed,
        counts.restored,
        counts.status_changes,
        counts.rejected,
    )
