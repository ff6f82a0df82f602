from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner, Result

from etl import runs
from etl.cli import EXIT_STALE, main
from etl.report import describe_age, parse_duration
from etl.simulator import SimServer, Simulator


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=8, main_accounts=2, sub_accounts=1, tasks_per_account=4)


@pytest.fixture
def config(tmp_path: Path, server: SimServer, simulator: Simulator, db_url: str) -> str:
    accounts = "".join(
        f'[[accounts]]\nuser_id = "{user_id}"\ndiscover_sub_accounts = true\n'
        for user_id in simulator.main_user_ids()
    )
    path = tmp_path / "task-etl.toml"
    path.write_text(
        f'[database]\nurl = "{db_url}"\n'
        f'[api]\nbase_url = "{server.url}"\npage_size = 3\n'
        "requests_per_second = 500.0\n" + accounts,
        encoding="utf-8",
    )
    assert invoke("--config", str(path), "migrate").exit_code == 0
    return str(path)


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
def test_max_age_exits_5_when_the_newest_good_sync_is_older(
    config: str, elapsed: int, max_age: str, code: int
) -> None:
    assert invoke("--config", config, "sync").exit_code == 0

    with later(elapsed):
        result = invoke("--config", config, "status", "--max-age", max_age)

    assert result.exit_code == code, result.output
    assert "Last good sync: " in result.stdout
    if code:
        assert result.stderr.endswith(
            f"older than --max-age {describe_age(parse_duration(max_age))}\n"
        )
        assert result.stderr.startswith("Error: the newest good sync is ")
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


@pytest.mark.parametrize(
    "value", ["", "90", "1w", "s", "-5m", "1.5h", "2 hours"], ids=repr
)
def test_a_bad_max_age_is_a_usage_error(config: str, value: str) -> None:
    result = invoke("--config", config, "status", "--max-age", value)

    assert result.exit_code == 2
    assert f"Invalid value for '--max-age': {value!r} is not a duration" in (
        result.stderr
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
    assert "3 accounts (1 failed)" in lines[1]
    assert lines[2] == "Accounts:"
    assert sum("last error: " in line for line in lines) == 1
    assert "the platform refused the token" in result.stdout
    assert "sim-token" not in result.output and "rotated-secret" not in result.output
    assert "http" not in result.output
    assert lines[-1].startswith("Last good sync: ")
    assert lines[-1].endswith(" s ago)")
