"""The demo: the whole job against the simulator, into a local SQLite file."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, func, select

from etl import store
from etl.config import ApiConfig, Config, DatabaseConfig, MainAccount
from etl.models import task_status_changes, tasks
from etl.report import describe_run
from etl.simulator import Simulator
from etl.sync import run_sync

DEMO_SEED = 7
HOURS_BETWEEN_SYNCS = 6

TRY_QUERY = """\
SELECT status_str, count(*) AS tasks
FROM tasks WHERE removed_at IS NULL
GROUP BY status_str ORDER BY tasks DESC;"""


def run_demo(path: Path) -> str:
    """Serve the simulator, migrate `path`, sync three times, and say what
    happened."""
    path.unlink(missing_ok=True)
    simulator = Simulator(seed=DEMO_SEED, main_accounts=2, sub_accounts=2)
    lines = []
    with simulator.serve() as server:
        config = _config(path, server.url, simulator)
        engine = store.connect(config.database)
        _, head = store.migrate(engine)
        lines.append(f"Simulator on {server.url}; database {path} at schema {head}.")

        lines.append(describe_run(run_sync(config, engine=engine)))
        simulator.advance(HOURS_BETWEEN_SYNCS * 3600)
        lines.append(
            f"Simulated clock moved on {HOURS_BETWEEN_SYNCS} hours; syncing again."
        )
        lines.append(describe_run(run_sync(config, engine=engine)))
        # The second sync only flags the tasks it missed: a task is marked
        # removed when two complete walks in a row miss it.
        lines.append("Syncing once more, which marks removed what both missed.")
        lines.append(describe_run(run_sync(config, engine=engine)))

    lines.append(_totals(engine))
    lines.append(f'Try: sqlite3 {path} "{" ".join(TRY_QUERY.split())}"')
    engine.dispose()
    return "\n".join(lines)


def _config(path: Path, url: str, simulator: Simulator) -> Config:
    accounts = tuple(
        MainAccount(user_id=user_id, discover_sub_accounts=True)
        for user_id in simulator.main_user_ids()
    )
    return Config(
        database=DatabaseConfig(url=f"sqlite:///{path}"),
        api=ApiConfig(base_url=url, token=simulator.token, page_size=15),
        accounts=accounts,
    )


def _totals(engine: Engine) -> str:
    with engine.connect() as connection:
        listed = connection.execute(
            select(func.count()).where(tasks.c.removed_at.is_(None))
        ).scalar_one()
        removed = connection.execute(
            select(func.count()).where(tasks.c.removed_at.is_not(None))
        ).scalar_one()
        changes = connection.execute(
            select(func.count()).select_from(task_status_changes)
        ).scalar_one()
    return (
        f"In the database: {listed} listed tasks, {removed} removed, "
        f"{changes} status history rows."
    )
