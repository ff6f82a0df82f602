from pathlib import Path

import pytest

from etl import config
from etl.errors import ConfigError

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
    environ = {"TASK_ETL_TOKEN": "env-token", "TASK_ETL_DATABASE_URL": "sqlite://"}

    loaded = config.load(write(tmp_path, MINIMAL), environ)

    assert loaded.api.token == "env-token"
    assert loaded.database.url == "sqlite://"


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
        (MINIMAL.replace('token = "file-token"', ""), "accounts[0].token: no token"),
        (
            MINIMAL + '[api.endpoints]\ntask_list = "/tasks"\n',
            "api.endpoints.task_list: must start with / and contain {user_id}",
        ),
        (MINIMAL + "[surprise]\n", "surprise: unknown key"),
        ("[api\n", "cannot read"),
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
        "no-token",
        "bad-endpoint",
        "unknown-table",
        "not-toml",
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
