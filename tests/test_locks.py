import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from alembic import command
from sqlalchemy import Engine, insert, text
from sqlalchemy import select as select_rows
from synced import sync_config
from writers import write_lock_held

from etl import locks, runs, store
from etl.accounts import Account
from etl.client import Page
from etl.config import (
    Config,
    DatabaseConfig,
    LocksConfig,
)
from etl.errors import LockBusyError, LockLostError, RunAbandoned, RunInterrupted
from etl.models import account_locks, accounts, sync_run_accounts, sync_runs, tasks
from etl.report import describe_run
from etl.simulator import SimServer, Simulator
from etl.store import PageBatch
from etl.sync import parse_page, run_sync

HOST = socket.gethostname()
ACCOUNT = Account("main-1", "sub-1")
PREVIOUS_REVISION = "b5e7d2c4a002"
TASK_LIST = "/agent-api/user/{user_id}/task"

HOLDER = """
import sys, time
from etl import locks, store
from etl.accounts import Account
from etl.config import DatabaseConfig, LocksConfig
engine = store.connect(DatabaseConfig(url=sys.argv[1]))
held = locks.open_locks(engine, LocksConfig(lease=60))
held.acquire(Account("main-1", "sub-1"))
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=4, main_accounts=2, sub_accounts=1, tasks_per_account=5)


def make_config(server: SimServer, simulator: Simulator, **locks: Any) -> Config:
    url = DatabaseConfig().url
    return sync_config(server, simulator, url, locks=LocksConfig(**locks), page_size=3)


def start_holder(url: str) -> subprocess.Popen[str]:
    """Another process that takes ACCOUNT's lock and keeps it."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    if not ready or process.stdout.readline().strip() != "held":
        process.kill()
        process.wait(timeout=10)
        raise AssertionError("the holder process did not take the lock")
    return process


def test_a_held_lock_is_refused_with_the_holder_named(engine: Engine) -> None:
    first = locks.open_locks(engine, LocksConfig())
    second = locks.open_locks(engine, LocksConfig())
    first.acquire(ACCOUNT)

    with pytest.raises(LockBusyError) as refused:
        second.acquire(ACCOUNT)

    assert str(refused.value).startswith(
        f"account main-1:sub-1: another run holds its lock (host {HOST} pid "
        f"{os.getpid()}"
    )
    assert refused.value.exit_code == 4
    first.release(ACCOUNT)
    second.acquire(ACCOUNT)
    first.close()
    second.close()


def test_a_waiting_run_gets_the_lock_when_the_holder_lets_go(engine: Engine) -> None:
    first = locks.open_locks(engine, LocksConfig())
    second = locks.open_locks(engine, LocksConfig(wait=30))
    first.acquire(ACCOUNT)
    letting_go = threading.Timer(0.3, first.release, [ACCOUNT])
    letting_go.start()

    second.acquire(ACCOUNT)

    letting_go.join()
    with pytest.raises(LockBusyError):
        first.acquire(ACCOUNT)
    first.close()
    second.close()


def test_closing_gives_back_every_lock(engine: Engine) -> None:
    first = locks.open_locks(engine, LocksConfig())
    other = Account("main-2")
    first.acquire(ACCOUNT)
    first.acquire(other)

    first.close()

    second = locks.open_locks(engine, LocksConfig())
    second.acquire(ACCOUNT)
    second.acquire(other)
    second.close()


def end_lock_sessions(engine: Engine) -> None:
    """End the PostgreSQL sessions that hold task-etl's advisory locks."""
    with engine.connect() as other:
        other.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'task-etl:%'"
            )
        )


