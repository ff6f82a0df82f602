import os
import socket
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import insert

from etl import runs, store
from etl.cli import EXIT_STALE, main
from etl.config import DatabaseConfig
from etl.models import sync_runs
from etl.report import STALE_SHOWN, check_freshness, describe_age, parse_duration
from etl.simulator import SimServer, Simulator


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=8, main_accounts=2, sub_accounts=1, tasks_per_account=4)


@pytest.fixture
def config(tmp_path: Path, server: SimServer, simulator: Simulator, db_url: str) -> str:
    path = write_config(tmp_path / "task-etl.toml", server, simulator, db_url)
    assert invoke("--config", path, "migrate").exit_code == 0
    return path


def write_config(
    path: Path, server: SimServer, simulator: Simulator, db_url: str, api: str = ""
) -> str:
    """A configuration of every main account; `api` adds lines to [api]."""
    accounts = "".join(
        f'[[accounts]]\nuser_id = "{user_id}"\ndiscover_sub_accounts = true\n'
        for user_id in simulator.main_user_ids()
    )
    path.write_text(
        f'[database]\nurl = "{db_url}"\n'
        f'[api]\nbase_url = "{server.url}"\npage_size = 3\n'
        "requests_per_second = 500.0\n" + api + accounts,
        encoding="utf-8",
    )
    return str(path)


def labels(simulator: Simulator, user_id: str) -> list[str]:
    """How status names the accounts of a main account, in its order."""
    return sorted(
        f"{a.user_id}:{a.sub_user_id}" if a.sub_user_id else a.user_id
        for a in simulator.accounts()
        if a.user_id == user_id
    )


def invoke(*args: str, token: str = "sim-token") -> Result:
    return CliRunner().invoke(main, list(args), env={"TASK_ETL_TOKEN": token})


def later(seconds: float) -> Any:
    """The clock `seconds` from now, for the status command alone."""
    return mock.patch(
        "etl.runs.now", return_value=runs.now() + timedelta(seconds=seconds)
    )


@pytest.mark.parametrize(
    ("elapsed", "max_age", "code"),
    [
        (0, "90s", 0),
        (89 * 60, "90m", 0),
        (91 * 60, "90m", EXIT_STALE),
        (3 * 3600, "2h", EXIT_STALE),
        (23 * 3600, "1d", 0),
        (25 * 3600, "1d", EXIT_STALE),
    ],
    ids=[
        "just-synced",
        "fresh-minutes",
        "stale-minutes",
        "stale-hours",
        "fresh-day",
        "stale-day",
    ],
)
def test_max_age_exits_5_when_the_last_good_syncs_are_older(
    config: str, simulator: Simulator, elapsed: int, max_age: str, code: int
) -> None:
    assert invoke("--config", config, "sync").exit_code == 0

    with later(elapsed):
        result = invoke("--config", config, "status", "--max-age", max_age)

    assert result.exit_code == code, result.output
    assert "Last good sync: " in result.stdout
    if code:
        every = [
            label
            for user_id in simulator.main_user_ids()
            for label in labels(simulator, user_id)
        ]
        head, named = result.stderr.rstrip("\n").rsplit(": ", 1)
        assert head == (
            f"Error: {len(every)} of {len(every)} accounts had no good sync "
            f"within --max-age {describe_age(parse_duration(max_age))}"
        )
        # Four accounts: three are named, the oldest first, then a count.
        shown, _, more = named.partition(" and ")
        assert more == f"{len(every) - STALE_SHOWN} more"
        age = describe_age(timedelta(seconds=elapsed))
        assert len(set(shown.split(", "))) == STALE_SHOWN
        assert set(shown.split(", ")) <= {f"{x} (last {age} ago)" for x in every}
    else:
        assert result.stderr == ""


def test_max_age_exits_5_when_nothing_ever_synced(config: str) -> None:
    result = invoke("--config", config, "status", "--max-age", "1d")

    assert result.exit_code == EXIT_STALE == 5
    assert result.stderr == "Error: no account has ever synced successfully\n"
    assert result.stdout.endswith("Last good sync: never\n")


def test_max_age_counts_only_successful_walks(config: str) -> None:
    failed = invoke("--config", config, "sync", token="wrong")

    result = invoke("--config", config, "status", "--max-age", "1d")

    assert failed.exit_code == 1
    assert result.exit_code == EXIT_STALE
    assert "#1 sync" in result.stdout and " failed " in result.stdout


def test_max_age_names_an_account_that_never_succeeds_while_others_do(
    config: str, simulator: Simulator
) -> None:
    failing, _working = simulator.main_user_ids()
    simulator.set_token(failing, "rotated-secret")
    assert invoke("--config", config, "sync").exit_code == 3

    result = invoke("--config", config, "status", "--max-age", "1d")

    # Its sub-account was never discovered: three accounts are known.
    assert result.exit_code == EXIT_STALE, result.output
    assert result.stderr == (
        "Error: 1 of 3 accounts had no good sync within --max-age 1 d: "
        f"{failing} (never)\n"
    )


