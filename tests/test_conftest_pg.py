"""The shared fixtures hand out real, empty databases of the backend they name."""

import pytest
import sqlalchemy as sa


def test_db_url_stores_and_returns_rows(db_url: str) -> None:
    metadata = sa.MetaData()
    probe = sa.Table(
        "probe",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
    )
    engine = sa.create_engine(db_url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                probe.insert(), [{"id": 1, "name": "one"}, {"id": 2, "name": "二"}]
            )
        with engine.connect() as conn:
            rows = conn.execute(sa.select(probe).order_by(probe.c.id)).all()
    finally:
        engine.dispose()

    assert [tuple(row) for row in rows] == [(1, "one"), (2, "二")]


def test_db_url_uses_the_backend_named_by_its_id(
    db_url: str, request: pytest.FixtureRequest
) -> None:
    backend = request.node.callspec.id

    assert sa.make_url(db_url).get_backend_name() == backend


def test_db_url_starts_without_tables(db_url: str) -> None:
    engine = sa.create_engine(db_url)
    try:
        tables = sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()

    assert tables == []


def test_pg_url_reaches_a_real_postgresql_server(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version()")).scalar_one()
            database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
    finally:
        engine.dispose()

    assert version.startswith("PostgreSQL ")
    assert database == sa.make_url(pg_url).database
