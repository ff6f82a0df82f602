import io
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, func, select, text
from synced import sync_config
from writers import LockAfterFirstPage, write_lock_held

from etl import locks, store
from etl.accounts import Account
from etl.backfill import replay_archive, run_backfill, select_accounts
from etl.cli import main
from etl.config import (
    ApiConfig,
    ArchiveConfig,
    Config,
    DatabaseConfig,
    LocksConfig,
    MainAccount,
)
from etl.errors import ArchiveError, ConfigError, RunNotBegun, StoreError
from etl.models import (
    accounts,
    daily_status_rollup,
    groups,
    sync_rejects,
    sync_runs,
    task_status_changes,
    tasks,
)
from etl.report import ProgressLine, describe_progress, describe_replay
from etl.simulator import SimServer, Simulator
from etl.sync import Filters, Progress, run_sync

HOUR = 3600


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=21, main_accounts=2, sub_accounts=2, tasks_per_account=8)


def connect(url: str) -> Engine:
    engine = store.connect(DatabaseConfig(url=url))
    store.migrate(engine)
    return engine


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = connect(db_url)
    yield engine
    engine.dispose()


def make_config(
    server: SimServer, simulator: Simulator, archive_dir: Path | None = None
) -> Config:
    archive = ArchiveConfig(dir=str(archive_dir)) if archive_dir else None
    return sync_config(server, simulator, archive=archive, page_size=3)


def stored_owners(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(select(tasks.c.user_id, tasks.c.sub_user_id))
        return {(row.user_id, row.sub_user_id) for row in rows}


def live_tasks(simulator: Simulator, keys: set[tuple[str, str]]) -> set[str]:
    return {
        task.uuid
        for task in simulator.tasks()
        if task.removed_at is None and (task.user_id, task.sub_user_id) in keys
    }


def stored_live(engine: Engine) -> set[str]:
    query = select(tasks.c.uuid).where(tasks.c.removed_at.is_(None))
    with engine.connect() as connection:
        return set(connection.execute(query).scalars())


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(table)).scalar_one()
        )


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """What a replay must rebuild: every table but run bookkeeping."""
    change = task_status_changes.c
    queries = {
        "tasks": select(tasks).order_by(tasks.c.uuid),
        "history": select(
            change.task_uuid,
            change.event,
            change.old_status,
            change.old_status_str,
            change.new_status,
            change.new_status_str,
            change.old_seen_at,
            change.observed_at,
        ).order_by(change.task_uuid, change.observed_at, change.event),
        "accounts": select(
            *[c for c in accounts.c if c.name not in ("first_seen_at", "last_run_id")]
        ).order_by(accounts.c.user_id, accounts.c.sub_user_id),
        "groups": select(groups.c.id, groups.c.name).order_by(groups.c.id),
        "rejects": select(
            sync_rejects.c.user_id,
            sync_rejects.c.page,
            sync_rejects.c.reason,
            sync_rejects.c.rejected_at,
        ).order_by(sync_rejects.c.rejected_at, sync_rejects.c.reason),
        # Brought up to date by a replay as by every live run.
        "daily counts": select(
            *[c for c in daily_status_rollup.c if c.name != "id"]
        ).order_by(*[c for c in daily_status_rollup.c if c.name != "id"]),
    }
    with engine.connect() as connection:
        return {
            name: [tuple(row) for row in connection.execute(query)]
            for name, query in queries.items()
        }


def live_history(
    server: SimServer, simulator: Simulator, engine: Engine, root: Path
) -> None:
    """Several live runs while the platform changes: syncs, a filtered
    backfill, a removal (which takes two syncs) and a restoration."""
    config = make_config(server, simulator, root)
    run_sync(config, engine=engine)
    gone = simulator.live_tasks(*simulator.accounts()[1].key)[0].uuid
    simulator.remove_task(gone)
    for _ in range(2):
        simulator.advance(6 * HOUR)
        run_sync(config, engine=engine)
    simulator.advance(6 * HOUR)
    run_backfill(config, engine=engine, filters=Filters(statuses=(1, 3)))
    simulator.restore_task(gone)
    simulator.advance(6 * HOUR)
    run_sync(config, engine=engine)


