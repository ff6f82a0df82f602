import re
from pathlib import Path

import pytest

from etl import config, store
from etl.config import DATABASE_ENV
from etl.errors import ConfigError, StoreError

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[api]
base_url = "http://127.0.0.1:9"
token = "file-token"

[[accounts]]
user_id = "main-1"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "task-etl.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_file_loads_and_shows_every_default() -> None:
    loaded = config.load(ROOT / "config.example.toml", {"TASK_ETL_TOKEN": "t"})
    defaults = config.ApiConfig(base_url=loaded.api.base_url, token="t")

    assert loaded.api == defaults
    assert loaded.database == config.DatabaseConfig()
    assert loaded.accounts[0].sync_own_tasks is True


def test_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, MINIMAL), {})

    assert loaded.api.timezone == "Asia/Shanghai"
    assert loaded.api.page_size == 100
    assert loaded.database.url == "sqlite:///task-etl.db"
    assert loaded.accounts == (config.MainAccount(user_id="main-1"),)
    assert loaded.token_for("main-1") == "file-token"


def test_environment_overrides_token_and_database(tmp_path: Path) -> None:
    url = "sqlite:///elsewhere.db"
    environ = {"TASK_ETL_TOKEN": "env-token", "TASK_ETL_DATABASE_URL": url}

    loaded = config.load(write(tmp_path, MINIMAL), environ)

    assert loaded.api.token == "env-token"
    assert loaded.database.url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://etl:s3cret@db/tasks", "mysql:// is not supported"),
        # Drivers the store was never written for: they fail only later.
        ("postgresql+asyncpg://etl:s3cret@db/t", "postgresql+asyncpg:// is not"),
        ("postgresql+psycopg2://etl:s3cret@db/t", "postgresql+psycopg2:// is not"),
        ("postgresql+psycopg+x://etl:s3cret@db/t", "postgresql+psycopg+x:// is not"),
        ("sqlite+pysqlcipher://:s3cret@/tasks.db", "sqlite+pysqlcipher:// is not"),
        ("sqlite+aiosqlite:///s3cret.db", "sqlite+aiosqlite:// is not supported"),
        ("s3cret", "not a database URL"),
        # Read as a host and a port: the parser's message quoted the password.
        ("postgresql+psycopg://etl:p@ss:s3cret@127.0.0.1/tasks", "not a database URL"),
        # Read as a host, port or database: a failed connection named it.
        ("postgresql+psycopg://etl:p@s3cret@127.0.0.1/t", "an @ in the user name"),
        ("postgresql+psycopg://etl:My@s3cret/24@127.0.0.1/t", "an @ in the user"),
        ("postgresql+psycopg://etl:p@[s3cret]PW@127.0.0.1/t", "an @ in the user"),
        ("postgresql+psycopg://etl:s3cret@127.0.0.1:99999/t", "the port must be"),
        ("sqlite://:0/s3cret.db", "a SQLite URL names a file, not a server"),
        ("sqlite://@/s3cret.db", "a SQLite URL names a file, not a server"),
        ("sqlite:///file:s3cret.db?uri=true", "SQLite URI filenames are not"),
        ("sqlite:///file::memory:?uri=true", "SQLite URI filenames are not"),
        ("sqlite://etl:s3cret@dbhost/tasks.db", "a SQLite URL names a file, not"),
        # The driver read these only when the engine was made: exit 1.
        (
            "sqlite:///tasks.db?timeout=abc",
            "an option of the URL cannot be read: could not convert string to "
            "float: 'abc'",
        ),
        (
            "sqlite:///tasks.db?check_same_thread=maybe",
            "an option of the URL cannot be read: String is not true/false",
        ),
        ("sqlite:///tasks.db?timeout=5&timeout=6", "the option timeout is given more"),
        ("sqlite:///tasks.db?timeout=nan", "?timeout= must be from 0 to 86400 s"),
        ("sqlite:///tasks.db?timeout=1e999", "?timeout= must be from 0 to 86400 s"),
        ("sqlite:///%00tasks.db", "holds a NUL character (%00), which no part"),
        ("postgresql+psycopg://etl:s3%00cret@db/t", "holds a NUL character (%00)"),
        # Gone when the command ends: `migrate` said it migrated it.
        ("sqlite://", "an in-memory SQLite database ends with the command"),
        ("sqlite:///:memory:", "an in-memory SQLite database ends with the command"),
    ],
)
def test_a_bad_database_url_from_the_environment_is_named_so(
    tmp_path: Path, url: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        config.load(write(tmp_path, MINIMAL), {"TASK_ETL_DATABASE_URL": url})

    assert str(raised.value).startswith(f"TASK_ETL_DATABASE_URL: {message}")
    assert "s3cret" not in str(raised.value)


def test_token_per_main_account(tmp_path: Path) -> None:
    text = MINIMAL + (
        '[[accounts]]\nuser_id = "main-2"\ntoken_env = "MAIN2"\n'
        '[[accounts]]\nuser_id = "main-3"\ntoken = "three"\n'
    )

    loaded = config.load(write(tmp_path, text), {"MAIN2": "two"})

    assert [loaded.token_for(u) for u in ("main-1", "main-2", "main-3")] == [
        "file-token",
        "two",
        "three",
    ]


def test_a_token_saved_with_a_line_end_is_trimmed(tmp_path: Path) -> None:
    environ = {"TASK_ETL_TOKEN": "env-token\r\n"}

    loaded = config.load(write(tmp_path, MINIMAL), environ)

    assert loaded.api.token == "env-token"


@pytest.mark.parametrize(
    ("environ", "text", "key"),
    [
        ({"TASK_ETL_TOKEN": "Secret\rInside"}, MINIMAL, "api.token"),
        ({"TASK_ETL_TOKEN": "Secret Inside"}, MINIMAL, "api.token"),
        ({}, MINIMAL.replace("file-token", "Secret€Inside"), "api.token"),
        (
            {"MAIN2": "Secret\nInside"},
            MINIMAL + '[[accounts]]\nuser_id = "main-2"\ntoken_env = "MAIN2"\n',
            "accounts[1].token",
        ),
    ],
    ids=["carriage-return", "space", "non-ascii", "token-env-line-break"],
)
def test_a_token_no_header_can_carry_is_refused_without_showing_it(
    tmp_path: Path, environ: dict[str, str], text: str, key: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        config.load(path, environ)

    assert raised.value.exit_code == 2
    assert f"{path}: {key}: the token from" in str(raised.value)
    assert "Secret" not in str(raised.value)


def test_an_unset_token_env_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    text = MINIMAL + '[[accounts]]\nuser_id = "main-2"\ntoken_env = "NOPE_TOKEN"\n'

    with pytest.raises(ConfigError, match="accounts\\[1\\].token_env: the environ"):
        config.load(write(tmp_path, text), {})


def test_commands_that_only_read_the_database_need_no_token(tmp_path: Path) -> None:
    text = MINIMAL.replace('token = "file-token"\n', "") + (
        '[[accounts]]\nuser_id = "main-2"\ntoken_env = "NOPE_TOKEN"\n'
    )
    path = write(tmp_path, text)

    loaded = config.load(path, {"TASK_ETL_TOKEN": "Secret Inside"}, tokens=False)

    assert [loaded.token_for(u) for u in ("main-1", "main-2")] == ["", ""]
    with pytest.raises(ConfigError, match="NOPE_TOKEN is not set"):
        config.load(path, {})


@pytest.mark.parametrize("user_id", [".", ".."])
def test_a_dot_segment_is_not_an_account_id(tmp_path: Path, user_id: str) -> None:
    path = write(tmp_path, MINIMAL.replace('"main-1"', f'"{user_id}"'))

    with pytest.raises(ConfigError, match=r"accounts\[0\]\.user_id: '\.+' is not"):
        config.load(path, {})


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"main-1"', f'"{"u" * 201}"', r"accounts\[0\]\.user_id: longer than 200"),
        (
            'user_id = "main-1"',
            f'user_id = "main-1"\nsub_accounts = ["ok", "{"s" * 201}"]',
            r"accounts\[0\]\.sub_accounts: an id is longer than 200",
        ),
    ],
    ids=["user_id", "sub_account"],
)
def test_an_id_longer_than_the_columns_is_refused(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = write(tmp_path, MINIMAL.replace(old, new, 1))

    with pytest.raises(ConfigError, match=message) as raised:
        config.load(path, {})
    assert raised.value.exit_code == 2


def test_an_id_as_long_as_the_columns_is_accepted(tmp_path: Path) -> None:
    text = MINIMAL.replace('"main-1"', f'"{"u" * 200}"', 1)

    loaded = config.load(write(tmp_path, text), {})

    assert loaded.accounts[0].user_id == "u" * 200


def test_tokens_are_not_in_the_repr(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, MINIMAL), {})

    assert "file-token" not in repr(loaded)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "colour = 1\n", "accounts[0].colour: unknown key"),
        (MINIMAL.replace("[api]", "[api]\npage_sise = 5"), "api.page_sise: unknown"),
        (
            MINIMAL.replace("[api]", "[api]\npage_size = '5'"),
            "api.page_size: expected an integer, got a string",
        ),
        (
            MINIMAL.replace("[api]", "[api]\npage_size = 0"),
            "api.page_size: must be at least 1",
        ),
        (
            MINIMAL.replace("[api]", "[api]\nread_timeout = -1"),
            "api.read_timeout: must be greater than 0",
        ),
        (
            MINIMAL.replace("[api]", "[api]\ntimezone = 'Mars/Base'"),
            "api.timezone: unknown time zone",
        ),
        (
            MINIMAL.replace('base_url = "http://127.0.0.1:9"', ""),
            "api.base_url: required key is missing",
        ),
        (
            MINIMAL.replace('base_url = "http://127.0.0.1:9"', 'base_url = "ftp://x"'),
            "api.base_url: must start with http",
        ),
        (
            MINIMAL + "sub_accounts = [1]\n",
            "accounts[0].sub_accounts: must be a list of non-empty strings",
        ),
        (
            MINIMAL + "sync_own_tasks = 'yes'\n",
            "accounts[0].sync_own_tasks: expected true or false",
        ),
        (MINIMAL.split("[[accounts]]")[0], "accounts: at least one"),
        (
            MINIMAL
            + '[[accounts]]\nuser_id = "main-2"\n[[accounts]]\nuser_id = "main-1"\n',
            "accounts[2].user_id: user_id main-1 is also in accounts[0]: give each"
            " main account one entry",
        ),
        (MINIMAL.replace('token = "file-token"', ""), "accounts[0].token: no token"),
        (
            MINIMAL + '[api.endpoints]\ntask_list = "/tasks"\n',
            "api.endpoints.task_list: must start with / and contain {user_id}",
        ),
        (MINIMAL + "[surprise]\n", "surprise: unknown key"),
        ("[api\n", "cannot read"),
        (
            '[database]\nurl = "mysql://etl:pw@db/tasks"\n' + MINIMAL,
            "database.url: mysql:// is not supported; use sqlite:///PATH or",
        ),
        (
            '[database]\nurl = "tasks.db"\n' + MINIMAL,
            "database.url: not a database URL; expected sqlite:///PATH",
        ),
        (
            '[database]\nurl = "postgresql://etl:p@ss:pw@db/tasks"\n' + MINIMAL,
            "database.url: not a database URL; expected sqlite:///PATH",
        ),
    ],
    ids=[
        "unknown-account-key",
        "unknown-api-key",
        "wrong-type",
        "too-small",
        "negative",
        "bad-zone",
        "missing-required",
        "bad-scheme",
        "bad-sub-accounts",
        "bool-as-string",
        "no-accounts",
        "main-account-twice",
        "no-token",
        "bad-endpoint",
        "unknown-table",
        "not-toml",
        "unsupported-database",
        "not-a-database-url",
        "password-read-as-port",
    ],
)
def test_bad_files_name_the_key_and_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        config.load(path, {})

    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)
    assert raised.value.exit_code == 2


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("api.requests_per_second = nan", "must be a finite number, got nan"),
        ("api.requests_per_second = inf", "must be a finite number, got inf"),
        ("api.requests_per_second = -inf", "must be a finite number, got -inf"),
        ("api.requests_per_second = 100001", "must be at most 100000, got 100001"),
        ("api.requests_per_second = 1e-300", "must be at least 0.001 (a request"),
        ("api.read_timeout = nan", "must be a finite number, got nan"),
        ("api.read_timeout = 1e308", "must be at most 86400 s (a day), got 1e+308"),
        ("api.connect_timeout = inf", "must be a finite number, got inf"),
        ("api.connect_timeout = 86401", "must be at most 86400 s (a day)"),
        ("api.backoff_initial = inf", "must be a finite number, got inf"),
        ("api.backoff_max = nan", "must be a finite number, got nan"),
        ("api.retry_after_max = nan", "must be a finite number, got nan"),
        ("api.retry_after_max = 1e6", "must be at most 86400 s (a day)"),
        ("database.busy_timeout = nan", "must be a finite number, got nan"),
        ("database.busy_timeout = 1e20", "must be at most 86400 s (a day)"),
        ("database.busy_timeout = 0", "must be greater than 0"),
        ("schedule.interval = nan", "a duration cannot be nan"),
        ("schedule.deadline = inf", "a duration cannot be inf"),
        (f'locks.lease = "{"9" * 400}s"', "a duration cannot be"),
        ('locks.wait = "8761h"', "a duration can be at most 365d"),
        # Each connection of the HTTP pool was made up front: 10**8 of them
        # held the process for good.
        ("api.parallelism = 100000000", "must be at most 64, got 100000000"),
        ("api.parallelism = 65", "must be at most 64, got 65"),
        # Failed every account at its first request, as an internal error.
        ('api.ca_bundle = "/no/such/ca.pem"', "no such file or folder"),
        ('api.ca_bundle = "ca\\u0000.pem"', "no such file or folder"),
        ('archive.dir = "arch\\u0000ive"', "must not hold a NUL character"),
    ],
)
def test_a_setting_no_run_can_use_is_refused_naming_it(
    tmp_path: Path, setting: str, message: str
) -> None:
    # Each crashed a run, or the status command, long after loading.
    table, assignment = setting.split(".", 1)
    key = assignment.split(" = ")[0]
    text = (
        MINIMAL.replace("[api]", f"[api]\n{assignment}")
        if table == "api"
        else f"[{table}]\n{assignment}\n{MINIMAL}"
    )
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        config.load(path, {})

    assert str(raised.value).startswith(f"{path}: {table}.{key}: {message}")
    assert raised.value.exit_code == 2


