import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pgcluster import PgCluster

from etl import store
from etl.cli import main
from etl.simulator import SimServer, Simulator


@pytest.fixture
def simulator() -> Simulator:
    return Simulator(seed=5, main_accounts=2, sub_accounts=1, tasks_per_account=6)


def write_config(
    tmp_path: Path, server: SimServer, simulator: Simulator, db_url: str
) -> Path:
    accounts = "".join(
        f'[[accounts]]\nuser_id = "{user_id}"\ndiscover_sub_accounts = true\n'
        for user_id in simulator.main_user_ids()
    )
    path = tmp_path / "task-etl.toml"
    path.write_text(
        f'[database]\nurl = "{db_url}"\n'
        f'[api]\nbase_url = "{server.url}"\npage_size = 4\n'
        "requests_per_second = 500.0\n" + accounts,
        encoding="utf-8",
    )
    return path


def invoke(*args: str, token: str = "sim-token") -> Result:
    runner = CliRunner()
    return runner.invoke(main, list(args), env={"TASK_ETL_TOKEN": token})


def status_with_database(tmp_path: Path, url: str) -> Result:
    """`status` under a configuration that names no database, given `url`."""
    return command_with_database(tmp_path, url, "status")


def command_with_database(tmp_path: Path, url: str, command: str) -> Result:
    """A command under a configuration that names no database, given `url`."""
    path = tmp_path / "task-etl.toml"
    path.write_text(
        "[api]\nbase_url = 'http://127.0.0.1:9'\n[[accounts]]\nuser_id = 'u'\n",
        encoding="utf-8",
    )
    return CliRunner().invoke(
        main, ["--config", str(path), command], env={"TASK_ETL_DATABASE_URL": url}
    )


def test_migrate_then_sync_then_status(
    tmp_path: Path, server: SimServer, simulator: Simulator, db_url: str
) -> None:
    config = str(write_config(tmp_path, server, simulator, db_url))
    head = store.head_revision()

    migrated = invoke("--config", config, "migrate")
    again = invoke("--config", config, "migrate")
    synced = invoke("--config", config, "sync")
    status = invoke("--config", config, "status")

    assert (migrated.exit_code, migrated.stdout) == (
        0,
        f"Database migrated from empty to {head}.\n",
    )
    assert again.stdout == f"Database already at the current schema ({head}).\n"
    assert synced.exit_code == 0, synced.output
    assert synced.stdout.startswith("Run 1 (sync) succeeded in ")
    assert ": 4 accounts (0 failed), " in synced.stdout
    assert "24 seen, 24 new, 0 changed, 0 removed" in synced.stdout
    assert status.exit_code == 0
    assert "#1 sync" in status.stdout