def test_max_age_names_the_accounts_whose_last_good_sync_is_older(
    config: str, simulator: Simulator
) -> None:
    failing, _working = simulator.main_user_ids()
    assert invoke("--config", config, "sync").exit_code == 0
    simulator.set_token(failing, "rotated-secret")

    with later(2 * 3600):
        synced = invoke("--config", config, "sync")
        result = invoke("--config", config, "status", "--max-age", "1h")

    assert synced.exit_code == 3, synced.output
    assert result.exit_code == EXIT_STALE, result.output
    head, named = result.stderr.rstrip("\n").rsplit(": ", 1)
    assert head == "Error: 2 of 4 accounts had no good sync within --max-age 1 h"
    assert sorted(named.split(", ")) == [
        f"{label} (last 2 h ago)" for label in labels(simulator, failing)
    ]
    assert "Last good sync: " in result.stdout
    assert result.stdout.endswith(" (0 s ago)\n")


def test_max_age_counts_the_accounts_of_the_given_main_accounts(
    config: str, simulator: Simulator, db_url: str
) -> None:
    failing, working = simulator.main_user_ids()
    simulator.set_token(failing, "rotated-secret")
    invoke("--config", config, "sync")
    engine = store.connect(DatabaseConfig(url=db_url))
    day = timedelta(days=1)

    try:
        fresh = check_freshness(engine, day, main_user_ids=[working])
        added = check_freshness(engine, day, main_user_ids=[working, "new-main"])
        unknown = check_freshness(engine, day, main_user_ids=["new-main"])
    finally:
        engine.dispose()

    assert fresh is None
    assert added == (
        "1 of 3 accounts had no good sync within --max-age 1 d: new-main (never)"
    )
    assert unknown == "no account has ever synced successfully"


def test_status_shows_a_failed_discovery_and_its_known_sub_accounts_sync(
    config: str, tmp_path: Path, server: SimServer, simulator: Simulator, db_url: str
) -> None:
    assert invoke("--config", config, "sync").exit_code == 0
    # A path the simulator does not serve: the list answers 404.
    broken = write_config(
        tmp_path / "broken.toml",
        server,
        simulator,
        db_url,
        api='[api.endpoints]\nsub_account_list = "/agent-api/user/{user_id}/subs"\n',
    )

    synced = invoke("--config", broken, "sync")
    result = invoke("--config", broken, "status", "--limit", "1", "--max-age", "1h")

    assert synced.exit_code == 3, synced.output
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith("  #2 sync ")
    assert " partial " in lines[1] and "4 accounts (0 failed)" in lines[1]
    errors = [line.strip() for line in lines if "last error: " in line]
    assert errors == [
        f"last error: sub-account discovery failed: account {user_id}, endpoint "
        "/agent-api/user/{user_id}/subs, page 1, HTTP 404: the platform rejected "
        "the request: '接口不存在'"
        for user_id in sorted(simulator.main_user_ids())
    ]


@pytest.mark.parametrize(
    "value", ["", "90", "1w", "s", "-5m", "1.5h", "2 hours"], ids=repr
)
def test_a_bad_max_age_is_a_usage_error(config: str, value: str) -> None:
    result = invoke("--config", config, "status", "--max-age", value)

    assert result.exit_code == 2
    assert f"Invalid value for '--max-age': {value!r} is not a duration" in (
        result.stderr
    )


@pytest.mark.parametrize("option", ["--max-age", "--max-complete-age"])
def test_a_duration_too_long_for_a_date_is_a_usage_error(
    config: str, option: str
) -> None:
    result = invoke("--config", config, "status", option, "99999999999d")

    assert result.exit_code == 2
    assert (
        f"Invalid value for '{option}': '99999999999d' is longer than any "
        "duration can be"
    ) in " ".join(result.stderr.split())


@pytest.mark.parametrize("limit", ["0", "-1", "1000001", "99999999999999999999"])
def test_a_limit_out_of_range_is_a_usage_error(config: str, limit: str) -> None:
    # Past 2**63 SQLite's LIMIT overflowed in a traceback; -1 meant no limit
    # on SQLite and an error on PostgreSQL.
    result = invoke("--config", config, "status", "--limit", limit)

    assert result.exit_code == 2
    assert (
        f"Invalid value for '--limit': {limit} is not in the range 1<=x<=1000000"
        in (" ".join(result.stderr.split()))
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), (" 5M ", 300)],
    ids=["seconds", "minutes", "hours", "days", "spaces-and-case"],
)
def test_durations_read_as_number_and_unit(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (59, "59 s"),
        (60, "1 min"),
        (61, "1 min 1 s"),
        (3600, "1 h"),
        (2 * 3600 + 5 * 60 + 9, "2 h 5 min"),
        (86400, "1 d"),
        (2 * 86400 + 4 * 3600 + 7, "2 d 4 h"),
    ],
    ids=lambda value: str(value),
)
def test_ages_read_in_their_two_largest_units(seconds: int, text: str) -> None:
    assert describe_age(timedelta(seconds=seconds)) == text


