"""Reading the TOML configuration into frozen dataclasses.

The file is found by `--config`, else `TASK_ETL_CONFIG`, else
`./task-etl.toml`. Every key is checked: an unknown key, a wrong type or a
missing required key stops with a `ConfigError` naming the key and the file.
Tokens may come from the environment so that they stay out of the file.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from etl.accounts import ID_LENGTH
from etl.errors import ConfigError

DEFAULT_PATH = "task-etl.toml"
PATH_ENV = "TASK_ETL_CONFIG"
TOKEN_ENV = "TASK_ETL_TOKEN"
DATABASE_ENV = "TASK_ETL_DATABASE_URL"

T = TypeVar("T")

LONGEST_DURATION = 365 * 86400
# The longest timeout, backoff or wait of a single request or lock: past a
# day it is a typo, and past some size it overflows a clock sum.
LONGEST_WAIT = 86400.0
# Accounts walked at once: each has its own connection, made up front by
# the HTTP pool; a hundred million took the process's memory and time.
MOST_PARALLEL = 64
# A faster rate is a typo; a slower one spaces requests past LONGEST_WAIT.
REQUEST_RATES = (0.001, 100_000.0)

# A host, or an address in brackets, and perhaps a port: all a base URL's
# network location may hold.
_HOST_AND_PORT = re.compile(r"(?:\[[^\[\]]*\]|[^\[\]:@]+)(?::[0-9]*)?")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdSMHD]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Endpoints:
    """Paths of the read endpoints; `{user_id}` is the main account."""

    task_list: str = "/agent-api/user/{user_id}/task"
    sub_account_list: str = "/agent-api/user/{user_id}/subset_users"

    def allowed(self) -> tuple[str, ...]:
        return (self.task_list, self.sub_account_list)


@dataclass(frozen=True)
class ApiConfig:
    base_url: str
    token: str = field(repr=False)
    timezone: str = "Asia/Shanghai"
    page_size: int = 100
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_retries: int = 5
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    requests_per_second: float = 10.0
    parallelism: int = 4
    max_pages: int = 10_000
    ca_bundle: str | None = None
    endpoints: Endpoints = Endpoints()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True)
class MainAccount:
    """A main account and how to find its sub-accounts."""

    user_id: str
    name: str = ""
    token: str = field(default="", repr=False)
    sync_own_tasks: bool = True
    sub_accounts: tuple[str, ...] = ()
    discover_sub_accounts: bool = False


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///task-etl.db"
    busy_timeout: float = 30.0
    # Where the URL came from, to name in errors: the file or the environment.
    source: str = "database.url"


@dataclass(frozen=True)
class ScheduleConfig:
    """When the daemon runs: every `interval` seconds, or at `cron` times."""

    interval: float | None = 300.0
    cron: str | None = None
    timezone: str = "UTC"
    jitter: float = 0.0
    run_at_start: bool = True
    deadline: float = 1800.0
    misfire_grace: float = 86400.0


@dataclass(frozen=True)
class LocksConfig:
    """One writer per account: how long to wait for one, how long a lease lasts."""

    wait: float = 0.0
    lease: float = 60.0


@dataclass(frozen=True)
class ArchiveConfig:
    """Where every fetched task page is kept as received, for replay."""

    dir: str
    compression_level: int = 6
    fsync: bool = True


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig
    api: ApiConfig
    accounts: tuple[MainAccount, ...]
    path: str = ""
    schedule: ScheduleConfig = ScheduleConfig()
    locks: LocksConfig = LocksConfig()
    archive: ArchiveConfig | None = None

    def token_for(self, user_id: str) -> str:
        """The token of a main account: its own if it has one, else the shared."""
        for account in self.accounts:
            if account.user_id == user_id and account.token:
                return account.token
        return self.api.token


def resolve_path(option: str | None) -> Path:
    """The config path: the option, else the environment, else the default."""
    return Path(option or os.environ.get(PATH_ENV) or DEFAULT_PATH)


def load(
    path: str | Path,
    environ: Mapping[str, str] | None = None,
    *,
    tokens: bool = True,
) -> Config:
    """Read and validate the file; raise `ConfigError` on any problem.

    With `tokens` false the platform's tokens are neither required nor read:
    commands that only read the database run on hosts without the secret.
    """
    environ = os.environ if environ is None else environ
    path = Path(path)
    try:
        document = tomllib.loads(_text(path.read_bytes(), str(path)))
    except FileNotFoundError:
        raise ConfigError(
            "file not found (give --config or set TASK_ETL_CONFIG)", path=str(path)
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", path=str(path)) from None
    return parse(document, str(path), environ, tokens=tokens)


def _text(data: bytes, path: str) -> str:
    """The file as text: TOML is UTF-8. A UTF-8 byte-order mark, which
    Windows editors write, is skipped; TOML's parser called it an invalid
    statement at line 1."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(
            "starts with a UTF-16 byte-order mark: TOML files are UTF-8",
            path=path,
        )
    try:
        return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line} "
            "(TOML files are UTF-8)",
            path=path,
        ) from None


