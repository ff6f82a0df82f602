import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from sqlalchemy import Engine, MetaData, inspect, select, text
from sqlalchemy import event as sqlalchemy_event
from synced import BACKENDS, History, open_history

from etl import rollup, runs, store
from etl.config import DatabaseConfig
from etl.errors import RunInterrupted
from etl.models import settings, task_status_changes, tasks
from etl.views import (
    VIEWS,
    current_tasks,
    daily_status_counts,
    task_status_periods,
    view_sql,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
BEFORE_VIEWS = "02ec0e391456"

# A history written at the schema before the views: T0 is 09:00 on 1 March
# in Shanghai, T1 01:00 on 2 March there (still 1 March in UTC), T2 20:00.
T0 = datetime(2026, 3, 1, 1, 0, tzinfo=UTC)
T1 = datetime(2026, 3, 1, 17, 0, tzinfo=UTC)
T2 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MAIN, SUB = ("m1", ""), ("m1", "s1")


@pytest.fixture(scope="module", params=BACKENDS)
def history(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    yield from open_history(request, tmp_path_factory)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = store.connect(DatabaseConfig(url=db_url))
    yield engine
    engine.dispose()


def upgrade(engine: Engine, revision: str) -> None:
    config = store._alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def rows(engine: Engine, query: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(query)]


def test_views_have_the_columns_of_their_models(engine: Engine) -> None:
    store.migrate(engine)

    for view in VIEWS:
        with engine.connect() as connection:
            result = connection.execute(text(f"SELECT * FROM {view.name} WHERE 1 = 0"))
            assert list(result.keys()) == [column.name for column in view.c], view
    assert set(inspect(engine).get_view_names()) == {view.name for view in VIEWS}


def test_migrated_views_are_the_current_definitions(engine: Engine) -> None:
    store.migrate(engine)
    dialect = engine.dialect.name

    with engine.begin() as connection:
        for view in VIEWS:
            current = view_sql(view.name, dialect)
            if dialect == "sqlite":
                stored = connection.execute(
                    text("SELECT sql FROM sqlite_master WHERE name = :name"),
                    {"name": view.name},
                ).scalar_one()
                assert stored == f"CREATE VIEW {view.name} AS {current}"
            else:
                # PostgreSQL keeps its own rendering: compare like with like.
                connection.execute(text(f"CREATE TEMP VIEW probe AS {current}"))
                migrated, wanted = (
                    connection.execute(
                        text("SELECT pg_get_viewdef(CAST(:name AS regclass))"),
                        {"name": name},
                    ).scalar_one()
                    for name in (view.name, "probe")
                )
                connection.execute(text("DROP VIEW probe"))
                assert migrated == wanted, view.name


def test_postgresql_views_carry_the_comments_of_their_models(pg_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    inspector = inspect(engine)

    for view in VIEWS:
        stored = {c["name"]: c["comment"] for c in inspector.get_columns(view.name)}
        assert stored == {column.name: column.comment for column in view.c}
        assert inspector.get_table_comment(view.name)["text"] == view.comment
    engine.dispose()


def insert_history_before_views(engine: Engine) -> None:
    """Accounts, a group, four runs and four tasks whose history has a
    change, a removal, a restore and an unknown status code."""
    is_sqlite = engine.dialect.name == "sqlite"

    def at(moment: datetime) -> datetime:
        return moment.replace(tzinfo=None) if is_sqlite else moment

    schema = MetaData()
    schema.reflect(engine)
    run_counts = dict.fromkeys(
        (
            "accounts accounts_failed pages tasks_seen tasks_new tasks_changed "
            "tasks_removed tasks_restored status_changes rejected bad_values"
        ).split(),
        0,
    )
    changes = [
        ("a", 1, "first_seen", None, 2, T0),
        ("b", 1, "first_seen", None, 3, T0),
        ("a", 2, "changed", 2, 1, T1),
        ("b", 2, "removed", 3, None, T1),
        ("c", 2, "first_seen", None, 2, T1),
        ("b", 3, "restored", None, 2, T2),
        ("c", 3, "removed", 2, None, T2),
        ("d", 3, "first_seen", None, 7, T2),
    ]
    current = {"a": (MAIN, 1, None), "b": (SUB, 2, None), "c": (MAIN, 2, T2)}
    current["d"] = (SUB, 7, None)
    with engine.begin() as connection:
        for key, name in ((MAIN, "主账号1"), (SUB, "子账号1")):
            connection.execute(
                schema.tables["accounts"].insert(),
                {
                    "user_id": key[0],
                    "sub_user_id": key[1],
                    "name": name,
                    "origin": "configured",
                    "first_seen_at": at(T0),
                },
            )
        connection.execute(
            schema.tables["groups"].insert(),
            {"id": "g1", "name": "话术组1", "first_seen_at": at(T0)}
            | {"last_changed_at": at(T0)},
        )
        for run_id, moment in ((1, T0), (2, T1), (3, T2)):
            connection.execute(
                schema.tables["sync_runs"].insert(),
                {"id": run_id, "kind": "sync", "started_at": at(moment)}
                | {"outcome": "succeeded", "host": "h", "pid": 1}
                | run_counts,
            )
        for uuid, ((user_id, sub_user_id), status, removed) in current.items():
            connection.execute(
                schema.tables["tasks"].insert(),
                {
                    "uuid": uuid,
                    "user_id": user_id,
                    "sub_user_id": sub_user_id,
                    "name": f"task {uuid}",
                    "status": status,
                    "group_id": "g1",
                    "raw": {"uuid": uuid},
                    "content_hash": uuid,
                    "first_seen_at": at(T0),
                    "last_changed_at": at(T2),
                    "status_seen_at": at(T0),
                    "removed_at": at(removed) if removed else None,
                },
            )
        for uuid, run_id, event, old, new, moment in changes:
            connection.execute(
                schema.tables["task_status_changes"].insert(),
                {
                    "task_uuid": uuid,
                    "run_id": run_id,
                    "event": event,
                    "old_status": old,
                    "new_status": new,
                    "observed_at": at(moment),
                },
            )


def test_upgrade_keeps_the_data_and_the_views_show_it(engine: Engine) -> None:
    upgrade(engine, BEFORE_VIEWS)
    insert_history_before_views(engine)

    store.migrate(engine)
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=1))

    c = current_tasks.c
    assert rows(
        engine,
        select(
            c.uuid, c.account_name, c.status_label, c.group_name, c.is_listed
        ).order_by(c.uuid),
    ) == [
        ("a", "主账号1", "paused", "话术组1", True),
        ("b", "子账号1", "running", "话术组1", True),
        ("c", "主账号1", "running", "话术组1", False),
        ("d", "子账号1", "unknown", "话术组1", True),
    ]
    p = task_status_periods.c
    assert rows(
        engine,
        select(
            p.task_uuid,
            p.status_label,
            p.started_at,
            p.ended_at,
            p.end_event,
            p.is_current,
        ).order_by(p.task_uuid, p.started_at),
    ) == [
        ("a", "running", T0, T1, "changed", False),
        ("a", "paused", T1, None, None, True),
        ("b", "waiting", T0, T1, "removed", False),
        ("b", "running", T2, None, None, True),
        ("c", "running", T1, T2, "removed", False),
        ("d", "unknown", T2, None, None, True),
    ]
    ended = rows(
        engine,
        select(p.task_uuid, p.duration_seconds).where(p.ended_at.is_not(None)),
    )
    assert sorted(ended) == [("a", 57600), ("b", 57600), ("c", 68400)]
    assert daily_counts(engine) == {
        (date(2026, 3, 1), *MAIN, 2): 1,
        (date(2026, 3, 1), *SUB, 3): 1,
        (date(2026, 3, 2), *MAIN, 1): 1,
        (date(2026, 3, 2), *SUB, 2): 1,
        (date(2026, 3, 2), *SUB, 7): 1,
    }


def daily_counts(engine: Engine) -> dict[tuple[Any, ...], int]:
    d = daily_status_counts.c
    query = select(d.day, d.user_id, d.sub_user_id, d.status, d.tasks)
    return {tuple(row[:4]): row[4] for row in rows(engine, query)}


def test_a_change_of_time_zone_recounts_every_day(engine: Engine) -> None:
    upgrade(engine, BEFORE_VIEWS)
    insert_history_before_views(engine)
    store.migrate(engine)
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=1))

    result = rollup.refresh_daily_counts(
        engine, ZoneInfo("UTC"), now=T2 + timedelta(hours=1)
    )

    assert result.rebuilt
    # In UTC, T1 falls on 1 March: b's removal and c's arrival count there.
    assert daily_counts(engine) == {
        (date(2026, 3, 1), *MAIN, 1): 1,
        (date(2026, 3, 1), *MAIN, 2): 1,
        (date(2026, 3, 2), *MAIN, 1): 1,
        (date(2026, 3, 2), *SUB, 2): 1,
        (date(2026, 3, 2), *SUB, 7): 1,
    }
    assert rows(
        engine, select(settings.c.value).where(settings.c.key == "timezone")
    ) == [("UTC",)]