def test_status_shows_runs_accounts_and_errors_without_secrets(
    config: str, simulator: Simulator
) -> None:
    invoke("--config", config, "sync")
    simulator.set_token(simulator.main_user_ids()[0], "rotated-secret")
    invoke("--config", config, "sync")

    result = invoke("--config", config, "status", "--limit", "1")

    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "Recent runs:"
    assert lines[1].startswith("  #2 sync ")
    assert " partial " in lines[1]
    # The account's sub-account is walked too, from the first run's list.
    assert "4 accounts (2 failed)" in lines[1]
    assert lines[2] == "Accounts:"
    assert sum("last error: " in line for line in lines) == 2
    assert "the platform refused the token" in result.stdout
    assert "sim-token" not in result.output and "rotated-secret" not in result.output
    assert "http" not in result.output
    assert lines[-1].startswith("Last good sync: ")
    assert lines[-1].endswith(" s ago)")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_status_answers_while_another_process_holds_sqlite_s_write_lock(
    config: str, db_url: str
) -> None:
    # Every transaction took the write lock: status, watching for stale
    # syncs, failed "database is locked" while a sync wrote.
    assert invoke("--config", config, "sync").exit_code == 0
    text = Path(config).read_text(encoding="utf-8")
    Path(config).write_text(text.replace("[database]", "[database]\nbusy_timeout = 1"))
    holder = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = invoke("--config", config, "status", "--max-age", "1h")
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Recent runs:\n  #1 sync ")


def test_status_shows_when_each_account_last_had_a_complete_walk(
    config: str, simulator: Simulator
) -> None:
    # A filtered pull succeeds but cannot show which tasks are gone.
    main = simulator.main_user_ids()[0]
    invoke("--config", config, "backfill", "--account", main, "--status", "2")
    filtered = invoke("--config", config, "status").stdout
    invoke("--config", config, "sync")
    synced = invoke("--config", config, "status").stdout

    row = next(line for line in filtered.splitlines() if line.startswith(f"  {main} "))
    assert "succeeded" in row and "last complete walk never" in row
    rows = [
        line
        for line in synced.splitlines()
        if line.startswith("  ") and "#" not in line
    ]
    assert rows and all("last complete walk 20" in line for line in rows)


def test_max_complete_age_names_accounts_whose_walks_succeed_but_never_complete(
    config: str, simulator: Simulator
) -> None:
    main = simulator.main_user_ids()[0]
    assert invoke("--config", config, "sync").exit_code == 0
    fresh = invoke("--config", config, "status", "--max-complete-age", "1h")
    with later(2 * 3600):
        # Filtered pulls succeed, and say nothing of which tasks are gone.
        pulled = invoke(
            "--config", config, "backfill", "--account", main, "--name", "x"
        )
    with later(2 * 3600 + 60):
        both = invoke(
            "--config", config, "status", "--max-age", "1h", "--max-complete-age", "1h"
        )

    assert (fresh.exit_code, fresh.stderr) == (0, "")
    assert pulled.exit_code == 0, pulled.output
    assert both.exit_code == EXIT_STALE
    errors = both.stderr.splitlines()
    every = len(simulator.accounts())
    stale = labels(simulator, main)
    assert errors[0].startswith(
        f"Error: {every - len(stale)} of {every} accounts had no good sync within "
        "--max-age 1 h: "
    )
    assert errors[1].startswith(
        f"Error: {every} of {every} accounts had no complete walk within "
        "--max-complete-age 1 h: "
    )
    assert len(errors) == 2


def test_max_complete_age_exits_5_when_no_walk_ever_completed(config: str) -> None:
    result = invoke("--config", config, "status", "--max-complete-age", "1d")

    assert result.exit_code == EXIT_STALE
    assert result.stderr == "Error: no account has ever had a complete walk\n"


def test_status_says_when_a_running_run_has_lost_its_process(
    config: str, db_url: str
) -> None:
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait(timeout=30)
    engine = store.connect(DatabaseConfig(url=db_url))
    with engine.begin() as connection:
        for pid in (exited.pid, os.getpid()):
            connection.execute(
                insert(sync_runs).values(
                    kind="sync",
                    started_at=runs.now(),
                    outcome="running",
                    host=socket.gethostname(),
                    pid=pid,
                )
            )
    engine.dispose()

    result = invoke("--config", config, "status")

    # The newest first.
    alive, killed = result.stdout.splitlines()[1:3]
    gone = "; its process is gone, and the next run marks it abandoned"
    assert killed.startswith("  #1 sync ") and killed.endswith(gone)
    assert alive.startswith("  #2 sync ") and " running " in alive
    assert gone not in alive