def parse(
    document: Mapping[str, Any],
    path: str,
    environ: Mapping[str, str],
    *,
    tokens: bool = True,
) -> Config:
    """Build a `Config` from an already decoded TOML document."""
    reader = _Reader(document, path, "")
    reader.check_keys({"database", "api", "accounts", "schedule", "locks", "archive"})

    database = _read_database(reader.table("database"), environ)
    api = _read_api(reader.table("api"), environ, tokens)
    accounts = tuple(
        _read_account(item, environ, tokens) for item in reader.tables("accounts")
    )
    if not accounts:
        raise ConfigError(
            "at least one [[accounts]] entry is required", key="accounts", path=path
        )
    _check_one_entry_each(accounts, path)
    if tokens:
        _check_tokens(api, accounts, path)
    locks = _read_locks(reader.table("locks"))
    _check_busy_timeout(database, locks, path)
    return Config(
        database=database,
        api=api,
        accounts=accounts,
        path=path,
        schedule=_read_schedule(reader.table("schedule")),
        locks=locks,
        archive=_read_archive(reader.table("archive"), "archive" in document),
    )


def _check_busy_timeout(
    database: DatabaseConfig, locks: LocksConfig, path: str
) -> None:
    """On SQLite a run's heartbeat waits for another writer as its pages do.
    A wait longer than the lease less the third of it between two beats has
    the next run take a healthy run for dead, and the run then stops."""
    if database.url.startswith("sqlite") and database.busy_timeout > locks.lease / 2:
        raise ConfigError(
            f"{database.busy_timeout:g} s, must be at most {locks.lease / 2:g} s,"
            f" half of locks.lease ({locks.lease:g} s), with SQLite"
            f" ({database.source}): a run waiting longer for another writer could"
            " not renew its heartbeat, and the next run would take it for dead",
            key="database.busy_timeout",
            path=path,
        )


def _read_archive(reader: _Reader, is_present: bool) -> ArchiveConfig | None:
    if not is_present:
        return None
    reader.check_keys({"dir", "compression_level", "fsync"})
    directory = reader.require("dir", str).strip()
    if not directory:
        reader.fail("dir", "must not be empty")
    if "\x00" in directory:
        reader.fail("dir", "must not hold a NUL character")
    d = ArchiveConfig(dir=directory)
    level = reader.count("compression_level", d.compression_level)
    if level > 9:
        reader.fail("compression_level", "must be at most 9")
    return ArchiveConfig(
        dir=directory,
        compression_level=level,
        fsync=reader.get("fsync", bool, d.fsync),
    )


def _read_database(reader: _Reader, environ: Mapping[str, str]) -> DatabaseConfig:
    reader.check_keys({"url", "busy_timeout"})
    default = DatabaseConfig()
    if environ.get(DATABASE_ENV):
        url, source = environ[DATABASE_ENV], DATABASE_ENV
    else:
        url, source = reader.get("url", str, default.url), default.source
    problem = database_url_problem(url, in_memory=False)
    if problem and source == DATABASE_ENV:
        raise ConfigError(problem, key=DATABASE_ENV)
    if problem:
        reader.fail("url", problem)
    return DatabaseConfig(
        url=url,
        busy_timeout=reader.seconds("busy_timeout", default.busy_timeout),
        source=source,
    )