# On SQLite a run's heartbeat waits for another writer as its pages do: with
# a busy timeout of 30 s and a lease of 2 s, a healthy run that waited 4 s
# was taken for dead by the next run, and stopped.
@pytest.mark.parametrize(
    ("settings", "environ", "taken"),
    [
        (
            "[database]\nbusy_timeout = 30\n[locks]\nlease = 2\n",
            {},
            "30 s, must be at most 1 s, half of locks.lease (2 s), with SQLite"
            " (database.url)",
        ),
        (
            "[database]\nbusy_timeout = 31\n",
            {},
            "31 s, must be at most 30 s, half of locks.lease (60 s), with SQLite"
            " (database.url)",
        ),
        (
            '[database]\nurl = "postgresql+psycopg://127.0.0.1/etl"\n'
            '[locks]\nlease = "10s"\n',
            {DATABASE_ENV: "sqlite:///etl.db"},
            f"30 s, must be at most 5 s, half of locks.lease (10 s), with SQLite"
            f" ({DATABASE_ENV})",
        ),
        ("[database]\nbusy_timeout = 30\n", {}, 30.0),
        ("[database]\nbusy_timeout = 1\n[locks]\nlease = 2\n", {}, 1.0),
        (
            '[database]\nurl = "postgresql+psycopg://127.0.0.1/etl"\n'
            "busy_timeout = 30\n[locks]\nlease = 2\n",
            {},
            30.0,
        ),
    ],
)
def test_on_sqlite_the_busy_timeout_is_at_most_half_the_lease(
    tmp_path: Path, settings: str, environ: dict[str, str], taken: float | str
) -> None:
    path = write(tmp_path, settings + MINIMAL)

    if isinstance(taken, str):
        with pytest.raises(ConfigError) as raised:
            config.load(path, environ)
        assert str(raised.value) == (
            f"{path}: database.busy_timeout: {taken}: a run waiting longer for"
            " another writer could not renew its heartbeat, and the next run would"
            " take it for dead"
        )
    else:
        assert config.load(path, environ).database.busy_timeout == taken


