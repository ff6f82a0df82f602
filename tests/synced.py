"""Histories made by real syncs from the simulator, over simulated days.

A sync stamps what it observes with the wall clock. Here the clock is the
simulator's, so a few seconds of syncing make days of history: statuses
changing, tasks created, removed and restored, across local midnights.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from unittest.mock import patch

import pytest
from sqlalchemy import Engine, select

from etl import store
from etl.config import (
    ApiConfig,
    ArchiveConfig,
    Config,
    DatabaseConfig,
    LocksConfig,
    MainAccount,
)
from etl.models import task_status_changes
from etl.simulator import SimServer, Simulator
from etl.sync import RunSummary, run_sync

HOURS_BETWEEN_SYNCS = 6


@dataclass(frozen=True)
class History:
    engine: Engine
    simulator: Simulator
    config: Config
    runs: tuple[RunSummary, ...]
    restored: str


@contextmanager
def simulated_clock(simulator: Simulator) -> Iterator[None]:
    """Make every timestamp the product takes the simulator's current time."""

    class Clock(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
            return simulator.now if tz is None else simulator.now.astimezone(tz)

    with (
        patch("etl.client.datetime", Clock),
        patch("etl.runs.now", lambda: simulator.now),
    ):
        yield


def start_for(days: int) -> datetime:
    """A start from which `days` of syncs end half an hour before now, so
    that questions about the last day have answers."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return hour - timedelta(days=days, minutes=30)


def make_simulator(start: datetime, seed: int = 3) -> Simulator:
    return Simulator(
        seed=seed,
        main_accounts=2,
        sub_accounts=1,
        tasks_per_account=6,
        start=start,
        status_change_rate=0.15,
        creation_rate=0.01,
        # Removals are made by hand below, so that they are known.
        removal_rate=0.0,
    )


def history(engine: Engine, uuid: str) -> list[tuple[Any, ...]]:
    """The task's history: (event, old status, new status), oldest first."""
    query = (
        select(
            task_status_changes.c.event,
            task_status_changes.c.old_status,
            task_status_changes.c.new_status,
        )
        .where(task_status_changes.c.task_uuid == uuid)
        .order_by(task_status_changes.c.id)
    )
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(query)]


def sync_config(
    server: SimServer,
    simulator: Simulator,
    db_url: str = "sqlite://",
    *,
    archive: ArchiveConfig | None = None,
    locks: LocksConfig | None = None,
    **api: Any,
) -> Config:
    """Every main account of the simulator with its sub-accounts, synced
    from `server` at a rate that never slows a test; `api` overrides."""
    mains = tuple(
        MainAccount(user_id=user_id, discover_sub_accounts=True)
        for user_id in simulator.main_user_ids()
    )
    settings = {"page_size": 5, "requests_per_second": 1000.0, **api}
    return Config(
        database=DatabaseConfig(url=db_url),
        api=ApiConfig(base_url=server.url, token=simulator.token, **settings),
        accounts=mains,
        archive=archive,
        locks=locks or LocksConfig(),
    )


def sync_days(db_url: str, days: int = 2, seed: int = 3) -> History:
    """Migrate, then sync every six simulated hours for `days` days.

    Two tasks are removed after the second sync and one of them is listed
    again after the fifth, so the history holds removals and a restore
    whatever the seed.
    """
    simulator = make_simulator(start_for(days), seed)
    engine = store.connect(DatabaseConfig(url=db_url))
    store.migrate(engine)
    summaries = []
    with simulator.serve() as server, simulated_clock(simulator):
        config = sync_config(server, simulator, db_url)
        first_account = simulator.accounts()[0]
        chosen, gone = (t.uuid for t in simulator.live_tasks(first_account.user_id)[:2])
        for number in range(days * 24 // HOURS_BETWEEN_SYNCS):
            summaries.append(run_sync(config, engine=engine))
            # A minute on, so that the ground truth at a sync's moment is
            # what that sync saw.
            simulator.advance(60)
            if number == 1:
                simulator.remove_task(chosen)
                simulator.remove_task(gone)
            if number == 4:
                simulator.restore_task(chosen)
            simulator.advance(HOURS_BETWEEN_SYNCS * 3600 - 60)
        summaries.append(run_sync(config, engine=engine))
    return History(engine, simulator, config, tuple(summaries), chosen)


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
]


def open_history(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    """The body of a module-wide fixture: one synced history per backend,
    shared by the tests of a module that only read it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('history') / 'history.db'}"
        name = None
    else:
        cluster = request.getfixturevalue("pg_cluster")
        name = f"history_{uuid.uuid4().hex[:12]}"
        url = cluster.create_database(name)
    history = sync_days(url)
    yield history
    history.engine.dispose()
    if name is not None:
        cluster.drop_database(name)