def database_url_problem(url: str, *, in_memory: bool = True) -> str | None:
    """Why `url` cannot name a database of ours; None when it can. An
    in-memory SQLite database, gone when the process ends, passes only if
    `in_memory`.

    Never quotes the URL, nor the parser's message, which quotes the part
    it could not read: a password holding an @ or a colon is read as host
    and port, and the message quoted the password.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return f"not a database URL; expected {_URL_FORMS}"
    if "\x00" in unquote(url):
        # No file name, host or user name holds one: it would end the C
        # string libpq reads, and SQLite's module refused it only on connecting.
        return "holds a NUL character (%00), which no part of a database URL can"
    backend = SUPPORTED_SCHEMES.get(parsed.drivername)
    if backend is None:
        # Another database; or another driver, which loads and then fails
        # at the first query or two.
        return f"{parsed.drivername}:// is not supported; use {_URL_FORMS}"
    if backend == "postgresql":
        return _postgresql_url_problem(url, parsed)
    server = (parsed.username, parsed.password, parsed.host, parsed.port)
    if any(part is not None for part in server):
        return "a SQLite URL names a file, not a server; expected sqlite:///PATH"
    if "uri" in parsed.query:
        # A URI filename names the file differently for each command.
        return "SQLite URI filenames are not supported; expected sqlite:///PATH"
    if not in_memory and parsed.database in (None, "", ":memory:"):
        return "an in-memory SQLite database ends with the command; use a file"
    return _sqlite_options_problem(parsed)


def _sqlite_options_problem(parsed: URL) -> str | None:
    # The driver reads the options of the query (?timeout=30) only when the
    # engine is made, and an unreadable one failed the command then, exit 1.
    # A SQLite URL holds no password, so the driver's message may be quoted.
    repeated = sorted(k for k, v in parsed.query.items() if isinstance(v, tuple))
    if repeated:
        return f"the option {repeated[0]} is given more than once"
    try:
        with warnings.catch_warnings():
            # Options it does not know, it warns about again on connecting.
            warnings.simplefilter("ignore")
            _, options = parsed.get_dialect()().create_connect_args(parsed)
    except (ValueError, TypeError) as exc:
        return f"an option of the URL cannot be read: {exc}"
    timeout = options.get("timeout", 0.0)
    if not 0 <= timeout <= LONGEST_WAIT:
        return f"?timeout= must be from 0 to {LONGEST_WAIT:g} s (a day), got {timeout}"
    return None


def _postgresql_url_problem(url: str, parsed: URL) -> str | None:
    # Past an unescaped @ in a password, the parser reads the rest as host,
    # port or database, and a failed connection named that "host" (and had
    # it resolved). Written as %40, an @ never shows in the URL twice.
    if url.count("@") > 1 or (parsed.host and "@" in parsed.host):
        return "an @ in the user name or password must be written as %40"
    return _port_problem(parsed.port)


def _port_problem(port: int | None) -> str | None:
    if port is not None and not 0 < port < 65536:
        return "the port must be a number from 1 to 65535"
    return None


# The URL schemes of the one driver of each database that the store is
# written and tested for: the standard SQLite module and psycopg 3.
SUPPORTED_SCHEMES = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
    "postgresql": "postgresql",
    "postgresql+psycopg": "postgresql",
}
_URL_FORMS = "sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE"


def _read_api(reader: _Reader, environ: Mapping[str, str], tokens: bool) -> ApiConfig:
    reader.check_keys(
        {
            "base_url",
            "token",
            "timezone",
            "page_size",
            "connect_timeout",
            "read_timeout",
            "max_retries",
            "backoff_initial",
            "backoff_max",
            "retry_after_max",
            "requests_per_second",
            "parallelism",
            "max_pages",
            "ca_bundle",
            "endpoints",
            "allow_plain_http",
        }
    )
    base_url = reader.require("base_url", str).rstrip("/")
    problem = _base_url_problem(base_url) or _plain_http_problem(
        base_url, reader.get("allow_plain_http", bool, False)
    )
    if problem:
        reader.fail("base_url", problem)
    timezone = reader.get("timezone", str, "Asia/Shanghai")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        reader.fail("timezone", f"unknown time zone {timezone!r}")

    d = ApiConfig(base_url="", token="")
    return ApiConfig(
        base_url=base_url,
        token=_read_token(reader, "token", environ, TOKEN_ENV) if tokens else "",
        timezone=timezone,
        page_size=reader.count("page_size", d.page_size),
        connect_timeout=reader.seconds("connect_timeout", d.connect_timeout),
        read_timeout=reader.seconds("read_timeout", d.read_timeout),
        max_retries=reader.count("max_retries", d.max_retries, minimum=0),
        backoff_initial=reader.seconds("backoff_initial", d.backoff_initial),
        backoff_max=reader.seconds("backoff_max", d.backoff_max),
        retry_after_max=reader.seconds("retry_after_max", d.retry_after_max),
        requests_per_second=_read_rate(reader, d.requests_per_second),
        parallelism=reader.count("parallelism", d.parallelism, most=MOST_PARALLEL),
        max_pages=reader.count("max_pages", d.max_pages),
        ca_bundle=_read_ca_bundle(reader),
        endpoints=_read_endpoints(reader.table("endpoints")),
    )


def _read_ca_bundle(reader: _Reader) -> str | None:
    """A file or folder of CA certificates, checked now: a missing one
    failed every account at its first request as an internal error."""
    path: str | None = reader.get("ca_bundle", str, None)
    if path is None:
        return None
    if "\x00" in path or not os.path.exists(path):
        reader.fail("ca_bundle", "no such file or folder")
    return path


def _base_url_problem(url: str) -> str | None:
    """Why `url` cannot be the platform's base URL; None when it can.

    Found only by the first request, each of these failed every account of
    every run. The endpoints' paths are appended to the URL as it is, so a
    path would be doubled or a query cut the endpoint off.
    """
    if not url.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    if any(char.isspace() or not char.isprintable() for char in url):
        return "must not hold spaces or control characters"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "not a URL; expected https://HOST or https://HOST:PORT"
    try:
        port = parts.port
    except ValueError:  # not a number, or past 65535
        port = 0
    problem = _port_problem(port)
    if problem:
        return problem
    if not parts.hostname:
        return "must name a host, as https://HOST or https://HOST:PORT"
    if not _HOST_AND_PORT.fullmatch(parts.netloc.rpartition("@")[2]):
        # The parser takes the address in brackets and drops what follows
        # it ("[::1]evil.com"), which requests then refused for every page.
        return "not a URL; expected https://HOST or https://HOST:PORT"
    if parts.username is not None:
        return "must not hold a user name or password; the token authenticates"
    # An empty query or fragment ("https://HOST?") is none to urlsplit, but
    # the endpoint's path appended after it is no path at all.
    if parts.path or "?" in url or "#" in url:
        return (
            "must be https://HOST or https://HOST:PORT without a path, query or "
            "fragment (a path prefix goes in [api.endpoints])"
        )
    return None


def _plain_http_problem(url: str, allowed: bool) -> str | None:
    """Refuse plain http to another machine unless `allowed`: every request
    would carry the token unencrypted, and every answer the tasks' callback
    URLs. To this machine it never leaves it, as with the simulator."""
    parts = urlsplit(url)
    if parts.scheme != "http" or allowed or _is_loopback(parts.hostname or ""):
        return None
    return (
        "plain http:// would send the token unencrypted to another machine; use "
        "https://, or set allow_plain_http = true in [api] if that is meant"
    )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, not an address
        return False


def _read_rate(reader: _Reader, default: float) -> float:
    slowest, fastest = REQUEST_RATES
    rate = reader.positive("requests_per_second", default, most=fastest)
    if rate < slowest:
        reader.fail(
            "requests_per_second",
            f"must be at least {slowest:g} (a request every {1 / slowest:g} s), "
            f"got {rate:g}",
        )
    return rate


def _read_endpoints(reader: _Reader) -> Endpoints:
    reader.check_keys({"task_list", "sub_account_list"})
    d = Endpoints()
    endpoints = Endpoints(
        task_list=reader.get("task_list", str, d.task_list),
        sub_account_list=reader.get("sub_account_list", str, d.sub_account_list),
    )
    for key in ("task_list", "sub_account_list"):
        value = getattr(endpoints, key)
        if not value.startswith("/") or "{user_id}" not in value:
            reader.fail(key, "must start with / and contain {user_id}")
    return endpoints


def _read_account(
    reader: _Reader, environ: Mapping[str, str], tokens: bool
) -> MainAccount:
    reader.check_keys(
        {
            "user_id",
            "name",
            "token",
            "token_env",
            "sync_own_tasks",
            "sub_accounts",
            "discover_sub_accounts",
        }
    )
    user_id = reader.require("user_id", str).strip()
    if not user_id:
        reader.fail("user_id", "must not be empty")
    if user_id in (".", ".."):
        # It goes into the endpoint's path, where a dot segment would lead a
        # server to another path than the allow-listed one.
        reader.fail("user_id", f"{user_id!r} is not an account id")
    if len(user_id) > ID_LENGTH:
        # Found by the database only when the run records the account,
        # failing every account of the run on PostgreSQL.
        reader.fail("user_id", f"longer than {ID_LENGTH} characters")
    token_env = reader.get("token_env", str, None)
    if token_env and tokens and not environ.get(token_env, "").strip():
        # Falling back to the shared token would call with another account's
        # secret; an unset variable is a mistake to say, not to cover.
        reader.fail("token_env", f"the environment variable {token_env} is not set")
    token = _read_token(reader, "token", environ, token_env) if tokens else ""
    sub_accounts = reader.get("sub_accounts", list, [])
    if not all(isinstance(item, str) and item.strip() for item in sub_accounts):
        reader.fail("sub_accounts", "must be a list of non-empty strings")
    if any(len(item.strip()) > ID_LENGTH for item in sub_accounts):
        reader.fail("sub_accounts", f"an id is longer than {ID_LENGTH} characters")
    return MainAccount(
        user_id=user_id,
        name=reader.get("name", str, ""),
        token=token,
        sync_own_tasks=reader.get("sync_own_tasks", bool, True),
        sub_accounts=tuple(dict.fromkeys(item.strip() for item in sub_accounts)),
        discover_sub_accounts=reader.get("discover_sub_accounts", bool, False),
    )


def _read_schedule(reader: _Reader) -> ScheduleConfig:
    reader.check_keys(
        {
            "interval",
            "cron",
            "timezone",
            "jitter",
            "run_at_start",
            "deadline",
            "misfire_grace",
        }
    )
    d = ScheduleConfig()
    cron = reader.get("cron", str, None)
    if cron is not None and reader.has("interval"):
        reader.fail("cron", "give schedule.interval or schedule.cron, not both")
    timezone = reader.get("timezone", str, d.timezone)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        reader.fail("timezone", f"unknown time zone {timezone!r}")
    if cron is not None:
        from etl.schedule import check_cron

        try:
            check_cron(cron)
        except ValueError as exc:
            reader.fail("cron", f"not a crontab expression {cron!r}: {exc}")
    return ScheduleConfig(
        interval=None if cron is not None else reader.duration("interval", d.interval),
        cron=cron,
        timezone=timezone,
        jitter=reader.duration("jitter", d.jitter, zero=True),
        run_at_start=reader.get("run_at_start", bool, d.run_at_start),
        deadline=reader.duration("deadline", d.deadline),
        misfire_grace=reader.duration("misfire_grace", d.misfire_grace),
    )


def _read_locks(reader: _Reader) -> LocksConfig:
    reader.check_keys({"wait", "lease"})
    d = LocksConfig()
    lease = reader.duration("lease", d.lease)
    if lease < 1:
        reader.fail("lease", "must be at least 1 second")
    return LocksConfig(wait=reader.duration("wait", d.wait, zero=True), lease=lease)


def parse_duration(value: object) -> float:
    """Seconds from 90, 1.5, "90", "90s", "5m", "1h" or "1d"; ValueError else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _UNITS[match[2].lower()]
    else:
        raise ValueError(
            f'expected a duration such as "90s", "5m", "1h", "1d" or a number of '
            f"seconds, got {value!r}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration cannot be {value!r}")
    # Longer would only be a typo, and past some size the scheduler's dates
    # overflow, ending the daemon in a traceback.
    if seconds > LONGEST_DURATION:
        raise ValueError(f"a duration can be at most 365d, got {value!r}")
    return seconds