def test_a_lock_connection_that_broke_is_told_in_one_line(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLAlchemy's text of the error goes on with the statement and a link,
    # which the warnings printed as they were.
    engine = store.connect(DatabaseConfig(url=pg_url))
    held = locks.open_locks(engine, LocksConfig())
    held.acquire(ACCOUNT)
    end_lock_sessions(engine)

    with caplog.at_level(logging.WARNING, logger="etl.locks"):
        held.release(ACCOUNT)
        held.close()
    engine.dispose()

    told = [r.getMessage() for r in caplog.records if r.name == "etl.locks"]
    assert any("could not unlock" in message for message in told)
    assert [message.splitlines()[0] for message in told] == told


def test_a_page_is_refused_soon_after_the_lock_session_ends(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The server freed the locks at once, and another run could take them;
    # the heartbeat alone noticed a third of a lease later (20 s), and every
    # page in between was written.
    engine = store.connect(DatabaseConfig(url=pg_url))
    held = locks.open_locks(engine, LocksConfig())
    held.acquire(ACCOUNT)
    held.confirm(ACCOUNT)
    end_lock_sessions(engine)
    ended = time.monotonic()

    with caplog.at_level(logging.ERROR, logger="etl.locks"):
        while time.monotonic() - ended < locks.SESSION_CHECK_SECONDS + 1:
            try:
                held.confirm(ACCOUNT)
            except LockLostError:
                break
            time.sleep(0.05)
    refused_after = time.monotonic() - ended
    held.close()
    engine.dispose()

    assert refused_after <= locks.SESSION_CHECK_SECONDS + 0.5
    assert "the connection holding the account locks broke" in caplog.text


def test_a_lock_held_by_a_killed_process_is_taken_over(
    engine: Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder = start_holder(db_url)
    comer = locks.open_locks(engine, LocksConfig(wait=20))
    try:
        with pytest.raises(LockBusyError, match=f"host {HOST} pid {holder.pid}"):
            locks.open_locks(engine, LocksConfig()).acquire(ACCOUNT)

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        with caplog.at_level(logging.WARNING, logger="etl.locks"):
            comer.acquire(ACCOUNT)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        comer.close()

    if engine.dialect.name == "sqlite":
        assert f"took over the lock of host {HOST} pid {holder.pid}" in caplog.text


def insert_lock(engine: Engine, host: str, pid: int, expires_at: datetime) -> None:
    with engine.begin() as connection:
        connection.execute(
            insert(account_locks).values(
                user_id=ACCOUNT.user_id,
                sub_user_id=ACCOUNT.sub_user_id,
                holder=f"{host}:{pid}:0",
                host=host,
                pid=pid,
                acquired_at=expires_at - timedelta(seconds=60),
                expires_at=expires_at,
            )
        )


def test_a_lease_from_another_host_is_taken_over_only_once_it_ran_out(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = store.connect(DatabaseConfig(url=sqlite_url))
    store.migrate(engine)
    expires = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    insert_lock(engine, "elsewhere", 4242, expires)
    config = LocksConfig(lease=60)
    second = timedelta(seconds=1)
    before = locks.LeaseLocks(engine, config, clock=lambda: expires - second)
    after = locks.LeaseLocks(engine, config, clock=lambda: expires + second)

    with pytest.raises(LockBusyError, match="host elsewhere pid 4242, lease until"):
        before.acquire(ACCOUNT)
    with caplog.at_level(logging.WARNING, logger="etl.locks"):
        after.acquire(ACCOUNT)

    assert "pid 4242, whose lease ran out" in caplog.text
    with engine.connect() as connection:
        row = connection.execute(select_rows(account_locks)).one()
    assert (row.host, row.pid) == (HOST, os.getpid())
    assert row.expires_at == expires + timedelta(seconds=61)
    after.close()
    engine.dispose()


def test_a_run_whose_lease_was_taken_over_writes_no_more(sqlite_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=sqlite_url))
    store.migrate(engine)
    start = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    config = LocksConfig(lease=60)
    clock = [start]
    suspended = locks.LeaseLocks(engine, config, clock=lambda: clock[0])
    suspended.acquire(ACCOUNT)
    suspended.confirm(ACCOUNT)
    # The holder sleeps through its lease; another run takes the lock over.
    clock[0] = start + timedelta(hours=1)
    later = locks.LeaseLocks(engine, config, clock=lambda: clock[0])
    later.acquire(ACCOUNT)

    with pytest.raises(LockLostError, match="account main-1:sub-1: this run lost"):
        suspended.confirm(ACCOUNT)

    later.confirm(ACCOUNT)
    suspended.close()
    later.close()
    engine.dispose()


def test_the_heartbeat_keeps_the_run_and_its_leases_alive(engine: Engine) -> None:
    guard = runs.start_guarded_run(engine, "sync", lease=0.3)
    with engine.connect() as connection:
        first = connection.execute(select_rows(sync_runs.c.heartbeat_at)).scalar_one()

    with locks.hold(engine, LocksConfig(lease=0.3), guard) as held:
        held.acquire(ACCOUNT)
        beats = wait_for_heartbeat(engine, after=first)

    assert beats > first
    with engine.connect() as connection:
        assert connection.execute(select_rows(account_locks)).all() == []


def test_a_stop_ends_a_wait_to_take_a_lock_for_another_writer(sqlite_url: str) -> None:
    # Taking an account's lock writes its lease, and waited for another
    # process's write lock up to the busy timeout whatever came meanwhile,
    # holding the guard of the run's locks: a page's check of its own lock
    # waited behind it past the stop, and was written after the stop.
    engine = store.connect(DatabaseConfig(url=sqlite_url, busy_timeout=5))
    store.migrate(engine)
    guard = runs.start_guarded_run(engine, "sync", lease=60)
    stop = threading.Event()

    with locks.hold(engine, LocksConfig(lease=60), guard, stop=stop) as held:
        held.acquire(ACCOUNT)
        with write_lock_held(sqlite_url):
            threading.Timer(0.3, stop.set).start()
            began = time.monotonic()
            with pytest.raises(RunInterrupted):
                held.acquire(Account("main-1", "sub-2"))
            waited = time.monotonic() - began

    assert waited < 2, f"taking the lock went on {waited:.1f} s"
    engine.dispose()


def test_a_stop_ends_the_heartbeat_s_wait_for_another_writer(sqlite_url: str) -> None:
    # The heartbeat's wait for another process's write lock lasted the busy
    # timeout, and the end of a stopped run waited for it.
    engine = store.connect(DatabaseConfig(url=sqlite_url, busy_timeout=5))
    store.migrate(engine)
    guard = runs.start_guarded_run(engine, "sync", lease=0.3)
    stop = threading.Event()

    with write_lock_held(sqlite_url):
        with locks.hold(engine, LocksConfig(lease=0.3), guard, stop=stop):
            time.sleep(0.4)  # the heartbeat, every 0.1 s, waits for the lock
            stop.set()
            began = time.monotonic()
        ended = time.monotonic() - began

    assert ended < 2, f"the run's locks were given back after {ended:.1f} s"
    engine.dispose()


def wait_for_heartbeat(engine: Engine, after: datetime) -> datetime:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            beat = connection.execute(select_rows(sync_runs.c.heartbeat_at)).scalar()
        if beat is not None and beat > after:
            return beat  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError("no heartbeat within 10 s")


def test_the_advisory_key_is_the_same_in_every_process() -> None:
    script = (
        "from etl.locks import advisory_key; from etl.accounts import Account; "
        "print(advisory_key(Account('main-1', 'sub-1')), hash('main-1'))"
    )
    # A seed other than this process's, if it was given one.
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    other = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()

    # Python's own hash differs between the two processes; the key does not.
    assert other[1] != str(hash("main-1"))
    assert other[0] == str(locks.advisory_key(ACCOUNT))
    key = locks.advisory_key(ACCOUNT)
    assert -(2**63) <= key < 2**63
    others = {Account("main-1"), Account("main-1sub-1"), Account("main-1:sub-1")}
    assert key not in {locks.advisory_key(other) for other in others}


def test_sync_skips_a_locked_account_and_names_the_holder(
    engine: Engine,
    server: SimServer,
    simulator: Simulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(server, simulator)
    locked = Account(simulator.main_user_ids()[0])
    holder = locks.open_locks(engine, LocksConfig())
    holder.acquire(locked)

    with caplog.at_level(logging.WARNING, logger="etl.sync"):
        summary = run_sync(config, engine=engine)

    holder.close()
    assert (summary.outcome, summary.accounts_skipped) == ("succeeded", 1)
    assert summary.exit_code == 4
    assert (
        f"account {locked.label}: another run holds its lock (host {HOST} pid "
        f"{os.getpid()}" in caplog.text
    )
    assert stored_tasks(engine, locked) == 0
    assert (
        "Skipped: 1 account, whose lock another run held (the warnings name it)"
        in describe_run(summary)
    )
    with engine.connect() as connection:
        run = connection.execute(select_rows(sync_runs)).one()
        walks = connection.execute(select_rows(sync_run_accounts)).all()
    assert (run.accounts, run.accounts_skipped, run.accounts_failed) == (4, 1, 0)
    assert sorted(walk.outcome for walk in walks) == ["skipped"] + ["succeeded"] * 3

    again = run_sync(config, engine=engine)

    assert (again.accounts_skipped, again.exit_code) == (0, 0)
    assert stored_tasks(engine, locked) == 5


def test_a_run_that_finds_every_account_locked_is_skipped(
    engine: Engine, server: SimServer, simulator: Simulator
) -> None:
    config = make_config(server, simulator)
    first = run_sync(config, engine=engine)
    holder = locks.open_locks(engine, LocksConfig())
    for account in walked_accounts(engine, first.run_id):
        holder.acquire(account)

    summary = run_sync(config, engine=engine)

    holder.close()
    assert (summary.outcome, summary.exit_code) == ("skipped", 4)
    assert summary.accounts_skipped == summary.accounts == 4
    assert summary.pages == 0


def stored_tasks(engine: Engine, account: Account) -> int:
    query = select_rows(tasks.c.uuid).where(
        tasks.c.user_id == account.user_id, tasks.c.sub_user_id == account.sub_user_id
    )
    with engine.connect() as connection:
        return len(connection.execute(query).all())


def walked_accounts(engine: Engine, run_id: int) -> list[Account]:
    query = select_rows(sync_run_accounts).where(sync_run_accounts.c.run_id == run_id)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [Account(row.user_id, row.sub_user_id) for row in rows]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    return process.pid


# host, pid (None: a process that has exited), seconds since its heartbeat
GONE_OR_NOT = {
    "other-host-silent": ("elsewhere", 4242, 120, "abandoned"),
    "other-host-beating": ("elsewhere", 4242, 10, "running"),
    "this-host-dead-pid": (HOST, None, 10, "abandoned"),
    "this-host-live": (HOST, os.getpid(), 10, "running"),
    "this-host-live-pid-silent": (HOST, os.getpid(), 120, "abandoned"),
}


def test_runs_of_processes_that_are_gone_are_abandoned(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    gone = dead_pid()
    with engine.begin() as connection:
        for name, (host, pid, silent_for, _) in GONE_OR_NOT.items():
            beat = runs.now() - timedelta(seconds=silent_for)
            connection.execute(
                insert(sync_runs).values(
                    kind="sync",
                    error=name,
                    started_at=beat - timedelta(hours=1),
                    heartbeat_at=beat,
                    outcome="running",
                    host=host,
                    pid=gone if pid is None else pid,
                )
            )

    with caplog.at_level(logging.WARNING, logger="etl.runs"):
        abandoned = runs.abandon_dead_runs(engine, lease=60)

    with engine.connect() as connection:
        rows = connection.execute(select_rows(sync_runs)).all()
    assert {row.error: row.outcome for row in rows} == {
        name: case[-1] for name, case in GONE_OR_NOT.items()
    }
    assert abandoned == 3
    # A live process that was silent is not said to be gone.
    ids = {row.error: row.id for row in rows}
    silent = "with no heartbeat for longer than the lease (60 s): abandoned"
    assert sorted(caplog.messages) == sorted(
        [
            f"run {ids['other-host-silent']} was left running {silent}",
            f"run {ids['this-host-dead-pid']} was left running by a process that"
            " is gone: abandoned",
            f"run {ids['this-host-live-pid-silent']} was left running {silent}",
        ]
    )


def test_an_abandoned_run_counts_what_it_committed(engine: Engine) -> None:
    run_id = runs.start_run(engine, "sync")
    at = runs.now()
    items = [{"uuid": f"t{n}", "status": 2} for n in range(3)] + [{"name": "no id"}]
    page = Page(ACCOUNT, TASK_LIST, 1, tuple(items), 4, 1, 15, at, b"")
    store.write_page(engine, run_id, parse_page(page, UTC), None)
    runs.record_walk(
        engine, run_id, ACCOUNT, outcome="succeeded", started=at, pages=1, tasks_seen=3
    )
    with engine.begin() as connection:
        connection.execute(
            sync_runs.update().where(sync_runs.c.id == run_id).values(pid=dead_pid())
        )

    assert runs.abandon_dead_runs(engine) == 1

    with engine.connect() as connection:
        run = connection.execute(select_rows(sync_runs)).one()
    counted = (run.accounts, run.pages, run.tasks_seen, run.tasks_new)
    assert (run.outcome, *counted) == ("abandoned", 1, 1, 3, 3)
    assert (run.status_changes, run.rejected, run.tasks_removed) == (3, 1, 0)


LEASE = 60.0


@contextmanager
def paused_past_the_lease() -> Iterator[None]:
    """This process's clocks a lease and a second ahead, as they are for a
    process that was paused that long (stopped by a signal, say)."""
    wall = runs.now() + timedelta(seconds=LEASE + 1)
    mono = time.monotonic() + LEASE + 1
    with (
        mock.patch.object(runs, "now", return_value=wall),
        mock.patch.object(runs.time, "monotonic", return_value=mono),
    ):
        yield


def one_page(uuids: list[str]) -> PageBatch:
    items = tuple({"uuid": uuid, "status": 2} for uuid in uuids)
    page = Page(ACCOUNT, TASK_LIST, 1, items, len(items), 1, 15, runs.now(), b"")
    return parse_page(page, UTC)


# A run paused past its lease is taken for dead, and marked abandoned, by the
# next run to start. Woken, it wrote on: more pages, its removals, and its
# outcome over `abandoned`, unseen by the runs that had taken it for dead.
def test_a_run_marked_abandoned_while_paused_writes_nothing_more(
    engine: Engine,
) -> None:
    guard = runs.start_guarded_run(engine, "sync", lease=LEASE)
    run_id = guard.run_id
    store.write_page(engine, run_id, one_page(["a"]), None, confirm=guard.confirm)
    before = runs.now()

    with paused_past_the_lease():
        assert runs.abandon_dead_runs(engine, lease=LEASE) == 1
        with pytest.raises(RunAbandoned, match=f"^run {run_id} was marked abandoned"):
            page = one_page(["b"])
            store.write_page(engine, run_id, page, None, confirm=guard.confirm)
    # Each kind of write asks the database itself, as a guard that has not
    # heard of it yet would.
    writes: list[Callable[[runs.RunGuard], object]] = [
        lambda g: runs.register_accounts(engine, [Account("main-1", "sub-9")], guard=g),
        lambda g: store.mark_removals(
            engine, run_id, ACCOUNT, store.SeenIds(), before, before, confirm=g.confirm
        ),
        lambda g: runs.record_walk(
            engine, run_id, ACCOUNT, outcome="succeeded", started=before, guard=g
        ),
        lambda g: runs.record_account(
            engine,
            ACCOUNT,
            run_id,
            started=before,
            outcome="succeeded",
            error=None,
            complete=True,
            guard=g,
        ),
        lambda g: runs.finish_run(
            engine,
            run_id,
            "succeeded",
            store.PageCounts(),
            accounts_total=1,
            accounts_failed=0,
            pages=2,
            errors=[],
        ),
    ]
    for write in writes:
        with pytest.raises(RunAbandoned, match=f"^run {run_id} was marked abandoned"):
            write(runs.RunGuard(run_id, LEASE, proved=None))

    with engine.connect() as connection:
        stored = connection.execute(
            select_rows(tasks.c.uuid, tasks.c.unlisted_after)
        ).all()
        run = connection.execute(select_rows(sync_runs)).one()
        walks = connection.execute(select_rows(sync_run_accounts)).all()
        known = connection.execute(select_rows(accounts.c.sub_user_id)).all()
    assert [tuple(row) for row in stored] == [("a", None)]
    assert (run.outcome, run.accounts, walks, known) == ("abandoned", 0, [], [])


def test_a_beat_that_finds_its_run_abandoned_stops_the_run(engine: Engine) -> None:
    guard = runs.start_guarded_run(engine, "sync", lease=0.3)
    stop = threading.Event()

    with locks.hold(engine, LocksConfig(lease=0.3), guard, stop=stop):
        with engine.begin() as connection:
            connection.execute(
                sync_runs.update()
                .where(sync_runs.c.id == guard.run_id)
                .values(outcome="abandoned")
            )
        stopped = stop.wait(5)

    assert stopped, "the heartbeat went on beating for a run marked abandoned"
    assert guard.abandoned
    with pytest.raises(RunAbandoned):
        guard.check()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_run_that_beats_while_another_abandons_it_keeps_running(
    engine: Engine,
) -> None:
    # The other run read the run's old heartbeat, then waited for the row,
    # which the beat's transaction held; it abandoned a run that had just
    # shown itself alive, and that then went on writing for half a lease.
    guard = runs.start_guarded_run(engine, "sync", lease=LEASE)
    abandoned: list[int] = []

    with engine.connect() as beating, beating.begin():
        runs.RunGuard(guard.run_id, LEASE, proved=None).confirm(beating)
        with paused_past_the_lease():
            other = threading.Thread(
                target=lambda: abandoned.append(
                    runs.abandon_dead_runs(engine, lease=LEASE)
                )
            )
            other.start()
            wait_for_a_lock_wait(engine)
    other.join(timeout=30)

    assert abandoned == [0]
    with engine.connect() as connection:
        run = connection.execute(select_rows(sync_runs)).one()
    assert run.outcome == "running"


def wait_for_a_lock_wait(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            query = text("SELECT count(*) FROM pg_locks WHERE NOT granted")
            if connection.execute(query).scalar_one():
                return
        time.sleep(0.02)
    raise AssertionError("no session waited for a lock within 10 s")


def test_upgrade_keeps_the_runs_and_a_crashed_one_is_abandoned(db_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=db_url))
    config = store._alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, PREVIOUS_REVISION)
    started = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    with engine.begin() as connection:
        for outcome in ("succeeded", "running"):
            connection.execute(
                text(
                    "INSERT INTO sync_runs (kind, started_at, outcome, host, pid, "
                    "accounts, accounts_failed, pages, tasks_seen, tasks_new, "
                    "tasks_changed, tasks_removed, tasks_restored, status_changes, "
                    "rejected, bad_values) VALUES ('sync', :started, :outcome, "
                    "'elsewhere', 4242, 3, 0, 7, 21, 21, 0, 0, 0, 21, 0, 0)"
                ),
                {"started": started.replace(tzinfo=None), "outcome": outcome},
            )

    store.migrate(engine)

    with engine.connect() as connection:
        rows = connection.execute(select_rows(sync_runs).order_by(sync_runs.c.id)).all()
        assert connection.execute(select_rows(sync_run_accounts)).all() == []
        assert connection.execute(select_rows(account_locks)).all() == []
    assert [(r.outcome, r.pages, r.accounts_skipped) for r in rows] == [
        ("succeeded", 7, 0),
        ("running", 7, 0),
    ]
    assert [r.heartbeat_at for r in rows] == [None, None]
    assert runs.abandon_dead_runs(engine) == 1

    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, PREVIOUS_REVISION)
    store.migrate(engine)
    with engine.connect() as connection:
        assert len(connection.execute(select_rows(sync_runs.c.id)).all()) == 2
    engine.dispose()