def test_sync_before_migrate_says_what_to_run(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    config = str(write_config(tmp_path, server, simulator, sqlite_url))
    missing = invoke("--config", config, "sync")
    path = sqlite_url.removeprefix("sqlite:///")
    assert not Path(path).exists()
    sqlite3.connect(path).close()

    result = invoke("--config", config, "sync")

    assert missing.exit_code == 1
    assert missing.stderr.endswith(
        f"Error: the database file {path} does not exist: run `task-etl migrate` "
        "first to create it\n"
    )
    assert result.exit_code == 1
    head = store.head_revision()
    assert result.stderr.endswith(
        f"Error: the database is at schema none, not {head}: "
        "run `task-etl migrate` first\n"
    )


def test_wrong_token_fails_every_account_without_showing_it(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    config = str(write_config(tmp_path, server, simulator, sqlite_url))
    invoke("--config", config, "migrate")

    result = invoke("-v", "--config", config, "sync", token="not-the-token")

    assert result.exit_code == 1
    assert "failed" in result.stdout
    assert "token" in result.output
    assert "not-the-token" not in result.output


def test_a_sync_whose_reader_is_gone_exits_with_its_own_code(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    # A closed terminal, or a reader gone, failed the print of the summary of
    # a run done and recorded: exit 1 and a traceback instead of its code.
    config = str(write_config(tmp_path, server, simulator, sqlite_url))
    invoke("--config", config, "migrate")
    command = Path(sys.executable).parent / "task-etl"
    process = subprocess.Popen(
        [str(command), "--config", config, "sync"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TASK_ETL_TOKEN": "sim-token"},
    )
    assert process.stdout is not None
    process.stdout.close()  # nothing will read the summary
    _, err = process.communicate(timeout=60)

    assert process.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert b"run 1 succeeded" in err


def test_a_command_started_with_its_output_closed_exits_with_its_own_code(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    # `task-etl migrate >&-`: Python's stdout is then None, and printing to
    # it failed with a traceback and exit 1.
    config = str(write_config(tmp_path, server, simulator, sqlite_url))
    command = Path(sys.executable).parent / "task-etl"
    done = subprocess.run(
        [str(command), "--config", config, "migrate"],
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
        timeout=60,
    )

    assert done.returncode == 0, done.stderr.decode()
    assert b"Traceback" not in done.stderr
    assert invoke("--config", config, "status").exit_code == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[api]\nbase_url = 1\n", "api.base_url: expected a string, got an integer"),
        ("[[accounts]]\nuser_id = 'u'\n", "api.base_url: required key is missing"),
        ("nonsense", "cannot read"),
        (
            "[api]\nbase_url = 'http://127.0.0.1:99999'\n",
            "api.base_url: the port must be a number from 1 to 65535",
        ),
    ],
    ids=["wrong-type", "missing-key", "not-toml", "base-url-port"],
)
def test_bad_configuration_exits_2_naming_key_and_file(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")

    result = invoke("--config", str(path), "sync")

    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: {path}: ")
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "text", "message"),
    [
        (
            "status",
            "[database]\nbusy_timeout = nan\n",
            "database.busy_timeout: must be a finite number, got nan",
        ),
        (
            "sync",
            "[api]\nbase_url = 'http://127.0.0.1:9'\nrequests_per_second = inf\n",
            "api.requests_per_second: must be a finite number, got inf",
        ),
        (
            "sync",
            "[api]\nbase_url = 'http://127.0.0.1:9'\nread_timeout = 1e308\n",
            "api.read_timeout: must be at most 86400 s (a day), got 1e+308",
        ),
    ],
    ids=["busy-timeout-nan", "rate-inf", "timeout-huge"],
)
def test_a_number_out_of_range_exits_2_before_any_work(
    tmp_path: Path, command: str, text: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "[[accounts]]\nuser_id = 'u'\n", encoding="utf-8")

    result = invoke("--config", str(path), command)

    assert result.exit_code == 2
    assert result.stderr == f"Error: {path}: {message}\n"


def test_a_configuration_that_is_not_utf8_exits_2_naming_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe[api]\n")

    result = invoke("--config", str(path), "status")

    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: {path}: starts with a UTF-16 byte-order mark: TOML files are UTF-8\n"
    )


def test_an_option_the_database_driver_cannot_read_exits_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/tasks.db?timeout=abc"

    result = status_with_database(tmp_path, url)

    assert result.exit_code == 2
    assert result.stderr == (
        "Error: TASK_ETL_DATABASE_URL: an option of the URL cannot be read: "
        "could not convert string to float: 'abc'\n"
    )


def test_an_error_line_shows_control_characters_escaped(tmp_path: Path) -> None:
    # A file name may hold a line break or a terminal escape sequence; the
    # error stays one line and leaves the terminal alone.
    url = f"sqlite:///{tmp_path}/x%0A%1B[2J.db"

    missing_config = invoke("--config", f"{tmp_path}/new\nline.toml", "status")
    missing_database = status_with_database(tmp_path, url)

    assert missing_config.exit_code == 2
    assert missing_config.stderr == (
        f"Error: {tmp_path}/new\\nline.toml: file not found (give --config or set "
        "TASK_ETL_CONFIG)\n"
    )
    assert missing_database.exit_code == 1
    assert missing_database.stderr == (
        f"Error: the database file {tmp_path}/x\\n\\x1b[2J.db does not exist: run "
        "`task-etl migrate` first to create it\n"
    )


def test_missing_configuration_exits_2(tmp_path: Path) -> None:
    result = invoke("--config", str(tmp_path / "none.toml"), "sync")

    assert result.exit_code == 2
    assert "file not found (give --config or set TASK_ETL_CONFIG)" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    assert invoke("sink").exit_code == 2


def test_demo_syncs_three_times_into_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.db"

    result = invoke("demo", "--database", str(path))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Simulator on http://127.0.0.1:")
    assert lines[1].startswith("Run 1 (sync) succeeded in ")
    assert "Simulated clock moved on 6 hours; syncing again." in lines
    assert any(line.startswith("Run 2 (sync) succeeded in ") for line in lines)
    # The third sync confirms the removals the second found, and only that.
    third = lines.index("Syncing once more, which marks removed what both missed.")
    assert lines[third + 1].startswith("Run 3 (sync) succeeded in ")
    assert lines[third + 2].startswith("Tasks: 121 seen, 0 new, 0 changed, 6 removed")
    assert lines[-2].startswith("In the database: ")
    assert lines[-1].startswith(f'Try: sqlite3 {path} "SELECT status_str')
    assert path.exists()


def test_simulate_on_a_busy_port_is_a_usage_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = invoke("simulate", "--port", str(port))

    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.output


def test_status_and_report_need_no_token(
    tmp_path: Path, server: SimServer, simulator: Simulator, sqlite_url: str
) -> None:
    config = str(write_config(tmp_path, server, simulator, sqlite_url))
    assert invoke("--config", config, "migrate", token="").exit_code == 0
    assert invoke("--config", config, "sync").exit_code == 0

    status = invoke("--config", config, "status", token="")
    report = invoke("--config", config, "report", token="")

    assert (status.exit_code, report.exit_code) == (0, 0), status.output
    assert "Last good sync:" in status.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tick", "nan"), "Invalid value for '--tick': 'nan' is not a number"),
        (("--tick", "inf"), "Invalid value for '--tick': inf is not in the range"),
        (("--step", "1e308"), "Invalid value for '--step': 1e+308 is not in the"),
        (("--step", "-1"), "Invalid value for '--step': -1.0 is not in the range"),
        (("--stall", "nan"), "Invalid value for '--stall': 'nan' is not a number"),
    ],
    ids=["tick-nan", "tick-inf", "step-huge", "step-negative", "stall-nan"],
)
def test_simulate_refuses_times_out_of_range_before_serving(
    args: tuple[str, ...], message: str
) -> None:
    # Each crashed the serving loop in a traceback.
    result = invoke("simulate", "--port", "0", *args)

    assert result.exit_code == 2
    assert message in result.stderr
    assert "Simulator on" not in result.output


