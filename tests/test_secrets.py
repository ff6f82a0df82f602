"""No token and no callback URL ever leaves the process, and TLS is verified.

Everything is captured at DEBUG level from every logger (urllib3 and
SQLAlchemy's statement log included) across successful and failing syncs,
together with every table and the output of `task-etl sync` and `status`,
and searched for the secrets. Only loopback traffic: the HTTPS server uses a
certificate made at test time with the openssl command.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from click.testing import CliRunner
from scripted import CALLBACK, TOKEN, Platform, Reply, envelope, serve, task, tasks
from sqlalchemy import Engine, select

from etl.accounts import Account
from etl.cli import main, setup_logging
from etl.client import MESSAGE_LIMIT, Client, RateLimiter
from etl.config import ApiConfig, Config, DatabaseConfig, MainAccount
from etl.errors import FatalApiError, bare_traceback
from etl.faults import Faults
from etl.models import metadata
from etl.simulator import Simulator
from etl.sync import RunSummary, run_sync

pytestmark = pytest.mark.timeout(60)

SIM_TOKEN = "sim-5ecret-token-abcdef"
OWN_TOKEN = "own-5ecret-token-987654"
WRONG_TOKEN = "wrong-5ecret-token-1122"
ALL_LOGGERS = ("", "etl", "urllib3", "sqlalchemy", "sqlalchemy.engine", "alembic")


class Capture(logging.Handler):
    """Every record of every logger, formatted with its arguments and trace."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    loggers = {name: logging.getLogger(name) for name in ALL_LOGGERS}
    loggers.update(
        (name, logging.getLogger(name))
        for name in list(logging.root.manager.loggerDict)
    )
    levels = {name: logger.level for name, logger in loggers.items()}
    for logger in loggers.values():
        logger.setLevel(logging.DEBUG)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    for name, level in levels.items():
        loggers[name].setLevel(level)


def dump_tables(engine: Engine) -> str:
    lines = []
    with engine.connect() as connection:
        for table in metadata.sorted_tables:
            for row in connection.execute(select(table)):
                lines.append(f"{table.name}: {tuple(row)!r}")
    return "\n".join(lines)


def callback_urls(simulator: Simulator) -> list[str]:
    return [
        json.loads(task.static_json)["call_notify_url"] for task in simulator.tasks()
    ]


def secrets_in(text: str, secrets: list[str]) -> list[str]:
    found = []
    for secret in secrets:
        # The URL, its private host and its key must each stay out, and so
        # must each in the forms another URL or a header gives it.
        parts = [secret]
        if "://" in secret:
            parts += [secret.split("/")[2].split(":")[0], secret.split("key=")[-1]]
        for part in list(parts):
            parts += [quote(part, safe=""), encoded(part)]
        found += [part for part in parts if part in text]
    return found


def encoded(secret: str) -> str:
    """The secret in base64, as an Authorization header carries it."""
    return base64.b64encode(secret.encode()).decode().rstrip("=")


# The token and the callback URL as a platform's message may echo them.
ECHOED = [
    TOKEN.upper(),
    quote(TOKEN, safe="").lower(),
    quote(quote(TOKEN, safe=""), safe=""),
    TOKEN.encode().hex(),
    encoded(TOKEN),
    base64.b64encode(f"Bearer {TOKEN}".encode()).decode(),
    base64.b64encode(f"user:{TOKEN}".encode()).decode(),
    quote(CALLBACK, safe=""),
    quote(quote(CALLBACK, safe=""), safe=""),
    CALLBACK.replace("/", "%2F"),
    CALLBACK.replace(":", "\uff1a", 1),
    CALLBACK.replace("://", ":// "),
]


def sim_config(url: str, simulator: Simulator, **api: Any) -> Config:
    first, second = simulator.main_user_ids()
    return Config(
        database=DatabaseConfig(url="unused://"),
        api=ApiConfig(
            base_url=url,
            token=SIM_TOKEN,
            page_size=5,
            max_retries=1,
            read_timeout=0.3,
            requests_per_second=10_000.0,
            **api,
        ),
        accounts=(
            MainAccount(user_id=first, token=OWN_TOKEN, discover_sub_accounts=True),
            MainAccount(user_id=second, discover_sub_accounts=True),
        ),
    )


def quick_sync(config: Config, engine: Engine) -> RunSummary:
    tokens = {a.user_id: a.token for a in config.accounts if a.token}
    client = Client(config.api, tokens, sleep=lambda _: None, limiter=RateLimiter(1e4))
    with client:
        return run_sync(config, engine=engine, client=client)


