"""The daemon and `sync` as real processes, against the simulator served here.

Each test starts `task-etl` in a subprocess, drives it with signals and reads
what it did from the database. Every wait is bounded.
"""

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError
from writers import LockAfterFirstPage, other_writer, write_lock_held

from etl import config as config_module
from etl import runs, store
from etl.config import ApiConfig, Config, DatabaseConfig, MainAccount
from etl.errors import RunNotBegun, StoreError
from etl.models import sync_run_accounts, sync_runs, task_status_changes, tasks
from etl.simulator import SimServer, Simulator
from etl.sync import RunSummary, run_sync

TOKEN = "sim-token"
EXIT_WAIT = 20.0


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, number: int = signal.SIGTERM) -> int:
        self.process.send_signal(number)
        try:
            return self.process.wait(timeout=EXIT_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=EXIT_WAIT)
            raise AssertionError(
                f"no exit {EXIT_WAIT} s after a signal:\n{self.log}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=EXIT_WAIT)


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=8, main_accounts=1, sub_accounts=1, tasks_per_account=4)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start `task-etl COMMAND`; whatever is still running at the end is killed."""
    processes: list[Daemon] = []

    def start(
        path: Path, command: str = "daemon", ignoring: tuple[int, ...] = ()
    ) -> Daemon:
        """Start it, with the signals in `ignoring` ignored as `nohup` does."""
        log_path = tmp_path / f"{command}-{len(processes)}.log"
        ignored = "".join(f"signal.signal({n}, signal.SIG_IGN); " for n in ignoring)
        code = f"import signal; {ignored}from etl.cli import main; main()"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", code, "--config", str(path), command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TASK_ETL_TOKEN": TOKEN},
            )
        processes.append(Daemon(process, log_path))
        return processes[-1]

    yield start
    for daemon in processes:
        daemon.kill()


def write_config(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    schedule: str = "interval = 1",
    api: str = "",
    locks: str = "wait = 0",
    database: str = "",
) -> Path:
    accounts = "".join(
        f'[[accounts]]\nuser_id = "{user_id}"\ndiscover_sub_accounts = true\n'
        for user_id in simulator.main_user_ids()
    )
    path = tmp_path / "task-etl.toml"
    path.write_text(
        f'[database]\nurl = "{db_url}"\n{database}\n'
        f'[api]\nbase_url = "{server.url}"\npage_size = 2\n'
        f"requests_per_second = 1000.0\nread_timeout = 10\n{api}\n"
        f"[schedule]\n{schedule}\n[locks]\n{locks}\n" + accounts,
        encoding="utf-8",
    )
    return path


def add_tasks(simulator: Simulator, per_account: int, only_main: bool = False) -> None:
    """More pages per account, so that a run lasts while a test acts on it."""
    for account in simulator.accounts():
        if not (only_main and account.sub_user_id):
            for _ in range(per_account):
                simulator.add_task(account.user_id, account.sub_user_id)


def wait_until(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def all_runs(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(sync_runs).order_by(sync_runs.c.id)))


def finished_runs(engine: Engine) -> list[Any]:
    return [run for run in all_runs(engine) if run.finished_at is not None]


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        query = select(func.count()).select_from(table)
        return int(connection.execute(query).scalar_one())


def test_runs_start_on_schedule_and_never_overlap(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    daemon = started(write_config(tmp_path, server, simulator, db_url))

    wait_until(lambda: len(finished_runs(engine)) >= 3, "three runs")
    code = daemon.stop()

    assert code == 0, daemon.log
    done = all_runs(engine)
    assert {run.outcome for run in done} <= {"succeeded", "stopped"}
    assert all(a.finished_at <= b.started_at for a, b in pairwise(done))
    # On time: each run starts a whole number of intervals after the first.
    offsets = [(run.started_at - done[0].started_at).total_seconds() for run in done]
    assert all(abs(offset - round(offset)) < 0.4 for offset in offsets), offsets
    assert [round(offset) for offset in offsets] == sorted({*map(round, offsets)})
    assert "daemon stopped" in daemon.log


# SIGHUP, from a closing terminal or a service manager, ended the daemon
# mid-run without a word, its run left recorded as running.
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_mid_run_stops_after_the_page_and_exits_0(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
    signum: signal.Signals,
) -> None:
    add_tasks(simulator, 16, only_main=True)
    simulator.delay = 0.05
    daemon = started(write_config(tmp_path, server, simulator, db_url))

    wait_until(lambda: count(engine, tasks) > 0, "a first page stored")
    code = daemon.stop(signum)

    assert code == 0, daemon.log
    (run,) = all_runs(engine)
    assert run.outcome == "stopped", daemon.log
    assert run.finished_at is not None
    assert run.pages > 0
    assert run.tasks_seen == count(engine, tasks)
    assert f"{signum.name} received: stopping after the pages being" in daemon.log


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_daemon_empties_sqlites_wal_between_runs(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    # Its pooled connections kept the file at its largest for good: beside a
    # small database, thirty times the database's size.
    add_tasks(simulator, 16)
    wal = Path(db_url.removeprefix("sqlite:///") + "-wal")
    daemon = started(write_config(tmp_path, server, simulator, db_url))

    wait_until(lambda: len(finished_runs(engine)) >= 2, "two runs")
    wait_until(lambda: wal.stat().st_size > 0, "a run writing to the WAL")
    wait_until(lambda: wal.stat().st_size == 0, "the WAL emptied after a run")
    code = daemon.stop()

    assert code == 0, daemon.log


def test_a_daemon_started_ignoring_sighup_goes_on_after_one(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    # Under nohup, the terminal closing must not stop it.
    add_tasks(simulator, 16, only_main=True)
    simulator.delay = 0.05
    config = write_config(tmp_path, server, simulator, db_url)
    daemon = started(config, ignoring=(signal.SIGHUP,))

    wait_until(lambda: count(engine, tasks) > 0, "a first page stored")
    daemon.process.send_signal(signal.SIGHUP)
    wait_until(lambda: len(finished_runs(engine)) >= 2, "two runs")
    running = daemon.process.poll() is None
    code = daemon.stop(signal.SIGTERM)

    assert running, daemon.log
    assert code == 0, daemon.log
    assert all_runs(engine)[0].outcome == "succeeded", daemon.log
    assert "SIGHUP" not in daemon.log


@pytest.mark.parametrize("command", ["sync", "backfill"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_a_sync_or_backfill_which_exits_130(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
    command: str,
    signum: signal.Signals,
) -> None:
    add_tasks(simulator, 16, only_main=True)
    simulator.delay = 0.05
    run_process = started(write_config(tmp_path, server, simulator, db_url), command)

    wait_until(lambda: count(engine, tasks) > 0, "a first page stored")
    code = run_process.stop(signum)

    assert code == 130, run_process.log
    (run,) = all_runs(engine)
    assert (run.kind, run.outcome, run.pages > 0) == (command, "stopped", True)
    assert f"Run {run.id} ({command}) stopped" in run_process.log
    assert "Traceback" not in run_process.log


def test_a_stopped_sync_exits_without_waiting_for_answers_in_flight(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    # The process used to exit only once every walk's HTTP answer, or the
    # read timeout, had come: 10 s here after a one-second stop.
    add_tasks(simulator, 16)
    simulator.delay = 0.2
    run_process = started(write_config(tmp_path, server, simulator, db_url), "sync")
    wait_until(lambda: count(engine, tasks) > 0, "a first page stored")
    simulator.delay = 12.0
    time.sleep(0.5)  # every walk now waits for an answer

    asked = time.monotonic()
    code = run_process.stop(signal.SIGTERM)
    took = time.monotonic() - asked
    simulator.delay = 0.0

    assert code == 130, run_process.log
    assert took < 5.0, run_process.log
    (run,) = all_runs(engine)
    assert run.outcome == "stopped"
    assert " retry 1 of " not in run_process.log  # nothing after the stop
    assert "Traceback" not in run_process.log


# SIGTERM, SIGINT and SIGHUP as bits of a /proc signal mask.
STOP_MASK = sum(
    1 << (number - 1) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
)


def blocked_signals(pid: int) -> dict[int, int]:
    """Each thread of a process, and the signals it blocks (Linux's /proc)."""
    masks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between listing and reading
        for line in status.splitlines():
            if line.startswith("SigBlk:"):
                masks[int(task.name)] = int(line.split()[1], 16)
    return masks


def started_with_signals_left_to_main(pid: int, threads: int) -> dict[int, int]:
    """The masks once `threads` run and the main thread takes the signals.

    The main thread blocks the signals for the instant it starts a thread,
    so that the thread is born with them blocked; a reading taken in that
    instant is taken again. A main thread that kept them blocked never
    passes, and the wait fails.
    """
    masks = blocked_signals(pid)
    if len(masks) >= threads and masks[pid] & STOP_MASK == 0:
        return masks
    return {}


# The main thread, and a walker at least with the run's watcher and lock
# heartbeat; in a daemon, the stop watcher and the scheduler's worker too.
THREADS_OF_A_RUN = {"daemon": 6, "sync": 4}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("command", ["daemon", "sync"])
def test_signals_go_to_the_main_thread(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,  # the migrated database
    started: Callable[..., Daemon],
    command: str,
) -> None:
    # Python answers a signal in the main thread only: one the kernel gave to
    # another thread waited for the main thread to wake by itself, which a
    # daemon waiting for its run to end did after half a minute.
    add_tasks(simulator, 16)
    simulator.delay = 0.5
    daemon = started(write_config(tmp_path, server, simulator, db_url), command)
    pid = daemon.process.pid
    threads = THREADS_OF_A_RUN[command]
    masks = wait_until(
        lambda: started_with_signals_left_to_main(pid, threads),
        "a run's walks started, the main thread taking the stop signals",
    )

    del masks[pid]
    assert {tid: mask & STOP_MASK for tid, mask in masks.items()} == dict.fromkeys(
        masks, STOP_MASK
    )


def test_a_second_signal_exits_at_once_and_the_next_run_cleans_up(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    simulator.delay = 3.0
    path = write_config(tmp_path, server, simulator, db_url)
    daemon = started(path)
    wait_until(lambda: all_runs(engine), "a run started")

    # The stopped run cannot record its end: the first signal's stop waits,
    # the second signal does not.
    with runs_table_held(engine, db_url):
        daemon.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        code = daemon.stop(signal.SIGTERM)

    assert code == 128 + signal.SIGTERM, daemon.log
    assert "second SIGTERM: exiting at once" in daemon.log
    simulator.delay = 0.0
    summary = run_sync(load(path), engine=engine)
    outcomes = [run.outcome for run in all_runs(engine)]
    assert (summary.outcome, outcomes) == (
        "succeeded",
        ["abandoned", "succeeded"],
    ), daemon.log


def load(path: Path) -> config_module.Config:
    return config_module.load(path, {"TASK_ETL_TOKEN": TOKEN})


@contextmanager
def runs_table_held(engine: Engine, db_url: str) -> Iterator[None]:
    """Another connection holding the lock a run needs to write its end."""
    if engine.dialect.name == "sqlite":
        with write_lock_held(db_url):
            yield
        return
    with engine.connect() as connection:
        connection.exec_driver_sql("LOCK TABLE sync_runs IN EXCLUSIVE MODE")
        yield
        connection.rollback()


def test_a_stop_ends_a_page_s_wait_for_another_writer(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
) -> None:
    # The page used to wait until the other writer let go, on SQLite up to
    # the busy timeout, 30 s here, on PostgreSQL without end, and was
    # written after the stop.
    add_tasks(simulator, 8, only_main=True)
    config = load(write_config(tmp_path, server, simulator, db_url))
    stop = threading.Event()
    writer = LockAfterFirstPage(db_url, stop)

    summary = run_sync(config, engine=engine, progress=writer, stop=stop)
    writer.close()

    assert (summary.outcome, summary.accounts_failed) == ("stopped", 0)
    assert summary.errors == ()
    # The pages stored before the lock was taken, written together or not,
    # and none of those that waited for it.
    assert count(engine, tasks) == writer.stored_then == summary.counts.seen
    assert summary.counts.seen < len(simulator.tasks())


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("halt", "code", "message"),
    [
        ("stop", 130, "stopped before the run began, while waiting for another"),
        ("deadline", 1, "deadline exceeded: the run had not begun after 0.5 s"),
    ],
)
def test_a_halt_ends_the_wait_of_a_run_for_another_writer_before_it_began(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    halt: str,
    code: int,
    message: str,
) -> None:
    # Recording the run's start waited out the busy timeout, 30 s here,
    # whatever came meanwhile, and the run then began after the stop.
    add_tasks(simulator, 2, only_main=True)
    config = load(write_config(tmp_path, server, simulator, db_url))
    stop = threading.Event()
    if halt == "stop":
        threading.Timer(0.5, stop.set).start()

    began = time.monotonic()
    with write_lock_held(db_url), pytest.raises(RunNotBegun) as caught:
        run_sync(config, engine=engine, stop=stop, deadline=0.5)
    took = time.monotonic() - began

    assert str(caught.value).startswith(message)
    assert caught.value.exit_code == code
    assert took < 3.0
    assert count(engine, sync_runs) == count(engine, tasks) == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_stop_lets_the_account_locks_go_without_waiting_for_another_writer(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each lock's release waited the busy timeout for the other writer, one
    # after the other: with 8 accounts held and 5 s, a stop took 48 s.
    add_tasks(simulator, 8, only_main=True)
    config = load(write_config(tmp_path, server, simulator, db_url))
    config = dataclasses.replace(
        config, database=dataclasses.replace(config.database, busy_timeout=1.0)
    )
    impatient = store.connect(config.database)
    stop = threading.Event()
    # Once both accounts' locks are held: now and then the sub-account's
    # was still to be taken when the first page was stored, and never was.
    writer = LockAfterFirstPage(db_url, stop, hold=15.0, accounts_locked=2)

    with (
        caplog.at_level(logging.WARNING, logger="etl.locks"),
        pytest.raises(StoreError, match="database is locked") as raised,
    ):
        run_sync(config, engine=impatient, progress=writer, stop=stop)
    took = time.monotonic() - (writer.stopped_at or 0.0)
    writer.close()
    impatient.dispose()

    left = [r for r in caplog.records if "could not release" in r.getMessage()]
    assert len(left) >= 2
    # One line each: SQLAlchemy's text goes on with the statement and a link.
    assert all(len(r.getMessage().splitlines()) == 1 for r in left)
    # It read as a failure of its own, exit 1.
    assert str(raised.value).startswith("stopped, but the stop could not be recorded")
    assert raised.value.exit_code == 130
    # Recording the stop waits the busy timeout once; no release waits.
    assert took < 2.5
    assert count(engine, tasks) == writer.stored_then
    # The locks it left are this process's ended run's: the next run takes
    # them over at once instead of waiting for their lease to run out.
    with caplog.at_level(logging.WARNING, logger="etl.locks"):
        again = run_sync(config, engine=engine)
    assert (again.outcome, again.accounts_skipped) == ("succeeded", 0)
    taken = [r for r in caplog.records if "earlier run of this process" in r.message]
    assert len(taken) == len(left)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_second_signal_exits_at_once_while_another_writer_holds_sqlite(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    # A signal's handler runs in the main thread between two bytecodes, which
    # SQLite's own wait for its lock never reached: the second signal was
    # handled only when the busy timeout of 30 s had passed.
    add_tasks(simulator, 8, only_main=True)
    simulator.delay = 0.2
    path = write_config(tmp_path, server, simulator, db_url)
    run_process = started(path, "sync")
    wait_until(lambda: "run 1 (sync) started" in run_process.log, "the run started")
    holder = other_writer(db_url)
    holder.execute("BEGIN IMMEDIATE")
    time.sleep(1.0)  # the run now waits for the lock

    run_process.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    code = run_process.stop(signal.SIGTERM)
    holder.execute("ROLLBACK")
    holder.close()

    assert code == 128 + signal.SIGTERM, run_process.log
    assert "second SIGTERM: exiting at once" in run_process.log


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_daemon_stopped_before_its_run_began_says_so_and_stops(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    # It logged "the run failed: stopped before the run began ...; the
    # daemon goes on", and then stopped.
    path = write_config(tmp_path, server, simulator, db_url)
    with write_lock_held(db_url):
        daemon = started(path)
        wait_until(lambda: "daemon started" in daemon.log, "the daemon started")
        time.sleep(1.0)  # its first run now waits for the lock to begin
        code = daemon.stop(signal.SIGTERM)

    assert code == 0, daemon.log
    assert "stopped before the run began" in daemon.log
    assert "the daemon goes on" not in daemon.log
    assert "daemon stopped" in daemon.log
    assert all_runs(engine) == []


def test_two_daemons_never_walk_the_same_account_at_once(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    # Each run holds both accounts for most of the interval, so runs of the
    # two daemons cannot help meeting.
    add_tasks(simulator, 10)
    simulator.delay = 0.1
    path = write_config(tmp_path, server, simulator, db_url, api="parallelism = 2")
    first, second = started(path), started(path)

    wait_until(lambda: len(finished_runs(engine)) >= 4, "four runs")
    codes = (first.stop(), second.stop())

    assert codes == (0, 0), first.log + second.log
    with engine.connect() as connection:
        walks = list(connection.execute(select(sync_run_accounts)))
    assert {run.pid for run in all_runs(engine)} == {
        first.process.pid,
        second.process.pid,
    }
    assert any(walk.outcome == "skipped" for walk in walks), first.log + second.log
    by_account: dict[tuple[str, str], list[Any]] = {}
    for walk in walks:
        if walk.outcome != "skipped":
            by_account.setdefault((walk.user_id, walk.sub_user_id), []).append(walk)
    assert len(by_account) == 2
    for account_walks in by_account.values():
        account_walks.sort(key=lambda walk: walk.started_at)
        for a, b in pairwise(account_walks):
            assert a.finished_at <= b.started_at, (a, b)


def snapshot(engine: Engine) -> tuple[set[tuple[Any, ...]], Counter[tuple[Any, ...]]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                tasks.c.uuid,
                tasks.c.user_id,
                tasks.c.sub_user_id,
                tasks.c.status,
                tasks.c.content_hash,
                tasks.c.removed_at.is_(None),
            )
        )
        changes = connection.execute(
            select(
                task_status_changes.c.task_uuid,
                task_status_changes.c.event,
                task_status_changes.c.old_status,
                task_status_changes.c.new_status,
            )
        )
        return {tuple(row) for row in rows}, Counter(tuple(row) for row in changes)


def test_a_daemon_killed_mid_run_is_followed_by_a_clean_run(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    add_tasks(simulator, 12)
    simulator.delay = 0.03
    # PostgreSQL frees a killed session's locks once it notices the socket
    # closed; the next run may have to wait that long.
    path = write_config(tmp_path, server, simulator, db_url, locks="wait = 10")
    daemon = started(path)
    wait_until(lambda: count(engine, tasks) >= 4, "some pages stored")

    daemon.kill()
    simulator.delay = 0.0
    summary = run_sync(load(path), engine=engine)

    assert summary.outcome == "succeeded"
    assert [run.outcome for run in all_runs(engine)] == ["abandoned", "succeeded"]
    # The killed run's counts say what its committed pages hold, not zero:
    # all of them but those of its last second, at most.
    killed = all_runs(engine)[0]
    with engine.connect() as connection:
        left = connection.execute(
            select(func.count()).where(task_status_changes.c.run_id == killed.id)
        ).scalar_one()
    assert 1 <= killed.tasks_new == killed.status_changes <= left
    assert killed.tasks_seen >= killed.tasks_new
    assert killed.pages >= 1
    clean = store.connect(DatabaseConfig(url=f"sqlite:///{tmp_path / 'clean.db'}"))
    store.migrate(clean)
    run_sync(load(path), engine=clean)
    stored, changes = snapshot(engine)
    assert (stored, changes) == snapshot(clean)
    assert set(changes.values()) == {1}
    clean.dispose()


# Paused past its lease, a run was marked abandoned by the next run to start;
# woken, it wrote its pages on, and its end overwrote `abandoned`.
def test_a_sync_woken_after_it_was_marked_abandoned_writes_nothing_more(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    add_tasks(simulator, 40)
    simulator.delay = 0.05
    path = write_config(
        tmp_path,
        server,
        simulator,
        db_url,
        locks="lease = 1",
        database="busy_timeout = 0.5",
    )
    sync = started(path, "sync")
    wait_until(lambda: count(engine, tasks) >= 4, "some pages stored")

    other = store.connect(DatabaseConfig(url=db_url, busy_timeout=0.5))
    try:
        abandoned_while_paused(sync.process, other)
        before = snapshot(engine), count(engine, sync_run_accounts)
    finally:
        sync.process.send_signal(signal.SIGCONT)
        other.dispose()
    code = sync.process.wait(timeout=EXIT_WAIT)

    assert code == 1, sync.log
    assert "Error: run 1 was marked abandoned by another run" in sync.log
    assert (snapshot(engine), count(engine, sync_run_accounts)) == before
    (run,) = all_runs(engine)
    assert run.outcome == "abandoned"


def abandoned_while_paused(process: subprocess.Popen[bytes], other: Engine) -> None:
    """Pause the process past its lease of 1 s, and have `other`, as the next
    run to start would, mark its run abandoned.

    Paused while it held the database's write lock, it keeps it: it is let
    go on for a moment, and paused again.
    """
    for _ in range(10):
        process.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        try:
            assert runs.abandon_dead_runs(other, lease=1) == 1
            return
        except OperationalError as exc:
            if not store.is_lock_wait(exc):
                raise
        process.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("the paused process held the write lock ten times")


def test_a_run_past_its_deadline_fails_and_the_daemon_goes_on(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    engine: Engine,
    started: Callable[..., Daemon],
) -> None:
    add_tasks(simulator, 16, only_main=True)
    simulator.delay = 0.2
    schedule = "interval = 1.5\ndeadline = 1"
    daemon = started(write_config(tmp_path, server, simulator, db_url, schedule))

    wait_until(lambda: finished_runs(engine), "a first run ended")
    simulator.delay = 0.0
    wait_until(
        lambda: any(run.outcome == "succeeded" for run in all_runs(engine)),
        "a run that succeeded",
    )
    code = daemon.stop()

    assert code == 0, daemon.log
    first = all_runs(engine)[0]
    assert first.outcome == "failed"
    assert "deadline exceeded" in first.error
    assert "deadline exceeded: the run was still going after 1 s" in daemon.log


def test_skipped_and_missed_runs_are_logged_and_an_outage_ends_in_one_run(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    sqlite_url: str,
    started: Callable[..., Daemon],
) -> None:
    # The scheduler is under test here; the database only keeps the record.
    engine = store.connect(DatabaseConfig(url=sqlite_url))
    store.migrate(engine)
    add_tasks(simulator, 12, only_main=True)
    simulator.delay = 0.15
    daemon = started(write_config(tmp_path, server, simulator, sqlite_url))
    wait_until(lambda: finished_runs(engine), "a first, slow run")
    simulator.delay = 0.0

    daemon.process.send_signal(signal.SIGSTOP)
    time.sleep(2.5)
    daemon.process.send_signal(signal.SIGCONT)
    resumed = runs_count = len(all_runs(engine))
    wait_until(lambda: len(finished_runs(engine)) >= resumed + 2, "two more runs")
    code = daemon.stop()

    assert code == 0, daemon.log
    assert "was skipped: the previous run is still going" in daemon.log
    assert "scheduled run(s) from" in daemon.log, daemon.log
    assert "did not start: the daemon was suspended or busy" in daemon.log
    starts = [run.started_at for run in all_runs(engine)][runs_count:]
    assert all((b - a).total_seconds() > 0.5 for a, b in pairwise(starts)), starts
    engine.dispose()


class _Unavailable(BaseHTTPRequestHandler):
    """Asks every caller to come back in 30 s."""

    def do_GET(self) -> None:
        body = b'{"code": 503, "status": "error", "message": "busy"}'
        self.send_response(503)
        self.send_header("Retry-After", "30")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def unavailable() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    ("discover", "halt", "outcome"),
    [
        (False, "stop", "stopped"),
        (False, "deadline", "failed"),
        (True, "stop", "stopped"),
    ],
    ids=["walk-stop", "walk-deadline", "discovery-stop"],
)
def test_a_stop_or_the_deadline_cuts_a_retry_sleep_short(
    unavailable: str, engine: Engine, discover: bool, halt: str, outcome: str
) -> None:
    config = Config(
        database=DatabaseConfig(),
        api=ApiConfig(base_url=unavailable, token=TOKEN),
        accounts=(MainAccount(user_id="main-1", discover_sub_accounts=discover),),
    )
    stop = threading.Event()
    summaries: list[RunSummary] = []
    options = {"stop": stop} if halt == "stop" else {"deadline": 0.5}
    run = threading.Thread(
        target=lambda: summaries.append(run_sync(config, engine=engine, **options))
    )
    run.start()
    time.sleep(0.5)
    stop.set()
    run.join(timeout=10)

    assert not run.is_alive(), "the run slept through the stop"
    (summary,) = summaries
    assert (summary.outcome, summary.pages) == (outcome, 0)
    if halt == "deadline":
        assert "deadline exceeded" in summary.errors[-1]


def test_the_deadline_counts_the_accounts_it_left_unwalked_as_failed(
    unavailable: str, engine: Engine
) -> None:
    config = Config(
        database=DatabaseConfig(),
        api=ApiConfig(base_url=unavailable, token=TOKEN, parallelism=1),
        accounts=tuple(MainAccount(user_id=f"main-{n}") for n in range(3)),
    )

    summary = run_sync(config, engine=engine, deadline=0.5)

    # One walk began and waits out a Retry-After; two never began.
    assert (summary.outcome, summary.accounts, summary.accounts_failed) == (
        "failed",
        3,
        3,
    )
    with engine.connect() as connection:
        walks = connection.execute(select(sync_run_accounts)).all()
    assert [(walk.outcome, walk.error) for walk in walks] == [
        ("failed", "deadline exceeded")
    ]
