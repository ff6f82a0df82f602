from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from etl import store
from etl.config import DatabaseConfig
from etl.models import metadata


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