def test_days_without_changes_carry_the_counts_forward(engine: Engine) -> None:
    upgrade(engine, BEFORE_VIEWS)
    insert_history_before_views(engine)
    store.migrate(engine)

    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(days=2))

    counts = daily_counts(engine)
    for day in (date(2026, 3, 3), date(2026, 3, 4)):
        assert {key[1:]: n for key, n in counts.items() if key[0] == day} == {
            (*MAIN, 1): 1,
            (*SUB, 2): 1,
            (*SUB, 7): 1,
        }


def test_a_refresh_recounts_the_past_days_a_late_run_wrote(engine: Engine) -> None:
    upgrade(engine, BEFORE_VIEWS)
    insert_history_before_views(engine)
    store.migrate(engine)
    later = T2 + timedelta(days=3)
    add_run(engine, 4, "running", later, kind="replay")
    first = rollup.refresh_daily_counts(engine, SHANGHAI, now=later)

    # The replay writes a task an archive saw on 1 March, then finishes.
    with engine.begin() as connection:
        connection.execute(
            tasks.insert(),
            {
                "uuid": "e",
                "user_id": MAIN[0],
                "sub_user_id": MAIN[1],
                "status": 3,
                "raw": {"uuid": "e"},
                "content_hash": "e",
                "first_seen_at": T0,
                "last_changed_at": T0,
                "status_seen_at": T0,
            },
        )
        connection.execute(
            task_status_changes.insert(),
            {
                "task_uuid": "e",
                "run_id": 4,
                "event": "first_seen",
                "new_status": 3,
                "observed_at": T0 + timedelta(hours=2),
            },
        )
        connection.execute(text("UPDATE sync_runs SET outcome = 'succeeded'"))
    second = rollup.refresh_daily_counts(engine, SHANGHAI, now=later)

    assert first.first_day == date(2026, 3, 1)
    assert second.first_day == date(2026, 3, 1)
    counts = daily_counts(engine)
    assert [counts.get((day, *MAIN, 3)) for day in days(date(2026, 3, 1), 5)] == [1] * 5
    assert counts == recount(engine, SHANGHAI)


