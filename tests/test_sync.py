import gc
import logging
import re
import sys
import time
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from synced import sync_config
from writers import TasksLock

from etl import garbage, store
from etl.config import Config, DatabaseConfig, Endpoints, MainAccount
from etl.errors import StoreError
from etl.models import accounts, sync_runs, task_status_changes, tasks
from etl.simulator import SimServer, Simulator
from etl.sync import Filters, run_sync


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=11, main_accounts=2, sub_accounts=2, tasks_per_account=12)


def listed(engine: Engine) -> dict[str, int | None]:
    """The tasks stored as listed and not flagged as missed by a complete walk.

    A walk that wrongly counted as complete would flag the tasks it missed,
    though it removes none: with the flagged ones left out, tests of such
    walks still tell.
    """
    query = select(tasks.c.uuid, tasks.c.status).where(
        tasks.c.removed_at.is_(None), tasks.c.unlisted_after.is_(None)
    )
    with engine.connect() as connection:
        return {row.uuid: row.status for row in connection.execute(query)}


def not_removed(engine: Engine) -> dict[str, int | None]:
    query = select(tasks.c.uuid, tasks.c.status).where(tasks.c.removed_at.is_(None))
    with engine.connect() as connection:
        return {row.uuid: row.status for row in connection.execute(query)}


def truth(simulator: Simulator) -> dict[str, int]:
    return {
        task.uuid: task.history[-1][1]
        for task in simulator.tasks()
        if task.removed_at is None
    }


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(table)).scalar_one()
        )