@pytest.mark.postgresql
@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1"])
def test_migrate_refuses_a_database_that_is_not_utf8(
    tmp_path: Path, pg_cluster: PgCluster, encoding: str
) -> None:
    # SQLAlchemy's first connection to a SQL_ASCII database read the server's
    # version as bytes, and `migrate` ended in a traceback; a LATIN1 one
    # refused the platform's Chinese text page after page.
    name = f"encoded_{encoding.lower()}"
    with pg_cluster.connect_admin() as admin:
        admin.execute(
            f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C'"
            " LC_CTYPE 'C' TEMPLATE template0"
        )
    try:
        result = command_with_database(tmp_path, pg_cluster.url(name), "migrate")
    finally:
        pg_cluster.drop_database(name)

    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: TASK_ETL_DATABASE_URL: the database's encoding is {encoding}; "
        "task-etl needs a database created with ENCODING 'UTF8'\n"
    )


def test_a_ctrl_c_while_the_command_loads_ends_it_without_a_traceback() -> None:
    # Loading the command takes about a second, and a Ctrl-C then printed a
    # traceback of the imports.
    command = Path(sys.executable).parent / "task-etl"
    process = subprocess.Popen(
        [str(command), "--version"], stderr=subprocess.PIPE, text=True
    )
    time.sleep(0.2)  # the interpreter is up, the command's modules loading
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)

    assert "Traceback" not in err
    # Stopped, or ended by the signal if it came before Python's handler.
    assert process.returncode in (130, -signal.SIGINT), err