def test_number_settings_at_the_ends_of_their_ranges_are_taken(
    tmp_path: Path,
) -> None:
    text = MINIMAL.replace(
        "[api]",
        "[database]\nbusy_timeout = 86400\n[api]\nread_timeout = 86400\n"
        "connect_timeout = 0.001\nrequests_per_second = 0.001\n",
    ).replace("[[accounts]]", '[locks]\nlease = "2d"\n[[accounts]]', 1)

    loaded = config.load(write(tmp_path, text), {})
    fastest = config.load(
        write(tmp_path, MINIMAL.replace("[api]", "[api]\nrequests_per_second = 1e5")),
        {},
    )

    assert loaded.database.busy_timeout == 86400.0
    assert (loaded.api.read_timeout, loaded.api.connect_timeout) == (86400.0, 0.001)
    assert loaded.api.requests_per_second == 0.001
    assert fastest.api.requests_per_second == 100_000.0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            "[api]\n".encode("utf-16"),
            "starts with a UTF-16 byte-order mark: TOML files are UTF-8",
        ),
        (
            b"\xff\xfe\xff",
            "starts with a UTF-16 byte-order mark: TOML files are UTF-8",
        ),
        (
            '[api]\nbase_url = "http://h\u00e9"\n'.encode("latin-1"),
            "not UTF-8 text: byte 0xe9 at line 2 (TOML files are UTF-8)",
        ),
    ],
    ids=["utf-16", "utf-16-mark-then-garbage", "latin-1"],
)
def test_a_file_that_is_not_utf8_is_named_in_one_line(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "task-etl.toml"
    path.write_bytes(data)

    with pytest.raises(ConfigError) as raised:
        config.load(path, {})

    assert str(raised.value) == f"{path}: {message}"
    assert raised.value.exit_code == 2


def test_a_utf8_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    # Windows editors write one; TOML's parser called it an invalid statement.
    path = tmp_path / "task-etl.toml"
    path.write_bytes(MINIMAL.encode("utf-8-sig"))

    assert config.load(path, {}).api.base_url == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("http://127.0.0.1:99999", "the port must be a number from 1 to 65535"),
        ("http://127.0.0.1:0", "the port must be a number from 1 to 65535"),
        ("http://127.0.0.1:http", "the port must be a number from 1 to 65535"),
        ("http://[::1", "not a URL; expected https://HOST or https://HOST:PORT"),
        ("http://[::1]evil.com:9", "not a URL; expected https://HOST or"),
        ("http://:8800", "must name a host, as https://HOST or https://HOST:PORT"),
        ("http://etl:s3cret@127.0.0.1", "must not hold a user name or password"),
        ("http://127.0.0.1 :8800", "must not hold spaces or control characters"),
        ("http://127.0.0.1/agent-api", "without a path, query or fragment"),
        ("http://127.0.0.1?brand=x", "without a path, query or fragment"),
        ("http://127.0.0.1#top", "without a path, query or fragment"),
        # Empty, they are none to the URL parser; requests then went to "/".
        ("http://127.0.0.1:8800?", "without a path, query or fragment"),
        ("http://127.0.0.1:8800#", "without a path, query or fragment"),
        # Plain http to another machine sends the token unencrypted.
        ("http://ai.api.example.cn", "plain http:// would send the token"),
        ("http://10.0.0.5:8800", "plain http:// would send the token"),
        ("http://[2001:db8::1]", "plain http:// would send the token"),
        ("http://localhost.example.cn", "plain http:// would send the token"),
    ],
    ids=[
        "port-too-big",
        "port-zero",
        "port-not-a-number",
        "not-a-url",
        "text-after-brackets",
        "no-host",
        "credentials",
        "space",
        "path",
        "query",
        "fragment",
        "empty-query",
        "empty-fragment",
        "plain-http-name",
        "plain-http-address",
        "plain-http-ipv6",
        "plain-http-not-localhost",
    ],
)
def test_a_base_url_no_request_can_use_is_refused_at_load(
    tmp_path: Path, base_url: str, message: str
) -> None:
    # Each passed the check and then failed every account of every run.
    path = write(tmp_path, MINIMAL.replace("http://127.0.0.1:9", base_url))

    with pytest.raises(ConfigError) as raised:
        config.load(path, {})

    assert str(raised.value).startswith(f"{path}: api.base_url: ")
    assert message in str(raised.value)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(
    "base_url",
    [
        "https://ai.api.example.cn/",
        "http://127.0.0.1:65535",
        "http://127.8.0.1",
        "http://[::1]:1",
        "http://LocalHost:8800",
    ],
)
def test_a_base_url_of_scheme_host_and_port_is_taken(
    tmp_path: Path, base_url: str
) -> None:
    path = write(tmp_path, MINIMAL.replace("http://127.0.0.1:9", base_url))

    assert config.load(path, {}).api.base_url == base_url.rstrip("/")