def test_no_secret_reaches_logs_errors_or_tables(
    engine: Engine, captured: Capture
) -> None:
    first = Simulator(seed=8, main_accounts=2, sub_accounts=1).main_user_ids()[0]
    simulator = Simulator(
        seed=8,
        main_accounts=2,
        sub_accounts=1,
        token=SIM_TOKEN,
        tokens={first: OWN_TOKEN},
        odd_statuses=True,
    )
    summaries = []
    with simulator.serve() as server, serve() as platform:
        config = sim_config(server.url, simulator)
        summaries.append(quick_sync(config, engine))
        simulator.advance(6 * 3600)
        # Every fault kind, the refused token among them.
        simulator.set_faults(
            Faults(
                throttle=0.1,
                server_error=0.2,
                reset=0.1,
                truncated=0.1,
                bad_code=0.2,
                unauthorized=0.1,
                stall=0.05,
                seed=3,
                retry_after=0,
                stall_seconds=0.6,
            )
        )
        for _ in range(3):
            summaries.append(quick_sync(config, engine))
        simulator.set_faults(Faults())
        wrong = Config(
            database=config.database,
            api=config.api,
            accounts=(MainAccount(user_id=first, token=WRONG_TOKEN),),
        )
        summaries.append(quick_sync(wrong, engine))
        summaries += sync_echoing_platform(platform, engine)

    secrets = [SIM_TOKEN, OWN_TOKEN, WRONG_TOKEN, TOKEN, CALLBACK, *ECHOED]
    secrets += callback_urls(simulator)
    outcomes = {summary.outcome for summary in summaries}
    assert {"succeeded", "partial", "failed"} <= outcomes
    errors = "\n".join(error for summary in summaries for error in summary.errors)
    assert "refused the token" in errors
    logs = "\n".join(captured.lines)
    assert "SELECT" in logs and "127.0.0.1" in logs  # SQL and urllib3 were heard
    assert secrets_in(logs, secrets) == []
    assert secrets_in(errors, secrets) == []
    assert secrets_in(dump_tables(engine), secrets) == []


def sync_echoing_platform(platform: Platform, engine: Engine) -> list[RunSummary]:
    """A platform that echoes the token and callback URLs in its errors, and
    lists items the sync must reject, callback URL and all."""
    echo = f"invalid token {TOKEN} for {CALLBACK}; {'; '.join(ECHOED)}".encode()
    platform.script("e1", Reply(401, b'{"code":401,"message":"%s"}' % echo))
    platform.script("e2", Reply(500, b"<html>%s</html>" % echo))
    platform.script("e3", Reply(body=envelope([], code=10001, message=echo.decode())))
    no_uuid = task(1, uuid=None)
    platform.serve_pages("e4", envelope([no_uuid, *tasks(2, 3)]))
    config = Config(
        database=DatabaseConfig(url="unused://"),
        api=ApiConfig(base_url=platform.url, token=TOKEN, max_retries=1),
        accounts=tuple(MainAccount(user_id=f"e{n}") for n in range(1, 5)),
    )
    summary = quick_sync(config, engine)
    assert (summary.outcome, summary.accounts_failed) == ("partial", 3)
    assert summary.counts.rejected == 1
    return [summary]