def days(first: date, count: int) -> list[date]:
    return [first + timedelta(days=n) for n in range(count)]


def test_a_refresh_after_a_run_recounts_only_from_the_last_counted_day(
    engine: Engine,
) -> None:
    upgrade(engine, BEFORE_VIEWS)
    insert_history_before_views(engine)
    store.migrate(engine)
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2)

    result = rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(days=1))

    assert (result.first_day, result.last_day) == (date(2026, 3, 2), date(2026, 3, 3))
    assert not result.rebuilt


def add_run(
    engine: Engine, run_id: int, outcome: str, moment: datetime, kind: str = "sync"
) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO sync_runs (id, kind, started_at, outcome, host, pid, "
                "accounts, accounts_failed, pages, tasks_seen, tasks_new, "
                "tasks_changed, tasks_removed, tasks_restored, status_changes, "
                "rejected, bad_values) VALUES (:id, :kind, :at, :outcome, 'h', "
                "1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)"
            ),
            {"id": run_id, "kind": kind, "at": moment, "outcome": outcome},
        )


def add_change(
    engine: Engine, run_id: int, uuid: str, old: int, new: int, moment: datetime
) -> None:
    with engine.begin() as connection:
        connection.execute(
            task_status_changes.insert(),
            {
                "task_uuid": uuid,
                "run_id": run_id,
                "event": "changed",
                "old_status": old,
                "new_status": new,
                "observed_at": moment,
            },
        )


def finish_runs(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("UPDATE sync_runs SET outcome = 'succeeded'"))


def counted_then_run_4(engine: Engine) -> None:
    """The history counted an hour after T2, then run 4 changing a's status."""
    migrated_history(engine)
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=1))
    add_run(engine, 4, "succeeded", T2 + timedelta(minutes=80))
    add_change(engine, 4, "a", 1, 3, T2 + timedelta(minutes=90))


def migrated_history(engine: Engine) -> None:
    upgrade(engine, BEFORE_VIEWS)
    insert_history_before_views(engine)
    store.migrate(engine)