def test_plain_http_to_another_machine_is_taken_when_meant(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'base_url = "http://127.0.0.1:9"',
        'base_url = "http://gateway.internal:8080"\nallow_plain_http = true',
    )

    loaded = config.load(write(tmp_path, text), {})

    assert loaded.api.base_url == "http://gateway.internal:8080"


def test_missing_file_says_how_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml", {})


def test_path_comes_from_option_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASK_ETL_CONFIG", "/env.toml")
    assert config.resolve_path("/opt.toml") == Path("/opt.toml")
    assert config.resolve_path(None) == Path("/env.toml")
    monkeypatch.delenv("TASK_ETL_CONFIG")
    assert config.resolve_path(None) == Path("task-etl.toml")


def test_archive_is_off_without_its_table(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, MINIMAL), {}).archive is None


def test_archive_table_needs_only_its_directory(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, MINIMAL + '[archive]\ndir = "raw"\n'), {})

    assert loaded.archive == config.ArchiveConfig(
        dir="raw", compression_level=6, fsync=True
    )


def test_example_archive_table_shows_every_default(tmp_path: Path) -> None:
    # The table is commented out in the example, as the archive is optional.
    lines = (ROOT / "config.example.toml").read_text(encoding="utf-8").splitlines()
    start = lines.index("# [archive]")
    end = lines.index("", start)
    settings = "\n".join(
        line.removeprefix("# ")
        for line in lines[start:end]
        if re.fullmatch(r"# (\[archive\]|\w+ = .+)", line)
    )

    loaded = config.load(write(tmp_path, MINIMAL + settings + "\n"), {})

    assert loaded.archive == config.ArchiveConfig(dir="task-etl-archive")
    keys = {line.split(" = ")[0] for line in settings.splitlines()[1:]}
    assert keys == set(config.ArchiveConfig.__dataclass_fields__)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[archive]\n", "archive.dir: required key is missing"),
        ('[archive]\ndir = " "\n', "archive.dir: must not be empty"),
        ("[archive]\ndir = 5\n", "archive.dir: expected a string, got an integer"),
        (
            '[archive]\ndir = "a"\ncompression_level = 0\n',
            "archive.compression_level: must be at least 1",
        ),
        (
            '[archive]\ndir = "a"\ncompression_level = 10\n',
            "archive.compression_level: must be at most 9",
        ),
        (
            '[archive]\ndir = "a"\nfsync = "no"\n',
            "archive.fsync: expected true or false, got a string",
        ),
        ('[archive]\ndir = "a"\nkeep_days = 3\n', "archive.keep_days: unknown key"),
        ('archive = "raw"\n', "archive: expected a table, got a string"),
    ],
    ids=[
        "no-dir",
        "empty-dir",
        "dir-not-text",
        "level-too-low",
        "level-too-high",
        "fsync-not-bool",
        "unknown-key",
        "not-a-table",
    ],
)
def test_bad_archive_tables_name_the_key_and_the_file(
    tmp_path: Path, table: str, message: str
) -> None:
    # Top-level keys must come before the first table in TOML.
    text = table + MINIMAL if not table.startswith("[") else MINIMAL + table
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as raised:
        config.load(path, {})

    assert str(raised.value).startswith(f"{path}: {message}")