def _read_token(
    reader: _Reader, key: str, environ: Mapping[str, str], variable: str | None
) -> str:
    """A token from the environment variable if set, else from the file.

    Surrounding whitespace is dropped (a token file saved with a line end);
    what remains must be visible ASCII, as an HTTP header requires, or the
    request would fail later with the token quoted in the error.
    """
    given = environ.get(variable, "") if variable else ""
    source = f"the environment variable {variable}" if given else "the file"
    token = (given or reader.get(key, str, "")).strip()
    if any(not "!" <= char <= "~" for char in token):
        reader.fail(
            key,
            f"the token from {source} holds a space, a line break or a character "
            "outside ASCII, which no HTTP header can carry (its value is not shown)",
        )
    return token


def _check_one_entry_each(accounts: tuple[MainAccount, ...], path: str) -> None:
    # Two entries would read the account's list of sub-accounts twice, and
    # disagree on its token or whether its own tasks are synced.
    first: dict[str, int] = {}
    for index, account in enumerate(accounts):
        earlier = first.setdefault(account.user_id, index)
        if earlier != index:
            raise ConfigError(
                f"user_id {account.user_id} is also in accounts[{earlier}]: give "
                "each main account one entry",
                key=f"accounts[{index}].user_id",
                path=path,
            )