# -- pulling ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("choose", "expected"),
    [
        (lambda sim: [], lambda sim: {a.key for a in sim.accounts()}),
        (
            lambda sim: [sim.main_user_ids()[0]],
            lambda sim: {
                a.key for a in sim.accounts() if a.user_id == sim.main_user_ids()[0]
            },
        ),
        (
            lambda sim: [
                f"{sim.accounts()[2].user_id}:{sim.accounts()[2].sub_user_id}"
            ],
            lambda sim: {sim.accounts()[2].key},
        ),
        (
            lambda sim: [
                f"{sim.accounts()[2].user_id}:{sim.accounts()[2].sub_user_id}",
                sim.main_user_ids()[1],
            ],
            lambda sim: (
                {sim.accounts()[2].key}
                | {a.key for a in sim.accounts() if a.user_id == sim.main_user_ids()[1]}
            ),
        ),
    ],
    ids=["all", "main-with-subs", "one-sub-account", "sub-and-main"],
)
def test_backfill_pulls_the_chosen_accounts_in_full(
    simulator: Simulator, server: SimServer, engine: Engine, choose: Any, expected: Any
) -> None:
    keys = expected(simulator)

    summary = run_backfill(
        make_config(server, simulator), selectors=choose(simulator), engine=engine
    )

    assert (summary.kind, summary.outcome, summary.accounts) == (
        "backfill",
        "succeeded",
        len(keys),
    )
    assert stored_owners(engine) == keys
    assert stored_live(engine) == live_tasks(simulator, keys)
    with engine.connect() as connection:
        kinds = connection.execute(select(sync_runs.c.kind)).scalars().all()
    assert kinds == ["backfill"]


def test_filtered_backfill_never_marks_removals(
    simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    config = make_config(server, simulator)
    run_sync(config, engine=engine)
    for task in simulator.tasks()[:5]:
        simulator.remove_task(task.uuid)
    before = stored_live(engine)

    summaries = [
        run_backfill(config, engine=engine, filters=filters)
        for filters in (Filters(statuses=(1, 2, 3)), Filters(name="x"))
    ]

    assert [s.counts.removed for s in summaries] == [0, 0]
    assert stored_live(engine) == before
    assert count(engine, task_status_changes) == len(before)


def test_selectors_match_main_accounts_and_sub_accounts() -> None:
    found = [Account("u1"), Account("u1", "s1"), Account("u2", "s2")]

    assert select_accounts(found, ["u1"], "account") == found[:2]
    assert select_accounts(found, ["u2:s2", "u1:s1"], "account") == found[1:]
    assert select_accounts(found, [], "account") == found
    with pytest.raises(ConfigError) as raised:
        select_accounts(found, ["u3", "u1:s9", "u1", "u3"], "known account")
    assert str(raised.value) == "--account: no known account matches u3, u1:s9"
    assert raised.value.exit_code == 2


# -- the command line ---------------------------------------------------------


def write_config(
    tmp_path: Path,
    server: SimServer,
    simulator: Simulator,
    db_url: str,
    archive_dir: Path | None = None,
) -> str:
    text = (
        f'[database]\nurl = "{db_url}"\n'
        f'[api]\nbase_url = "{server.url}"\npage_size = 3\n'
        "requests_per_second = 500.0\n"
    )
    if archive_dir is not None:
        text += f'[archive]\ndir = "{archive_dir}"\n'
    text += "".join(
        f'[[accounts]]\nuser_id = "{user_id}"\ndiscover_sub_accounts = true\n'
        for user_id in simulator.main_user_ids()
    )
    path = tmp_path / "task-etl.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env={"TASK_ETL_TOKEN": "sim-token"})


def migrated_config(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str, **kw: Any
) -> str:
    config = write_config(tmp_path, server, simulator, sqlite_url, **kw)
    assert invoke("--config", config, "migrate").exit_code == 0
    return config


def test_backfill_command_prints_the_run_and_no_progress_off_a_terminal(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    config = migrated_config(tmp_path, server, simulator, sqlite_url)
    sub = simulator.accounts()[2]

    result = invoke(
        "--config", config, "backfill", "--account", sub.user_id + ":" + sub.sub_user_id
    )

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Run 1 (backfill) succeeded in ")
    assert lines[0].endswith(": 1 accounts (0 failed), 3 pages.")
    assert lines[1].startswith("Tasks: 8 seen, 8 new, 0 changed, 0 removed")
    assert "done," not in result.stderr
    assert "\r" not in result.stderr


def test_unknown_account_exits_2_naming_it_and_records_no_run(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    config = migrated_config(tmp_path, server, simulator, sqlite_url)
    main_id = simulator.main_user_ids()[0]

    result = invoke(
        "--config",
        config,
        "backfill",
        "--account",
        "nobody",
        "--account",
        main_id,
        "--account",
        f"{main_id}:no-such-sub",
    )

    assert result.exit_code == 2
    assert result.stderr.endswith(
        "Error: --account: no configured or discovered account matches nobody, "
        f"{main_id}:no-such-sub\n"
    )
    assert result.stdout == ""
    assert count(connect(sqlite_url), sync_runs) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--status", "4"],
            "Invalid value for '--status': 4 is not in the range 1<=x<=3.",
        ),
        (
            ["--from-archive", ".", "--name", "x"],
            "Error: --name and --status cannot be used with --from-archive",
        ),
        (
            ["--from-archive", "/no/such/dir"],
            "Directory '/no/such/dir' does not exist.",
        ),
    ],
    ids=["bad-status", "filter-with-replay", "no-archive"],
)
def test_bad_backfill_options_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = invoke("--config", str(tmp_path / "unused.toml"), "backfill", *args)

    assert result.exit_code == 2
    assert message in result.stderr