def test_example_schedule_and_locks_are_the_defaults() -> None:
    loaded = config.load(ROOT / "config.example.toml", {"TASK_ETL_TOKEN": "t"})

    assert loaded.schedule == config.ScheduleConfig()
    assert loaded.locks == config.LocksConfig()


def test_schedule_and_locks_have_defaults_without_their_tables(tmp_path: Path) -> None:
    loaded = config.load(write(tmp_path, MINIMAL), {})

    assert (loaded.schedule.interval, loaded.schedule.cron) == (300.0, None)
    assert (loaded.schedule.deadline, loaded.schedule.timezone) == (1800.0, "UTC")
    assert (loaded.locks.wait, loaded.locks.lease) == (0.0, 60.0)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("90s", 90), ("5m", 300), ("1h", 3600), ("1d", 86400), ("2 H", 7200)]
    + [(90, 90), (1.5, 1.5), ("45", 45), ("0.5m", 30)],
    ids=["s", "m", "h", "d", "space-upper", "int", "float", "digits", "fraction"],
)
def test_durations_take_a_unit_or_plain_seconds(value: object, seconds: float) -> None:
    assert config.parse_duration(value) == seconds


def test_a_cron_schedule_replaces_the_interval(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "[api]", '[schedule]\ncron = "30 2 * * *"\ntimezone = "Europe/Berlin"\n[api]'
    )

    loaded = config.load(write(tmp_path, text), {})

    assert loaded.schedule.interval is None
    assert loaded.schedule.cron == "30 2 * * *"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[schedule]\ninterval = "5m"\ncron = "* * * * *"\n',
            "schedule.cron: give schedule.interval or schedule.cron, not both",
        ),
        ('[schedule]\ncron = "* * *"\n', "schedule.cron: not a crontab expression"),
        ('[schedule]\ncron = "0 0 * * 9"\n', "schedule.cron: not a crontab"),
        ('[schedule]\ncron = "0 25 * * *"\n', "schedule.cron: not a crontab"),
        ('[schedule]\ninterval = "5 minutes"\n', "schedule.interval: expected a"),
        ("[schedule]\ninterval = 0\n", "schedule.interval: must be greater than 0"),
        ("[schedule]\njitter = -1\n", "schedule.jitter: a duration cannot be -1"),
        (
            '[schedule]\ninterval = "99999999999999d"\n',
            "schedule.interval: a duration can be at most 365d",
        ),
        ('[schedule]\ndeadline = "0s"\n', "schedule.deadline: must be greater"),
        ("[schedule]\ninterval = true\n", "schedule.interval: expected a duration"),
        ('[schedule]\ntimezone = "Mars/Base"\n', "schedule.timezone: unknown time"),
        ('[schedule]\nrun_at_start = "yes"\n', "schedule.run_at_start: expected true"),
        ("[schedule]\nevery = 5\n", "schedule.every: unknown key"),
        ("[locks]\nlease = 0.5\n", "locks.lease: must be at least 1 second"),
        ('[locks]\nwait = "soon"\n', "locks.wait: expected a duration"),
        ("[locks]\nretries = 3\n", "locks.retries: unknown key"),
    ],
    ids=[
        "interval-and-cron",
        "cron-three-fields",
        "cron-weekday-9",
        "cron-hour-25",
        "interval-words",
        "interval-zero",
        "jitter-negative",
        "interval-past-a-year",
        "deadline-zero",
        "interval-bool",
        "bad-zone",
        "run-at-start-text",
        "unknown-schedule-key",
        "lease-too-short",
        "wait-words",
        "unknown-locks-key",
    ],
)
def test_bad_schedule_and_locks_name_the_key_and_the_file(
    tmp_path: Path, table: str, message: str
) -> None:
    path = write(tmp_path, MINIMAL + table)

    with pytest.raises(ConfigError) as raised:
        config.load(path, {})

    assert str(raised.value).startswith(f"{path}: {message}")


def test_connecting_checks_the_url_and_never_quotes_it() -> None:
    database = config.DatabaseConfig(url="postgresql://etl:p@ss:s3cret@db/tasks")

    with pytest.raises(StoreError) as raised:
        store.connect(database)

    assert str(raised.value).startswith("database.url: not a database URL")
    assert "s3cret" not in str(raised.value)


def test_a_database_driver_that_is_missing_names_where_the_url_came_from(
    tmp_path: Path,
) -> None:
    url = "postgresql+nosuchdriver://etl:s3cret@db/tasks"
    with pytest.raises(ConfigError) as refused:
        config.load(write(tmp_path, MINIMAL), {"TASK_ETL_DATABASE_URL": url})
    # A configuration built by other code meets the same check on connecting.
    database = config.DatabaseConfig(url=url, source="TASK_ETL_DATABASE_URL")
    with pytest.raises(StoreError) as raised:
        store.connect(database)

    for error in (refused.value, raised.value):
        assert str(error) == (
            "TASK_ETL_DATABASE_URL: postgresql+nosuchdriver:// is not supported; "
            "use sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"
        )
