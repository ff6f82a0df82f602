from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select, text

from etl import store
from etl.config import DatabaseConfig
from etl.errors import StoreError
from etl.models import metadata, tasks

# The revision before tasks.unlisted_after.
LOCKS_REVISION = "a3d1c0f2b001"


def test_migrations_create_exactly_the_models(db_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=db_url))

    before, after = store.migrate(engine)

    assert (before, after) == (None, store.head_revision())
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, metadata) == []
    engine.dispose()


def test_migrate_twice_changes_nothing(db_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=db_url))
    store.migrate(engine)

    before, after = store.migrate(engine)

    assert before == after == store.head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {"accounts", "groups", "tasks", "task_status_changes"} <= tables
    assert {"sync_runs", "sync_rejects", "alembic_version"} <= tables
    engine.dispose()


def test_upgrade_keeps_the_tasks_unflagged_and_downgrade_keeps_them(
    db_url: str,
) -> None:
    engine = store.connect(DatabaseConfig(url=db_url))
    upgrade_to(engine, LOCKS_REVISION)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO tasks (uuid, user_id, sub_user_id, status, raw, "
                "content_hash, first_seen_at, last_changed_at, status_seen_at) "
                "VALUES ('t1', 'u1', '', 2, '{}', 'h', :at, :at, :at)"
            ),
            {"at": datetime(2026, 12, 1, 8, 0)},
        )

    store.migrate(engine)

    with engine.connect() as connection:
        rows = connection.execute(select(tasks.c.uuid, tasks.c.unlisted_after)).all()
    assert [tuple(row) for row in rows] == [("t1", None)]
    upgrade_to(engine, LOCKS_REVISION, down=True)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT uuid FROM tasks")).scalars().all() == [
            "t1"
        ]
    assert "unlisted_after" not in {
        c["name"] for c in inspect(engine).get_columns("tasks")
    }
    engine.dispose()


def upgrade_to(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = store._alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


def test_the_schema_a_sync_requires_is_alembics_newest_revision() -> None:
    assert store.SCHEMA_HEAD == store.head_revision()


def test_the_revision_read_without_alembic_is_alembics_own(db_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=db_url))
    seen = []
    for revision in (None, LOCKS_REVISION, "head"):
        if revision is not None:
            upgrade_to(engine, revision)
        with engine.connect() as connection:
            alembics = MigrationContext.configure(connection).get_current_revision()
        seen.append((store.schema_revision(engine), alembics))

    assert seen == [(None, None), (LOCKS_REVISION,) * 2, (store.SCHEMA_HEAD,) * 2]
    engine.dispose()


def test_a_database_a_revision_behind_is_refused_naming_both(db_url: str) -> None:
    engine = store.connect(DatabaseConfig(url=db_url))
    upgrade_to(engine, LOCKS_REVISION)

    with pytest.raises(StoreError) as refused:
        store.check_schema(engine)

    assert str(refused.value) == (
        f"the database is at schema {LOCKS_REVISION}, not {store.SCHEMA_HEAD}: "
        "run `task-etl migrate` first"
    )
    engine.dispose()


@pytest.mark.parametrize(
    ("column", "value", "shown"),
    [("INTEGER", 123, "123"), ("VARCHAR(32)", None, "none")],
    ids=["a number", "NULL"],
)
def test_an_alembic_table_written_by_hand_is_named_in_one_line(
    db_url: str, column: str, value: int | None, shown: str
) -> None:
    # Joining the rows as text raised TypeError, a traceback in every command.
    engine = store.connect(DatabaseConfig(url=db_url))
    with engine.begin() as connection:
        connection.execute(text(f"CREATE TABLE alembic_version (version_num {column})"))
        connection.execute(
            text("INSERT INTO alembic_version VALUES (:value)"), {"value": value}
        )

    with pytest.raises(StoreError) as refused:
        store.check_schema(engine)

    assert str(refused.value).startswith(f"the database is at schema {shown}, ")
    engine.dispose()


@pytest.mark.parametrize("action", [store.migrate, store.check_schema])
def test_a_revision_this_version_does_not_know_is_named_as_such(
    db_url: str, action: Callable[[Engine], object]
) -> None:
    # A sync advised running `migrate`, which then failed with "Can't locate
    # revision identified by 'f00d'".
    said = refusal(db_url, "UPDATE alembic_version SET version_num = 'f00d'", action)

    assert said == (
        "the database is at schema f00d, which this version of task-etl does not"
        " know (a newer version migrated it, or another program wrote"
        " alembic_version): use a task-etl that knows it"
    )


@pytest.mark.parametrize("action", [store.migrate, store.check_schema])
def test_tables_without_their_revision_are_named_as_such(
    db_url: str, action: Callable[[Engine], object]
) -> None:
    # A sync advised running `migrate`, which then failed with "table
    # accounts already exists".
    said = refusal(db_url, "DROP TABLE alembic_version", action)

    assert said.startswith(
        "the database holds task-etl's tables but no alembic_version"
    )


def refusal(db_url: str, tampering: str, action: Callable[[Engine], object]) -> str:
    """What `action` says of a migrated database after `tampering`, which
    it leaves as it found it."""
    engine = store.connect(DatabaseConfig(url=db_url))
    store.migrate(engine)
    with engine.begin() as connection:
        connection.execute(text(tampering))

    with pytest.raises(StoreError) as refused:
        action(engine)

    with engine.connect() as connection:
        assert inspect(connection).has_table("tasks")
    engine.dispose()
    return str(refused.value)


def test_a_database_in_a_directory_that_does_not_exist_is_named(
    tmp_path: Path,
) -> None:
    path = tmp_path / "missing" / "etl.db"
    engine = store.connect(DatabaseConfig(url=f"sqlite:///{path}"))

    with pytest.raises(StoreError) as refused:
        store.migrate(engine)

    assert str(refused.value).startswith(
        f"cannot open the database file {path} (its directory"
        f" {path.parent} does not exist): "
    )
    engine.dispose()