def _check_tokens(api: ApiConfig, accounts: tuple[MainAccount, ...], path: str) -> None:
    for index, account in enumerate(accounts):
        if not (account.token or api.token):
            raise ConfigError(
                f"no token for account {account.user_id}: set api.token, "
                f"the account's token or token_env, or {TOKEN_ENV}",
                key=f"accounts[{index}].token",
                path=path,
            )


class _Reader:
    """One TOML table, with the dotted key prefix used in error messages."""

    def __init__(self, table: Mapping[str, Any], path: str, prefix: str) -> None:
        self._table = table
        self._path = path
        self._prefix = prefix

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(message, key=self._prefix + key, path=self._path)

    def check_keys(self, known: set[str]) -> None:
        for key in self._table:
            if key not in known:
                expected = ", ".join(sorted(known))
                self.fail(key, f"unknown key (expected one of: {expected})")

    def get(self, key: str, kind: type[T], default: Any) -> Any:
        if key not in self._table:
            return default
        value = self._table[key]
        # TOML has no null, and a bool is an int to Python: check exactly.
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            self.fail(
                key, f"expected {_kind_name(kind)}, got {_kind_name(type(value))}"
            )
        return value

    def has(self, key: str) -> bool:
        return key in self._table

    def duration(self, key: str, default: float | None, zero: bool = False) -> float:
        if key not in self._table:
            return float(default or 0.0)
        try:
            seconds = parse_duration(self._table[key])
        except ValueError as exc:
            self.fail(key, str(exc))
        if seconds == 0 and not zero:
            self.fail(key, "must be greater than 0")
        return seconds

    def require(self, key: str, kind: type[T]) -> Any:
        if key not in self._table:
            self.fail(key, "required key is missing")
        return self.get(key, kind, None)

    def positive(
        self, key: str, default: float, *, most: float, unit: str = ""
    ) -> float:
        """A number greater than 0 and at most `most` `unit`. TOML reads nan
        and inf as numbers, and NaN slips past every comparison: both crashed
        a run long after the configuration was read."""
        value = float(self.get(key, float, default))
        if not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value}")
        if value <= 0:
            self.fail(key, "must be greater than 0")
        if value > most:
            self.fail(key, f"must be at most {most:g}{unit}, got {value:g}")
        return value

    def seconds(self, key: str, default: float) -> float:
        """A timeout or a wait: seconds, greater than 0 and at most a day."""
        return self.positive(key, default, most=LONGEST_WAIT, unit=" s (a day)")

    def count(
        self, key: str, default: int, minimum: int = 1, most: int | None = None
    ) -> int:
        value = int(self.get(key, int, default))
        if value < minimum:
            self.fail(key, f"must be at least {minimum}")
        if most is not None and value > most:
            self.fail(key, f"must be at most {most}, got {value}")
        return value

    def table(self, key: str) -> _Reader:
        value = self.get(key, dict, {})
        return _Reader(value, self._path, f"{self._prefix}{key}.")

    def tables(self, key: str) -> list[_Reader]:
        items = self.get(key, list, [])
        readers = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                self.fail(f"{key}[{index}]", "expected a table")
            readers.append(_Reader(item, self._path, f"{self._prefix}{key}[{index}]."))
        return readers


def _kind_name(kind: type) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return names.get(kind, kind.__name__)