def test_sync_stores_every_task_of_every_account(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    summary = run_sync(sync_config(server, simulator), engine=engine)

    assert summary.outcome == "succeeded"
    assert summary.accounts == len(simulator.accounts())
    assert listed(engine) == truth(simulator)
    assert summary.counts.new == len(truth(simulator))
    assert count(engine, task_status_changes) == len(truth(simulator))
    assert count(engine, accounts) == len(simulator.accounts())


def test_a_run_leaves_python_s_switch_interval_alone(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    # A setting of the whole process, which a daemon's other threads share;
    # shortened for runs, it cost a re-sync more than it gave a first sync.
    during: list[float] = []
    before = sys.getswitchinterval()

    run_sync(
        sync_config(server, simulator),
        engine=engine,
        progress=lambda _: during.append(sys.getswitchinterval()),
    )

    assert during and set(during) == {before}


def test_a_run_makes_the_collector_look_at_new_objects_less_often(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    # Its pages, alive until stored, were walked by the collector again and
    # again; the setting is the process's, and put back when the run ends.
    during: list[tuple[int, int, int]] = []
    before = gc.get_threshold()

    run_sync(
        sync_config(server, simulator),
        engine=engine,
        progress=lambda _: during.append(gc.get_threshold()),
    )

    assert during and set(during) == {(garbage.YOUNG_LOOK_EVERY, *before[1:])}
    assert gc.get_threshold() == before


def test_second_sync_of_an_unchanged_source_writes_nothing(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    config = sync_config(server, simulator)
    run_sync(config, engine=engine)
    history = count(engine, task_status_changes)

    summary = run_sync(config, engine=engine)

    counts = summary.counts
    assert (counts.new, counts.changed, counts.removed) == (0, 0, 0)
    assert counts.status_changes == 0
    assert count(engine, task_status_changes) == history


def test_changes_removals_and_new_tasks_follow_the_platform(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    config = sync_config(server, simulator)
    run_sync(config, engine=engine)
    before = truth(simulator)

    simulator.advance(6 * 3600)
    summary = run_sync(config, engine=engine)

    after = truth(simulator)
    gone = before.keys() - after.keys()
    assert gone
    # The first walk to miss a task only flags it, with its last status.
    assert not_removed(engine) == after | {uuid: before[uuid] for uuid in gone}
    assert listed(engine) == after
    assert summary.counts.removed == 0
    assert summary.counts.new == len(after.keys() - before.keys())
    changed = {u for u in before.keys() & after.keys() if before[u] != after[u]}
    assert summary.counts.status_changes == len(changed) + summary.counts.new

    confirmed = run_sync(config, engine=engine)

    assert listed(engine) == after
    assert confirmed.counts.removed == confirmed.counts.status_changes == len(gone)
    assert confirmed.counts.new == confirmed.counts.changed == 0
    with engine.connect() as connection:
        removed = connection.execute(
            select(tasks.c.uuid).where(tasks.c.removed_at.is_not(None))
        ).scalars()
        assert set(removed) == gone


def test_removals_are_logged_once_per_account_not_once_per_task(
    simulator: Simulator,
    server: SimServer,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = sync_config(server, simulator)
    run_sync(config, engine=engine)
    gone = [task for task in simulator.tasks() if not task.sub_user_id][:3]
    for task in gone:
        simulator.remove_task(task.uuid)

    with caplog.at_level(logging.INFO, logger="etl.store"):
        run_sync(config, engine=engine)
        run_sync(config, engine=engine)

    # The store's records only: once a CLI test has set the root logger to
    # INFO, the run's summary line ("... 0 removed ...") is captured too.
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "etl.store" and r.levelno == logging.INFO
    ]
    removals = [line for line in lines if "removed" in line]
    assert removals == [
        f"account {gone[0].user_id}: 3 task(s) not listed; marked removed if the "
        "next complete walk misses them too",
        f"account {gone[0].user_id}: 3 task(s) no longer listed, marked removed",
    ]


def test_a_task_that_comes_back_is_restored(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    config = sync_config(server, simulator)
    run_sync(config, engine=engine)
    uuid = simulator.tasks()[0].uuid

    simulator.remove_task(uuid)
    run_sync(config, engine=engine)
    run_sync(config, engine=engine)
    assert uuid not in listed(engine)
    simulator.restore_task(uuid)
    summary = run_sync(config, engine=engine)

    assert summary.counts.restored == 1
    assert uuid in listed(engine)
    query = (
        select(task_status_changes.c.event)
        .where(task_status_changes.c.task_uuid == uuid)
        .order_by(task_status_changes.c.id)
    )
    with engine.connect() as connection:
        events = connection.execute(query).scalars().all()
    assert events == ["first_seen", "removed", "restored"]


def test_failed_account_does_not_stop_the_others_or_remove_anything(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    run_sync(sync_config(server, simulator), engine=engine)
    first, second = simulator.main_user_ids()
    bad = sync_config(server, simulator)
    bad = Config(
        database=bad.database,
        api=bad.api,
        accounts=(
            MainAccount(user_id=first, token="wrong-token", discover_sub_accounts=True),
            MainAccount(user_id=second, discover_sub_accounts=True),
        ),
    )
    simulator.advance(6 * 3600)

    summary = run_sync(bad, engine=engine)

    assert summary.outcome == "partial"
    assert summary.exit_code == 3
    assert any("token" in error for error in summary.errors)
    assert all("wrong-token" not in error for error in summary.errors)
    stored = listed(engine)
    live_second = {
        t.uuid for t in simulator.tasks() if t.user_id == second and not t.removed_at
    }
    assert live_second <= stored.keys()
    removed_first = [
        t.uuid for t in simulator.tasks() if t.user_id == first and t.removed_at
    ]
    assert all(uuid in stored for uuid in removed_first)


# A path the simulator does not serve: the sub-account list answers 404.
UNSERVED = Endpoints(sub_account_list="/agent-api/user/{user_id}/subs")


def account_rows(engine: Engine) -> dict[tuple[str, str], Any]:
    with engine.connect() as connection:
        return {
            (row.user_id, row.sub_user_id): row
            for row in connection.execute(select(accounts))
        }


def test_failed_discovery_walks_the_sub_accounts_earlier_runs_found(
    simulator: Simulator,
    server: SimServer,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run_sync(sync_config(server, simulator), engine=engine)
    before = truth(simulator)
    simulator.advance(6 * 3600)
    subs = {t.uuid for t in simulator.tasks() if t.sub_user_id}
    moved = {u for u in subs if truth(simulator).get(u) != before.get(u)}
    assert moved, "the sub-accounts' tasks must change for this test to tell"

    with caplog.at_level(logging.WARNING, logger="etl.sync"):
        summary = run_sync(
            sync_config(server, simulator, endpoints=UNSERVED), engine=engine
        )

    assert (summary.outcome, summary.exit_code) == ("partial", 3)
    assert (summary.accounts, summary.accounts_failed) == (6, 0)
    assert listed(engine) == truth(simulator)
    mains = simulator.main_user_ids()
    errors = [
        f"sub-account discovery failed: account {user_id}, endpoint "
        f"{UNSERVED.sub_account_list}, page 1, HTTP 404: the platform rejected the "
        "request: '接口不存在'"
        for user_id in mains
    ]
    assert list(summary.errors) == errors
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "etl.sync" and r.levelno == logging.WARNING
    ]
    # The lists are read side by side: the log has them in either order.
    assert sorted(warnings) == sorted(
        f"account {user_id}: sub-account discovery failed; walking the 2 "
        "sub-accounts discovered by earlier runs instead"
        for user_id in mains
    )
    rows = account_rows(engine)
    assert {key: row.last_error for key, row in rows.items()} == {
        **{(a.user_id, a.sub_user_id): None for a in simulator.accounts()},
        **{(user_id, ""): error for user_id, error in zip(mains, errors, strict=True)},
    }
    assert {row.last_run_id for row in rows.values()} == {summary.run_id}
    assert {row.last_outcome for row in rows.values()} == {"succeeded"}


def test_failed_discovery_shows_on_the_sub_accounts_without_a_main_walk(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    first = simulator.main_user_ids()[0]
    config = sync_config(server, simulator)
    config = Config(
        database=config.database,
        api=config.api,
        accounts=(
            MainAccount(
                user_id=first, sync_own_tasks=False, discover_sub_accounts=True
            ),
        ),
    )
    run_sync(config, engine=engine)
    broken = Config(
        database=config.database,
        api=sync_config(server, simulator, endpoints=UNSERVED).api,
        accounts=config.accounts,
    )

    summary = run_sync(broken, engine=engine)

    assert (summary.outcome, summary.accounts, summary.accounts_failed) == (
        "partial",
        2,
        0,
    )
    (error,) = summary.errors
    assert error.startswith(f"sub-account discovery failed: account {first}, ")
    subs = [a.sub_user_id for a in simulator.accounts() if a.user_id == first]
    rows = account_rows(engine)
    assert sorted(rows) == sorted((first, sub) for sub in subs if sub)
    assert {row.last_error for row in rows.values()} == {error}


def test_filtered_walk_never_marks_removals(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    config = sync_config(server, simulator)
    run_sync(config, engine=engine)

    summary = run_sync(config, engine=engine, filters=Filters(statuses=(1,)))

    assert summary.outcome == "succeeded"
    assert summary.counts.removed == 0
    assert listed(engine) == truth(simulator)


def test_every_run_is_recorded_with_its_counts(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    summary = run_sync(sync_config(server, simulator), engine=engine)

    with engine.connect() as connection:
        run = connection.execute(select(sync_runs)).one()
    assert (run.id, run.outcome, run.kind) == (summary.run_id, "succeeded", "sync")
    assert (run.tasks_new, run.pages) == (summary.counts.new, summary.pages)
    assert run.finished_at is not None


def test_sqlite_and_postgresql_hold_the_same_rows(
    simulator: Simulator, server: SimServer, sqlite_url: str, pg_url: str
) -> None:
    snapshots = []
    for url in (sqlite_url, pg_url):
        engine = store.connect(DatabaseConfig(url=url))
        store.migrate(engine)
        run_sync(sync_config(server, simulator), engine=engine)
        columns = [c for c in tasks.c if not c.name.endswith("_seen_at")]
        columns = [c for c in columns if c.name != "last_changed_at"]
        with engine.connect() as connection:
            rows = connection.execute(select(*columns).order_by(tasks.c.uuid)).all()
        snapshots.append([tuple(row) for row in rows])
        engine.dispose()

    assert snapshots[0] == snapshots[1]
    assert len(snapshots[0]) == len(truth(simulator))


def test_a_lock_held_past_the_busy_timeout_fails_each_account_without_more_waits(
    simulator: Simulator, server: SimServer, pg_url: str
) -> None:
    # Pages written together that failed on the lock were each written again
    # alone, and each waited the busy timeout once more: the run's wait grew
    # with its pages, here to seven waits or more.
    engine = store.connect(DatabaseConfig(url=pg_url, busy_timeout=1.0))
    store.migrate(engine)
    lock = TasksLock(pg_url)
    lock.take()

    began = time.monotonic()
    summary = run_sync(sync_config(server, simulator), engine=engine)
    took = time.monotonic() - began
    lock.let_go()
    lock.close()
    engine.dispose()

    assert (summary.outcome, summary.accounts_failed) == ("failed", 6)
    page = re.compile(r"account \S+, endpoint \S+, page \d+: the page was not written")
    assert len(summary.errors) == 6
    assert all(page.match(e) and "lock timeout" in e for e in summary.errors)
    assert took < 6.5


def test_a_run_ended_by_the_database_records_the_database_s_words(
    simulator: Simulator, server: SimServer, pg_url: str
) -> None:
    # Another session's lock on the accounts table outlasted the busy timeout
    # while the run registered its accounts: the run's record said only
    # "the run crashed".
    engine = store.connect(DatabaseConfig(url=pg_url, busy_timeout=0.5))
    store.migrate(engine)
    holder = engine.connect()
    holder.exec_driver_sql("LOCK TABLE accounts IN EXCLUSIVE MODE")

    with pytest.raises(StoreError) as caught:
        run_sync(sync_config(server, simulator), engine=engine)
    holder.rollback()
    holder.close()

    said = "the database failed: canceling statement due to lock timeout"
    assert str(caught.value) == said
    with engine.connect() as connection:
        run = connection.execute(select(sync_runs)).one()
    engine.dispose()
    assert (run.outcome, run.error) == ("failed", said)