def test_backfill_exit_codes_tell_partial_from_failed(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    config = migrated_config(tmp_path, server, simulator, sqlite_url)
    first = simulator.main_user_ids()[0]

    simulator.set_token(first, "rotated")
    partial = invoke("--config", config, "backfill")
    simulator.set_token(simulator.main_user_ids()[1], "rotated")
    failed = invoke("--config", config, "backfill", "--account", first)

    assert partial.exit_code == 3, partial.output
    assert "Run 1 (backfill) partial in " in partial.stdout
    assert failed.exit_code == 1, failed.output
    assert "sub-account discovery failed" in failed.stderr


# -- progress -----------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_reads_accounts_pages_and_tasks() -> None:
    assert (
        describe_progress(Progress(done=2, total=6, pages=14, tasks=1200))
        == "2/6 accounts done, 14 pages, 1200 tasks"
    )
    assert (
        describe_progress(Progress(1, 9, 3, 40, unit="walks"))
        == "1/9 walks done, 3 pages, 40 tasks"
    )


def test_progress_is_redrawn_in_place_on_a_terminal_and_ended_with_a_newline() -> None:
    stream = Terminal()

    with ProgressLine(stream, "backfill", interval=0) as progress:
        progress(Progress(0, 2, 1, 3))
        progress(Progress(1, 2, 2, 6))

    assert stream.getvalue() == (
        "\r\x1b[Kbackfill: 0/2 accounts done, 1 pages, 3 tasks"
        "\r\x1b[Kbackfill: 1/2 accounts done, 2 pages, 6 tasks"
        "\r\x1b[Kbackfill: 1/2 accounts done, 2 pages, 6 tasks\n"
    )


def test_progress_writes_nothing_when_not_on_a_terminal() -> None:
    stream = io.StringIO()

    with ProgressLine(stream, "backfill", interval=0) as progress:
        progress(Progress(0, 2, 1, 3))

    assert stream.getvalue() == ""


def test_a_log_line_clears_the_progress_line_first() -> None:
    stream = Terminal()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with ProgressLine(stream, "replay", interval=0) as progress:
            progress(Progress(0, 1, 0, 0))
            logging.getLogger("etl.test").warning("account failed")
            progress(Progress(1, 1, 1, 5))
    finally:
        root.removeHandler(handler)

    shown = "\r\x1b[Kreplay: 0/1 accounts done, 0 pages, 0 tasks"
    again = "\r\x1b[Kreplay: 1/1 accounts done, 1 pages, 5 tasks"
    assert stream.getvalue() == (
        shown + "\r\x1b[K" + "account failed\n" + again + again + "\n"
    )
    assert handler.filters == []


# -- replaying the archive ----------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Engine]:
    """The database the live runs write, apart from the one replayed into."""
    engine = connect(f"sqlite:///{tmp_path / 'live.db'}")
    yield engine
    engine.dispose()


def sorted_snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    # Sorted here, not by the database, so collations cannot differ.
    return {name: sorted(rows, key=repr) for name, rows in snapshot(engine).items()}


def events(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(connection.execute(select(task_status_changes.c.event)).scalars())


def test_replay_into_an_empty_database_rebuilds_the_live_history(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    engine: Engine,
) -> None:
    root = tmp_path / "archive"
    live_history(server, simulator, live, root)

    summary = replay_archive(make_config(server, simulator), root, engine=engine)

    assert (summary.run.kind, summary.run.outcome) == ("replay", "succeeded")
    assert (summary.walks, summary.skipped, summary.unfinished) == (30, 0, 0)
    assert sorted_snapshot(engine) == sorted_snapshot(live)
    assert events(engine) == {"first_seen", "changed", "removed", "restored"}


def test_replaying_twice_changes_nothing(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    engine: Engine,
) -> None:
    root = tmp_path / "archive"
    live_history(server, simulator, live, root)
    config = make_config(server, simulator)
    replay_archive(config, root, engine=engine)
    before = sorted_snapshot(engine)

    again = replay_archive(config, root, engine=engine)

    assert (again.walks, again.skipped, again.run.pages) == (0, 30, 0)
    assert again.run.outcome == "succeeded"
    assert sorted_snapshot(engine) == before


def test_replay_into_the_database_of_the_live_runs_changes_nothing(
    tmp_path: Path, simulator: Simulator, server: SimServer, engine: Engine
) -> None:
    root = tmp_path / "archive"
    live_history(server, simulator, engine, root)
    before = sorted_snapshot(engine)

    summary = replay_archive(make_config(server, simulator), root, engine=engine)

    assert (summary.walks, summary.skipped) == (0, 30)
    assert sorted_snapshot(engine) == before


def test_replay_catches_up_a_database_restored_from_an_older_copy(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    engine: Engine,
) -> None:
    root = tmp_path / "archive"
    live_history(server, simulator, live, root)
    first_run = tmp_path / "first-run"
    for folder in root.glob("*/*-run1-*"):
        shutil.copytree(folder, first_run / folder.relative_to(root))
    config = make_config(server, simulator)
    replay_archive(config, first_run, engine=engine)

    summary = replay_archive(config, root, engine=engine)

    assert (summary.walks, summary.skipped) == (24, 6)
    assert sorted_snapshot(engine) == sorted_snapshot(live)


def test_a_walk_whose_removals_failed_is_replayed_as_it_ran(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    engine: Engine,
) -> None:
    root = tmp_path / "archive"
    config = make_config(server, simulator, root)
    run_sync(config, engine=live)
    gone = simulator.tasks()[0]
    simulator.remove_task(gone.uuid)
    run_sync(config, engine=live)
    with live.begin() as connection:
        connection.execute(
            text(
                "CREATE TRIGGER refuse_removal BEFORE UPDATE OF removed_at ON tasks "
                "WHEN NEW.removed_at IS NOT NULL "
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        )
    refused = run_sync(config, engine=live)

    summary = replay_archive(make_config(server, simulator), root, engine=engine)

    assert (refused.outcome, refused.accounts_failed) == ("partial", 1)
    # The walk counted as complete in neither: the task is still only flagged.
    assert summary.run.counts.removed == 0
    assert gone.uuid in stored_live(engine)
    assert sorted_snapshot(engine) == sorted_snapshot(live)


def test_a_stop_drops_the_replayed_page_waiting_for_another_writer(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    engine: Engine,
    db_url: str,
) -> None:
    # The page waited for the other writer after the stop, and was written
    # once it let go, or failed its account when the busy timeout ran out.
    root = tmp_path / "archive"
    live_history(server, simulator, live, root)
    stop = threading.Event()
    writer = LockAfterFirstPage(db_url, stop)

    config = make_config(server, simulator)
    summary = replay_archive(config, root, engine=engine, progress=writer, stop=stop)
    writer.close()

    run = summary.run
    assert (run.outcome, run.pages, run.accounts_failed, run.errors) == (
        "stopped",
        1,
        0,
        (),
    )
    assert count(engine, tasks) == writer.stored_then
    # It said every walk was replayed.
    assert describe_replay(summary).endswith(
        f"\nArchive: stopped after 0 of {summary.walks} walks (replaying again "
        "goes on from there), 0 skipped as no newer than the database."
    )
    replay_archive(config, root, engine=engine)
    assert sorted_snapshot(engine) == sorted_snapshot(live)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_stop_ends_the_wait_of_a_replay_for_another_writer_before_it_began(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    engine: Engine,
    db_url: str,
) -> None:
    # Recording the replay's start waited out the busy timeout, 30 s here,
    # and the replay then began after the stop.
    root = tmp_path / "archive"
    live_history(server, simulator, live, root)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()

    config = make_config(server, simulator)
    with (
        write_lock_held(db_url),
        pytest.raises(RunNotBegun, match="^stopped before the replay began") as got,
    ):
        replay_archive(config, root, engine=engine, stop=stop)

    assert got.value.exit_code == 130
    assert count(engine, sync_runs) == count(engine, tasks) == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_replay_whose_start_waits_past_the_busy_timeout_fails_in_one_line(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    db_url: str,
) -> None:
    # It ended in SQLAlchemy's traceback.
    root = tmp_path / "archive"
    live_history(server, simulator, live, root)
    impatient = store.connect(DatabaseConfig(url=db_url, busy_timeout=0.3))
    store.migrate(impatient)

    config = make_config(server, simulator)
    with write_lock_held(db_url), pytest.raises(StoreError) as caught:
        replay_archive(config, root, engine=impatient)
    impatient.dispose()

    assert str(caught.value) == "the database failed: database is locked"


def test_a_replay_leaves_an_account_another_run_is_writing(
    tmp_path: Path,
    simulator: Simulator,
    server: SimServer,
    live: Engine,
    engine: Engine,
) -> None:
    root = tmp_path / "archive"
    live_history(server, simulator, live, root)
    locked = simulator.accounts()[0]
    holder = locks.open_locks(engine, LocksConfig())
    holder.acquire(Account(*locked.key))

    try:
        summary = replay_archive(make_config(server, simulator), root, engine=engine)
    finally:
        holder.close()

    assert (summary.run.outcome, summary.run.accounts_failed) == ("partial", 1)
    (error,) = summary.run.errors
    assert error.startswith(f"account {Account(*locked.key).label}: another run")
    assert locked.key not in stored_owners(engine)
    again = replay_archive(make_config(server, simulator), root, engine=engine)
    assert (again.run.outcome, again.walks, again.skipped) == ("succeeded", 5, 25)
    assert sorted_snapshot(engine) == sorted_snapshot(live)


@pytest.mark.parametrize(
    "lost", ["end.json", "page-000001.json.gz"], ids=["end-marker", "a-page"]
)
def test_an_unfinished_walk_is_stored_but_removes_nothing(
    tmp_path: Path, simulator: Simulator, server: SimServer, engine: Engine, lost: str
) -> None:
    root = tmp_path / "archive"
    config = make_config(server, simulator, root)
    run_sync(config, engine=engine)
    gone = simulator.tasks()[0]
    simulator.remove_task(gone.uuid)
    # The first walk to miss the task flags it; the second removes it.
    run_sync(config, engine=engine)
    run_sync(config, engine=engine)
    slug = f"{gone.user_id}_{gone.sub_user_id}" if gone.sub_user_id else gone.user_id
    (folder,) = root.glob(f"*/*-run2-{slug}-*")
    (folder / lost).unlink()
    target = connect(f"sqlite:///{tmp_path / 'replayed.db'}")

    summary = replay_archive(make_config(server, simulator), root, engine=target)

    # Unfinished, the second walk flagged nothing, so the third only flags.
    assert (summary.walks, summary.unfinished) == (18, 1)
    assert summary.run.counts.removed == 0
    assert gone.uuid in stored_live(target)
    assert stored_live(target) - {gone.uuid} == stored_live(engine)
    with target.connect() as connection:
        flagged = connection.execute(
            select(tasks.c.uuid).where(tasks.c.unlisted_after.is_not(None))
        ).scalars()
        assert list(flagged) == [gone.uuid]


def archived_sync(tmp_path: Path, server: SimServer, simulator: Simulator) -> Path:
    """Sync into a database of its own, archiving; the archive's directory."""
    root = tmp_path / "archive"
    run_sync(
        make_config(server, simulator, root),
        engine=connect(f"sqlite:///{tmp_path / 'live.db'}"),
    )
    return root


def test_replay_command_reports_the_walks_and_can_be_repeated(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    root = archived_sync(tmp_path, server, simulator)
    config = migrated_config(tmp_path, server, simulator, sqlite_url)

    first = invoke("--config", config, "backfill", "--from-archive", str(root))
    second = invoke("--config", config, "backfill", "--from-archive", str(root))

    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("Run 1 (replay) succeeded in ")
    assert first.stdout.endswith(
        "Archive: 6 walks replayed, 0 skipped as no newer than the database.\n"
    )
    assert "Tasks: 48 seen, 48 new, 0 changed, 0 removed" in first.stdout
    assert second.exit_code == 0, second.output
    assert "Run 2 (replay) succeeded in " in second.stdout
    assert second.stdout.endswith(
        "Archive: 0 walks replayed, 6 skipped as no newer than the database.\n"
    )


def test_replay_of_a_corrupt_archive_names_the_file_and_writes_nothing(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    root = archived_sync(tmp_path, server, simulator)
    broken = sorted(root.glob("*/*/page-000002.json.gz"))[-1]
    broken.write_bytes(broken.read_bytes()[:20])
    config = migrated_config(tmp_path, server, simulator, sqlite_url)

    result = invoke("--config", config, "backfill", "--from-archive", str(root))

    assert result.exit_code == 1
    assert result.stderr.endswith(
        f"Error: archive file {broken}: not a complete gzip file: Compressed file "
        "ended before the end-of-stream marker was reached\n"
    )
    target = connect(sqlite_url)
    assert (count(target, sync_runs), count(target, tasks)) == (0, 0)


def test_replay_of_chosen_accounts_only(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    root = archived_sync(tmp_path, server, simulator)
    config = migrated_config(tmp_path, server, simulator, sqlite_url)
    main_id = simulator.main_user_ids()[1]

    chosen = invoke(
        "--config",
        config,
        "backfill",
        "--from-archive",
        str(root),
        "--account",
        main_id,
    )
    unknown = invoke(
        "--config",
        config,
        "backfill",
        "--from-archive",
        str(root),
        "--account",
        "nobody",
    )

    assert chosen.exit_code == 0, chosen.output
    assert stored_owners(connect(sqlite_url)) == {
        a.key for a in simulator.accounts() if a.user_id == main_id
    }
    assert unknown.exit_code == 2
    assert unknown.stderr.endswith(
        "Error: --account: no account in the archive matches nobody\n"
    )


def test_replay_refuses_a_file_that_is_not_an_archive_folder(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a directory"):
        replay_archive(
            Config(
                database=DatabaseConfig(url=f"sqlite:///{tmp_path / 'x.db'}"),
                api=ApiConfig(base_url="http://127.0.0.1:9", token="t"),
                accounts=(MainAccount("u"),),
            ),
            tmp_path / "none",
            engine=connect(f"sqlite:///{tmp_path / 'x.db'}"),
        )