def test_a_refresh_later_the_same_day_reads_the_changes_of_the_new_runs_only(
    engine: Engine,
) -> None:
    counted_then_run_4(engine)

    result = rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=2))

    assert (result.from_run, result.first_day) == (4, date(2026, 3, 2))
    assert daily_counts(engine)[(date(2026, 3, 2), *MAIN, 3)] == 1
    assert daily_counts(engine) == recount(engine, SHANGHAI)


def test_a_refresh_later_the_same_day_looks_up_the_new_runs_changes_only(
    sqlite_url: str,
) -> None:
    engine = store.connect(DatabaseConfig(url=sqlite_url))
    counted_then_run_4(engine)
    asked: list[tuple[str, Any]] = []

    def keep(*args: Any) -> None:
        statement, parameters = args[2], args[3]
        if "FROM task_status_changes" in statement:
            asked.append((statement, parameters))

    sqlalchemy_event.listen(engine, "before_cursor_execute", keep)
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=2))
    sqlalchemy_event.remove(engine, "before_cursor_execute", keep)

    # Through the index on observed_at, SQLite would read every change of
    # the day, or of the whole history, to find the few of the new runs.
    with engine.connect() as connection:
        plans = [
            step
            for statement, parameters in asked
            for *_, step in connection.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters
            )
        ]
    engine.dispose()
    reads = [step for step in plans if "task_status_changes" in step]
    whole = [
        step
        for step in reads
        if step.startswith("SCAN") or "INDEX ix_task_status_changes_observed_at" in step
    ]
    assert len(reads) == len(asked) == 5
    assert not whole, reads


def test_a_day_counted_while_a_run_went_on_is_recounted_whole(engine: Engine) -> None:
    migrated_history(engine)
    add_run(engine, 4, "running", T2)
    add_change(engine, 4, "a", 1, 3, T2 + timedelta(minutes=10))
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=1))
    # The run goes on after the refresh counted its first change.
    add_change(engine, 4, "d", 7, 2, T2 + timedelta(minutes=70))
    finish_runs(engine)

    result = rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=2))

    assert result.from_run == 0
    assert daily_counts(engine) == recount(engine, SHANGHAI)


def test_a_run_that_wrote_on_after_it_was_abandoned_has_its_day_recounted(
    engine: Engine,
) -> None:
    migrated_history(engine)
    # Its process paused past the lease, and another run marked it abandoned.
    add_run(engine, 4, "abandoned", T2)
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=1))
    # It wakes and writes on.
    add_change(engine, 4, "a", 1, 3, T2 + timedelta(minutes=70))

    result = rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=2))

    assert result.from_run == 0
    assert daily_counts(engine) == recount(engine, SHANGHAI)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("daily_counts_next_run", None),
        ("daily_counts_next_run", "four"),
        ("daily_counts_day", "yesterday"),
        ("daily_counts_last_change", "-"),
        ("daily_counts_next_run", "0"),
        # Run 3's changes, counted already, are of the counted day.
        ("daily_counts_next_run", "3"),
        ("daily_counts_next_run", "1_0"),
        ("daily_counts_next_run", "999"),
    ],
)
def test_a_refresh_recounts_from_state_it_cannot_read_or_trust(
    engine: Engine, key: str, value: str | None
) -> None:
    counted_then_run_4(engine)
    with engine.begin() as connection:
        connection.execute(settings.delete().where(settings.c.key == key))
        if value is not None:
            connection.execute(
                settings.insert(),
                {"key": key, "value": value, "updated_at": T2},
            )

    result = rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(hours=2))

    assert result.from_run == 0
    assert daily_counts(engine) == recount(engine, SHANGHAI)


def test_the_first_refresh_of_a_day_recounts_the_day_before(engine: Engine) -> None:
    migrated_history(engine)
    rollup.refresh_daily_counts(engine, SHANGHAI, now=T2)
    add_run(engine, 4, "succeeded", T2 + timedelta(minutes=50))
    add_change(engine, 4, "a", 1, 3, T2 + timedelta(hours=1))

    result = rollup.refresh_daily_counts(engine, SHANGHAI, now=T2 + timedelta(days=1))

    assert (result.from_run, result.first_day) == (0, date(2026, 3, 2))
    assert daily_counts(engine) == recount(engine, SHANGHAI)


def test_no_run_begins_on_postgresql_while_a_refresh_counts(pg_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    begun: list[int] = []
    with engine.begin() as connection:
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": runs.ROLLUP_LOCK}
        )
        starter = threading.Thread(
            target=lambda: begun.append(runs.start_run(engine, "sync"))
        )
        starter.start()
        starter.join(timeout=0.5)
        waited = starter.is_alive()
    starter.join(timeout=30)
    engine.dispose()

    assert waited
    assert len(begun) == 1


