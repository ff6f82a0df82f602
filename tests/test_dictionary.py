import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors as pg_errors
from sqlalchemy import Connection, Engine, text
from synced import BACKENDS, HOURS_BETWEEN_SYNCS, History, open_history

from etl import store
from etl.config import DatabaseConfig
from etl.dictionary import EXAMPLES, READ_ONLY_ROLE, Example, render
from etl.models import metadata
from etl.parse import status_label
from etl.rollup import start_of_day
from etl.views import VIEWS

SCHEMA_DOC = Path(__file__).parent.parent / "docs" / "schema.md"
EXAMPLE_IDS = [example.name for example in EXAMPLES]

# Which index each example query must use. The queries over the periods
# read the whole history by design; they must still read it through the
# index, in task order, and never as a plain table scan.
INDEX_OF = {
    "tasks_per_status": "ix_tasks_removed_at_status",
    "tasks_per_account": "ix_tasks_removed_at_status",
    "account_tasks": "ix_tasks_user_id_sub_user_id_removed_at_status",
    "running_time": "ix_task_status_changes_task_uuid_observed_at",
    "paused_most": "ix_task_status_changes_task_uuid_observed_at",
    "task_history": "ix_task_status_changes_task_uuid_observed_at",
    "changes_last_day": "ix_task_status_changes_observed_at",
    "daily_counts": "ix_daily_status_rollup_day",
    "removed_tasks": "ix_tasks_removed_at_status",
}
# On a rollup of a few dozen rows PostgreSQL rates both of its indexes the
# same when table scans are off; either one proves the table is not read.
POSTGRESQL_ALSO = {"daily_counts": "ix_daily_status_rollup_user_id_sub_user_id_day"}
WHOLE_HISTORY = {"running_time", "paused_most"}
# SQLite names a full scan of a table "SCAN <alias>", with or without an
# index; the examples' tables are aliased t, c, r, a and g.
SQLITE_TABLE_SCAN = re.compile(r"^SCAN [tcrag]\b")


@pytest.fixture(scope="module", params=BACKENDS)
def history(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    yield from open_history(request, tmp_path_factory)


def test_schema_document_is_what_the_generator_writes() -> None:
    assert SCHEMA_DOC.read_text(encoding="utf-8") == render(), (
        "docs/schema.md is stale: run `python -m etl.dictionary > docs/schema.md`"
    )


def test_generator_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "etl.dictionary"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=True,
    )

    assert result.stdout == render()


@pytest.mark.parametrize(
    "table",
    [*metadata.tables.values(), *VIEWS],
    ids=lambda table: table.name,
)
def test_every_table_view_and_column_says_what_it_holds(table: Any) -> None:
    assert table.comment
    assert [c.name for c in table.columns if not c.comment] == []
    assert f"### {table.name}\n" in render()


def test_every_example_query_is_in_the_document() -> None:
    document = render()

    for example in EXAMPLES:
        assert example.sql + ";" in document
        if example.postgresql:
            assert example.postgresql + ";" in document


def params_for(history: History, sql: str) -> dict[str, str]:
    first = history.simulator.accounts()[0]
    known = {
        "user_id": first.user_id,
        "sub_user_id": first.sub_user_id,
        "task_uuid": history.restored,
    }
    return {key: value for key, value in known.items() if f":{key}" in sql}


def run_example(history: History, example: Example) -> list[tuple[Any, ...]]:
    sql = example.for_dialect(history.engine.dialect.name)
    with history.engine.connect() as connection:
        result = connection.execute(text(sql), params_for(history, sql))
        return [tuple(row) for row in result]


def live_truth(history: History) -> list[Any]:
    return [task for task in history.simulator.tasks() if task.removed_at is None]


def changes(history: History) -> list[Any]:
    query = text(
        "SELECT task_uuid, event, new_status, observed_at FROM task_status_changes "
        "ORDER BY task_uuid, observed_at, id"
    )
    with history.engine.connect() as connection:
        return list(connection.execute(query))


