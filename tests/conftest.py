"""Shared fixtures: real, throwaway databases for every test that needs one.

A test that takes ``db_url`` runs twice, once on SQLite and once on
PostgreSQL. The PostgreSQL server is a private cluster started once per
session on a free loopback port and deleted at the end; it is only started
when a PostgreSQL test actually runs. Each test gets its own empty database.

When the cluster cannot start, the PostgreSQL tests are skipped loudly on a
developer machine and fail under CI (``CI=true``), so that CI can never pass
without having exercised PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from pgcluster import (
    PG_BIN_ENV,
    ClusterError,
    PgCluster,
    start_cluster,
    stop_cluster_quietly,
)
from sqlalchemy import Engine

from etl import store
from etl.config import DatabaseConfig
from etl.simulator import SimServer, Simulator

_pg_problem = pytest.StashKey[str]()
_pg_started = pytest.StashKey[str]()
_database_numbers = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run randomized tests at full length instead of a quick sample",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "postgresql: runs against the throwaway PostgreSQL cluster"
    )
    # A shell that starts the tests in the background has them ignore
    # SIGINT, and every process they start inherits that: a test of what a
    # Ctrl-C does to one would find it ignored. A handler of Python's own
    # lets the started processes take SIGINT as usual.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests asking for PostgreSQL directly get the same marker as the
    # PostgreSQL half of db_url, so `-m "not postgresql"` leaves out both.
    for item in items:
        if {"pg_url", "pg_cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgresql)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    if _pg_started in config.stash:
        terminalreporter.write_line(config.stash[_pg_started])
    if _pg_problem in config.stash:
        terminalreporter.write_sep(
            "!", "WARNING: PostgreSQL tests were SKIPPED", red=True, bold=True
        )
        terminalreporter.write_line(config.stash[_pg_problem], red=True)
        terminalreporter.write_line(
            f"Install PostgreSQL server binaries or set {PG_BIN_ENV}.", red=True
        )


@pytest.fixture(scope="session")
def long_run(pytestconfig: pytest.Config) -> bool:
    """True when the run asked for full-length randomized tests (``--long``)."""
    return bool(pytestconfig.getoption("--long"))


@pytest.fixture(scope="session")
def pg_cluster(pytestconfig: pytest.Config) -> Iterator[PgCluster]:
    """A private PostgreSQL cluster for the whole session."""
    # Not pytest's tmp_path: under root it is 0700 and the server user could
    # not enter it.
    base_dir = Path(tempfile.mkdtemp(prefix="task-etl-pg-"))
    started = time.monotonic()
    try:
        cluster = start_cluster(base_dir)
    except ClusterError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        stop_cluster_quietly(base_dir)
        shutil.rmtree(base_dir, ignore_errors=True)
        _give_up(pytestconfig, problem)

    elapsed = time.monotonic() - started
    pytestconfig.stash[_pg_started] = (
        f"test PostgreSQL cluster: {cluster.version.split(' on ')[0]} "
        f"on 127.0.0.1:{cluster.port}, ready in {elapsed:.1f} s"
    )
    try:
        yield cluster
    finally:
        stop_cluster_quietly(base_dir)
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """A SQLAlchemy URL to a new, empty PostgreSQL database."""
    name = f"t_{next(_database_numbers)}"
    yield pg_cluster.create_database(name)
    pg_cluster.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLAlchemy URL to a new SQLite file."""
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """A URL to an empty database, once per supported backend."""
    # Looked up by name so that SQLite-only runs never start the cluster.
    fixture = {"sqlite": "sqlite_url", "postgresql": "pg_url"}[request.param]
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to the current schema, once per backend."""
    engine = store.connect(DatabaseConfig(url=db_url))
    store.migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def server(simulator: Simulator) -> Iterator[SimServer]:
    """The module's `simulator` served on a free loopback port."""
    with simulator.serve() as server:
        yield server


def _give_up(config: pytest.Config, reason: str) -> NoReturn:
    if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
        pytest.fail(f"PostgreSQL test cluster unavailable: {reason}", pytrace=False)
    config.stash[_pg_problem] = reason
    pytest.skip(f"PostgreSQL test cluster unavailable: {reason}")