def test_a_stop_ends_a_wait_on_postgresql_for_a_refresh_to_end(pg_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    halt = threading.Event()
    ended: list[BaseException] = []

    def start() -> None:
        try:
            with store.lock_waits_end_on(halt):
                runs.start_run(engine, "sync")
        except RunInterrupted as exc:
            ended.append(exc)

    with engine.begin() as connection:
        connection.execute(
            text("SELECT pg_advisory_xact_lock(:key)"), {"key": runs.ROLLUP_LOCK}
        )
        starter = threading.Thread(target=start)
        starter.start()
        starter.join(timeout=0.3)
        halt.set()
        starter.join(timeout=5)
        stopped_while_held = not starter.is_alive()
    starter.join(timeout=30)
    begun = runs.count_runs(engine)
    engine.dispose()

    assert stopped_while_held
    assert len(ended) == 1
    assert begun == 0


def recount(engine: Engine, zone: ZoneInfo) -> dict[tuple[Any, ...], int]:
    """Daily counts derived from the whole history, the slow obvious way."""
    c, t = task_status_changes.c, tasks.c
    history = rows(
        engine,
        select(c.observed_at, c.id, c.event, c.new_status, t.user_id, t.sub_user_id)
        .join(tasks, t.uuid == c.task_uuid)
        .add_columns(c.task_uuid)
        .order_by(c.observed_at, c.id),
    )
    counted = rows(engine, select(daily_status_counts.c.day).distinct())
    counts: Counter[tuple[Any, ...]] = Counter()
    for (day,) in counted:
        end = rollup.start_of_day(day + timedelta(days=1), zone)
        state: dict[str, tuple[Any, ...] | None] = {}
        for observed_at, _, event, new_status, user_id, sub_user_id, uuid in history:
            if observed_at < end:
                listed = event != "removed"
                state[uuid] = (user_id, sub_user_id, new_status) if listed else None
        counts.update((day, *key) for key in state.values() if key is not None)
    return dict(counts)


def test_daily_counts_of_synced_days_equal_a_recount(history: History) -> None:
    counts = daily_counts(history.engine)

    assert counts == recount(history.engine, SHANGHAI)
    assert len({key[0] for key in counts}) >= 3


def test_status_periods_of_synced_days_agree_with_the_simulator(
    history: History,
) -> None:
    p = task_status_periods.c
    periods = rows(
        history.engine,
        select(
            p.task_uuid,
            p.status,
            p.started_at,
            p.ended_at,
            p.start_event,
            p.end_event,
        ).order_by(p.task_uuid, p.started_at),
    )
    truth = {task.uuid: task for task in history.simulator.tasks()}

    for uuid, status, started_at, ended_at, _, end_event in periods:
        task = truth[uuid]
        assert task.status_at(started_at) == status
        if end_event == "changed":
            assert task.status_at(ended_at) not in (status, None)
        elif end_event == "removed":
            assert task.status_at(ended_at) is None
        else:
            assert task.removed_at is None and task.status == status
    restored = [row for row in periods if row[0] == history.restored]
    assert "removed" in [row[5] for row in restored]
    assert "restored" in [row[4] for row in restored]
    assert len(periods) > len(truth)


def test_current_tasks_of_synced_days_agree_with_the_simulator(
    history: History,
) -> None:
    c = current_tasks.c
    found = {
        row[0]: row[1:]
        for row in rows(
            history.engine,
            select(c.uuid, c.status, c.is_listed, c.account_name, c.group_name),
        )
    }
    names = {
        tuple(row[:2]): row[2]
        for row in rows(
            history.engine,
            text("SELECT user_id, sub_user_id, name FROM accounts"),
        )
    }
    groups = dict(
        rows(
            history.engine,
            text(
                "SELECT t.uuid, g.name FROM tasks AS t "
                "JOIN groups AS g ON g.id = t.group_id"
            ),
        )
    )

    for task in history.simulator.tasks():
        if task.uuid not in found:
            continue  # created and removed between two syncs: never seen
        status, is_listed, account_name, group_name = found[task.uuid]
        assert is_listed == (task.removed_at is None)
        if is_listed:
            assert status == task.status
        assert account_name == names[(task.user_id, task.sub_user_id)]
        assert group_name == groups.get(task.uuid)
    assert set(groups.values()) - {None}