def aware(value: Any) -> datetime:
    """A timestamp as a raw query returns it (text on SQLite), made aware."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def periods_from_changes(history: History) -> dict[str, list[tuple[int, float]]]:
    """Per task, (status, seconds) of each ended period, from the raw history."""
    found: dict[str, list[tuple[int, float]]] = {}
    rows = changes(history)
    for row, following in zip(rows, rows[1:], strict=False):
        if row.task_uuid == following.task_uuid and row.event != "removed":
            length = aware(following.observed_at) - aware(row.observed_at)
            found.setdefault(row.task_uuid, []).append(
                (row.new_status, length.total_seconds())
            )
    return found


def check_tasks_per_status(history: History, found: list[Any]) -> None:
    truth = Counter(status_label(task.status) for task in live_truth(history))
    assert dict(found) == dict(truth)


def check_tasks_per_account(history: History, found: list[Any]) -> None:
    truth = Counter(
        (task.user_id, task.sub_user_id, status_label(task.status))
        for task in live_truth(history)
    )
    assert {(u, s, label): n for u, s, _, label, n in found} == dict(truth)


def check_account_tasks(history: History, found: list[Any]) -> None:
    first = history.simulator.accounts()[0]
    truth = history.simulator.live_tasks(first.user_id, first.sub_user_id)
    assert {row[0] for row in found} == {task.uuid for task in truth}
    assert [row[2] for row in found] == sorted(
        (row[2] for row in found), key=["paused", "running", "waiting"].index
    )


def check_running_time(history: History, found: list[Any]) -> None:
    ended = periods_from_changes(history)
    # Current periods run until the query's own now: only a lower bound.
    for uuid_, _, _, seconds in found:
        at_least = sum(s for status, s in ended.get(uuid_, []) if status == 2)
        assert seconds >= at_least
    assert [row[3] for row in found] == sorted((row[3] for row in found), reverse=True)
    assert found


def check_paused_most(history: History, found: list[Any]) -> None:
    entered = Counter(
        row.task_uuid
        for row in changes(history)
        if row.new_status == 1 and row.event != "removed"
    )
    assert [(row[0], row[2]) for row in found] == [
        (row[0], entered[row[0]]) for row in found
    ]
    assert [row[2] for row in found] == sorted(entered.values(), reverse=True)[:10]


def check_task_history(history: History, found: list[Any]) -> None:
    opened = [
        status_label(row.new_status)
        for row in changes(history)
        if row.task_uuid == history.restored and row.event != "removed"
    ]
    assert [row[0] for row in found] == opened
    assert found[-1][3] is None


def check_changes_last_day(history: History, found: list[Any]) -> None:
    since = datetime.now(UTC) - timedelta(days=1)
    truth = {
        (row.task_uuid, row.event, aware(row.observed_at))
        for row in changes(history)
        if aware(row.observed_at) >= since
    }
    assert {(row[1], row[3], aware(row[0])) for row in found} == truth
    assert len(truth) > 0


def check_daily_counts(history: History, found: list[Any]) -> None:
    """Each day's counts are what the simulator held at the day's last sync."""
    zone = history.config.api.zone
    step = timedelta(hours=HOURS_BETWEEN_SYNCS)
    first = history.simulator.now - step * (len(history.runs) - 1)
    syncs = [first + step * n for n in range(len(history.runs))]
    by_day: dict[Any, Counter[str]] = {}
    for day, label, tasks in found:
        by_day.setdefault(str(day)[:10], Counter())[label] = tasks
    for day_text, counts in by_day.items():
        end = start_of_day(datetime.fromisoformat(day_text).date(), zone) + (
            timedelta(days=1)
        )
        at = max(n for n, sync in enumerate(syncs) if sync < end)
        truth = Counter(
            status_label(status)
            for task in history.simulator.tasks()
            if (status := listed_status(task, syncs[max(0, at - 1)], syncs[at]))
            is not None
        )
        assert counts == truth, day_text
    assert len(by_day) >= 3


def listed_status(task: Any, before: datetime, moment: datetime) -> int | None:
    """The task's status in the database after the sync at `moment`.

    A task gone at that sync but listed by the one before is only flagged,
    and keeps the status that sync saw: a removal needs two walks.
    """
    status: int | None = task.status_at(moment)
    return task.status_at(before) if status is None else status


def check_removed_tasks(history: History, found: list[Any]) -> None:
    removed = [task for task in history.simulator.tasks() if task.removed_at]
    assert {row[0] for row in found} == {task.uuid for task in removed}
    assert history.restored not in {row[0] for row in found}


CHECKS = {
    "tasks_per_status": check_tasks_per_status,
    "tasks_per_account": check_tasks_per_account,
    "account_tasks": check_account_tasks,
    "running_time": check_running_time,
    "paused_most": check_paused_most,
    "task_history": check_task_history,
    "changes_last_day": check_changes_last_day,
    "daily_counts": check_daily_counts,
    "removed_tasks": check_removed_tasks,
}


def test_every_example_has_a_check_and_an_expected_index() -> None:
    assert set(CHECKS) == set(INDEX_OF) == set(EXAMPLE_IDS)


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_example_query_answers_its_question(history: History, example: Example) -> None:
    found = run_example(history, example)

    CHECKS[example.name](history, found)


def query_plan(connection: Connection, sql: str, params: dict[str, str]) -> list[str]:
    if connection.dialect.name == "postgresql":
        # A small table is read fastest whole; forbidding that shows whether
        # an index serves the query as it would on a large table.
        connection.execute(text("SET enable_seqscan = off"))
        rows = connection.execute(text(f"EXPLAIN {sql}"), params)
        return [row[0].strip() for row in rows]
    rows = connection.execute(text(f"EXPLAIN QUERY PLAN {sql}"), params)
    return [row[-1] for row in rows]


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_example_query_reads_through_an_index(
    history: History, example: Example
) -> None:
    sql = example.for_dialect(history.engine.dialect.name)
    with history.engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("ANALYZE"))
        plan = query_plan(connection, sql, params_for(history, sql))

    shown = "\n".join(plan)
    if history.engine.dialect.name == "postgresql":
        wanted = {INDEX_OF[example.name], POSTGRESQL_ALSO.get(example.name)}
        assert any(name and name in shown for name in wanted), shown
        assert "Seq Scan" not in shown, shown
    else:
        assert INDEX_OF[example.name] in shown, shown
        scans = [line for line in plan if SQLITE_TABLE_SCAN.match(line)]
        allowed = f"SCAN c USING INDEX {INDEX_OF[example.name]}"
        if example.name in WHOLE_HISTORY:
            scans = [line for line in scans if line != allowed]
        assert scans == [], shown


@pytest.fixture
def reader(pg_url: str) -> Iterator[tuple[Engine, psycopg.Connection[Any]]]:
    """A migrated database with data, and a connection as a new read-only
    role made by the documented statements."""
    engine = store.connect(DatabaseConfig(url=pg_url))
    store.migrate(engine)
    database = engine.url.database or ""
    role = f"bi_reader_{uuid.uuid4().hex[:8]}"
    grants = READ_ONLY_ROLE.format(
        reader=role, password="secret", database=database, owner="postgres"
    )
    with engine.begin() as connection:
        connection.exec_driver_sql(grants)
    url = engine.url
    connection = psycopg.connect(
        host=url.host, port=url.port, user=role, dbname=database, autocommit=True
    )
    yield engine, connection
    connection.close()
    with engine.begin() as admin:
        admin.exec_driver_sql(f"DROP OWNED BY {role}")
        admin.exec_driver_sql(f"DROP ROLE {role}")
    engine.dispose()


def test_read_only_role_reads_every_table_and_view_and_writes_nothing(
    reader: tuple[Engine, psycopg.Connection[Any]],
) -> None:
    engine, connection = reader
    names = [*metadata.tables, *(view.name for view in VIEWS), "alembic_version"]

    for name in names:
        connection.execute(f"SELECT * FROM {name} LIMIT 1").fetchall()
    for name in [*metadata.tables, *(view.name for view in VIEWS)]:
        for statement in (
            f"INSERT INTO {name} DEFAULT VALUES",
            f"UPDATE {name} SET {_first_column(name)} = NULL",
            f"DELETE FROM {name}",
        ):
            # A view of joins refuses writes from anyone, before privileges.
            with pytest.raises(
                (
                    pg_errors.InsufficientPrivilege,
                    pg_errors.ObjectNotInPrerequisiteState,
                )
            ):
                connection.execute(statement)
    for statement in (
        "CREATE TABLE mine (id integer)",
        "CREATE VIEW mine AS SELECT 1 AS one",
        "CREATE SCHEMA mine",
        "TRUNCATE tasks",
        "DROP TABLE tasks",
        "ALTER TABLE tasks ADD COLUMN mine integer",
    ):
        with pytest.raises(pg_errors.InsufficientPrivilege):
            connection.execute(statement)

    # A table a later migration creates is readable without a new grant.
    with engine.begin() as admin:
        admin.exec_driver_sql("CREATE TABLE later_table (id integer)")
        admin.exec_driver_sql("INSERT INTO later_table VALUES (1)")
    assert connection.execute("SELECT id FROM later_table").fetchall() == [(1,)]
    with pytest.raises(pg_errors.InsufficientPrivilege):
        connection.execute("DELETE FROM later_table")


def _first_column(name: str) -> str:
    tables = {**metadata.tables, **{view.name: view for view in VIEWS}}
    return next(iter(tables[name].columns)).name
