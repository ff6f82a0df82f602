"""Alembic environment: runs revisions against the connection it is given.

`task-etl migrate` passes an open connection in `config.attributes`; a
developer running the `alembic` command passes `-x url=...` instead.
"""

from alembic import context
from sqlalchemy import Connection, create_engine

from etl.models import metadata

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database with: alembic -x url=URL ...")
    with create_engine(url).connect() as connection:
        run_on(connection)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) mode is not supported; use task-etl migrate")
run_online()