def test_a_token_where_a_long_message_is_cut_is_hidden_whole(
    engine: Engine,
) -> None:
    # Only the start of a message is looked through, up to where it is cut
    # before hiding shortens it: a token the cut goes through must still be
    # hidden whole.
    cut = 2 * MESSAGE_LIMIT
    message = TOKEN * (cut // len(TOKEN) - 1)
    message += "y" * (cut - len(TOKEN) // 2 - len(message)) + TOKEN + "z" * 1000
    with serve() as platform:
        platform.script("u1", Reply(401, json.dumps({"message": message}).encode()))
        config = Config(
            database=DatabaseConfig(url="unused://"),
            api=ApiConfig(base_url=platform.url, token=TOKEN, max_retries=0),
            accounts=(MainAccount(user_id="u1"),),
        )
        (error,) = quick_sync(config, engine).errors

    assert "y***" in error
    assert TOKEN[: len(TOKEN) // 2] not in error


def test_cli_sync_and_status_show_no_secret(tmp_path: Path, sqlite_url: str) -> None:
    simulator = Simulator(seed=8, main_accounts=2, sub_accounts=1, token=SIM_TOKEN)
    first, second = simulator.main_user_ids()
    with simulator.serve() as server:
        path = tmp_path / "task-etl.toml"
        path.write_text(
            f'[database]\nurl = "{sqlite_url}"\n'
            f'[api]\nbase_url = "{server.url}"\nmax_retries = 0\n'
            f'[[accounts]]\nuser_id = "{first}"\ntoken = "{WRONG_TOKEN}"\n'
            f'[[accounts]]\nuser_id = "{second}"\ndiscover_sub_accounts = true\n',
            encoding="utf-8",
        )
        runner = CliRunner()
        env = {"TASK_ETL_TOKEN": SIM_TOKEN}
        results = [
            runner.invoke(main, ["--config", str(path), *args], env=env)
            for args in (["migrate"], ["-vv", "sync"], ["-vv", "status"])
        ]

    assert [result.exit_code for result in results] == [0, 3, 0]
    output = "\n".join(result.output for result in results)
    assert "refused the token" in output
    secrets = [SIM_TOKEN, WRONG_TOKEN, *callback_urls(simulator)]
    assert secrets_in(output, secrets) == []


# -- TLS -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture
def https(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Platform]:
    # requests would trust a bundle named in the environment instead.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with serve(tls=context) as platform:
        platform.serve_pages("u1", envelope(tasks(1, 3)))
        yield platform


def https_config(url: str, ca_bundle: str | None) -> Config:
    return Config(
        database=DatabaseConfig(url="unused://"),
        api=ApiConfig(base_url=url, token=TOKEN, ca_bundle=ca_bundle, max_retries=0),
        accounts=(MainAccount(user_id="u1"),),
    )


def test_tls_is_verified_by_default(https: Platform, engine: Engine) -> None:
    summary = quick_sync(https_config(https.url, None), engine)

    assert summary.outcome == "failed"
    (error,) = summary.errors
    assert "TLS failed" in error and "api.ca_bundle" in error
    assert https.asked == []


def test_tls_trusts_the_configured_ca_bundle(
    https: Platform, engine: Engine, certificate: tuple[Path, Path]
) -> None:
    summary = quick_sync(https_config(https.url, str(certificate[0])), engine)

    assert summary.outcome == "succeeded"
    assert summary.counts.new == 3
    assert https.asked[0].authorization == f"Bearer {TOKEN}"


def test_tls_trusts_the_ca_bundle_the_environment_names(
    https: Platform,
    engine: Engine,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))

    summary = quick_sync(https_config(https.url, None), engine)

    assert summary.outcome == "succeeded"
    assert summary.counts.new == 3


def test_a_ca_bundle_from_the_environment_that_does_not_trust_is_named(
    https: Platform, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It said "check api.ca_bundle", which was not set.
    # requests' own bundle, which knows no self-signed certificate.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())

    summary = quick_sync(https_config(https.url, None), engine)

    (error,) = summary.errors
    assert error.endswith(
        "TLS failed (SSLError); check the CA bundle that REQUESTS_CA_BUNDLE or"
        " CURL_CA_BUNDLE names"
    )


def test_a_ca_bundle_gone_since_loading_fails_the_account_naming_it(
    https: Platform, engine: Engine, tmp_path: Path
) -> None:
    # It failed the account as an internal error, with a traceback.
    gone = tmp_path / "gone.pem"

    summary = quick_sync(https_config(https.url, str(gone)), engine)

    assert summary.outcome == "failed"
    (error,) = summary.errors
    assert error.endswith("could not be sent (OSError); check api.ca_bundle")
    assert "internal error" not in error
    assert https.asked == []


def test_a_ca_bundle_the_environment_names_but_is_gone_is_named(
    https: Platform, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "gone.pem"))

    summary = quick_sync(https_config(https.url, None), engine)

    (error,) = summary.errors
    assert error.endswith(
        "could not be sent (OSError); check the CA bundle that "
        "REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE names"
    )
    assert https.asked == []


# -- the allow-list --------------------------------------------------------------


def test_a_sync_calls_only_the_allow_listed_read_endpoints(engine: Engine) -> None:
    first = Simulator(seed=8, main_accounts=2, sub_accounts=2).main_user_ids()[0]
    simulator = Simulator(
        seed=8,
        main_accounts=2,
        sub_accounts=2,
        token=SIM_TOKEN,
        tokens={first: OWN_TOKEN},
        record_requests=True,
    )
    with simulator.serve() as server:
        summary = quick_sync(sim_config(server.url, simulator), engine)
        served = simulator.take_served()
        client = Client(sim_config(server.url, simulator).api)
        with client, pytest.raises(FatalApiError, match="not an allow-listed"):
            user_id = simulator.main_user_ids()[0]
            client.get_envelope(
                "/agent-api/user/{user_id}/task_stop/1", Account(user_id), {}, page=None
            )
        requests = server.requests

    assert summary.outcome == "succeeded"
    # Every request the server saw was one of the two configured lists.
    assert requests == len(served)
    assert {s.endpoint for s in served} == {"task", "subset_users"}
    assert {s.user_id for s in served} == set(simulator.main_user_ids())


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = {name: logging.getLogger(name).level for name in ("socks", "urllib3")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, saved in loggers.items():
        logging.getLogger(name).setLevel(saved)


@pytest.mark.usefixtures("restored_logging")
def test_verbose_logs_leave_out_the_libraries_that_log_a_proxys_address() -> None:
    # PySocks logs "Error connecting to SOCKS5 proxy host:port" at DEBUG,
    # and urllib3 each new connection's host.
    setup_logging(verbose=2, quiet=False)

    assert logging.getLogger().isEnabledFor(logging.DEBUG)
    for name in ("socks", "urllib3"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name


def test_an_unexpected_error_is_logged_with_its_stack_and_not_its_text() -> None:
    # A bug's exception can quote what it was working on. The walkers, the
    # sub-account lists and the daemon log such an error with its stack; its
    # text went along, and with it a callback URL here.
    def read_callback(item: dict[str, Any]) -> None:
        raise TypeError(f"cannot read {item['call_notify_url']}")

    try:
        read_callback(task(1))
    except TypeError as exc:
        logged = bare_traceback(exc)

    assert CALLBACK not in logged
    assert logged.startswith("Traceback (most recent call last):\n")
    assert ", in read_callback\n" in logged
    assert logged.endswith("\nTypeError (its text left out)")
