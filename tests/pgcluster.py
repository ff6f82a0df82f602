"""A private, throwaway PostgreSQL cluster on a free loopback port.

Used by the test fixtures and by the benchmark, so that both start the
server the same way: `initdb` into a temporary directory, durability off,
only the socket and 127.0.0.1 allowed in, and, when running as root, the
server run as an unprivileged user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

PG_BIN_ENV = "TASK_ETL_PG_BIN"
PG_SUPERUSER = "postgres"
# PostgreSQL refuses to run as root, and tests run as root in CI.
UNPRIVILEGED_USER = "nobody"
INITDB_TIMEOUT_S = 120
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
START_ATTEMPTS = 3

SPEED_SETTINGS = """
# Throwaway test cluster: durability buys nothing here, speed does.
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
listen_addresses = '127.0.0.1'
"""

# Only the socket and loopback TCP may connect, without a password; any other
# origin matches no line and is refused.
HBA_RULES = """
local all all trust
host all all 127.0.0.1/32 trust
"""


class ClusterError(Exception):
    """The test cluster could not be set up; the message says why."""


@dataclasses.dataclass(frozen=True)
class PgCluster:
    """A running test cluster and how to reach it."""

    bin_dir: Path
    base_dir: Path
    port: int
    version: str

    def connect_admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=PG_SUPERUSER,
            dbname="postgres",
            autocommit=True,
            connect_timeout=10,
        )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        with self.connect_admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        # FORCE ends the connections an engine pool may still hold open.
        with self.connect_admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)
                )
            )


@contextmanager
def throwaway_cluster() -> Iterator[PgCluster]:
    """A cluster for the duration of the block, deleted afterwards."""
    # Not a 0700 directory from pytest: the server user must enter it.
    base_dir = Path(tempfile.mkdtemp(prefix="task-etl-pg-"))
    try:
        yield start_cluster(base_dir)
    finally:
        stop_cluster_quietly(base_dir)
        shutil.rmtree(base_dir, ignore_errors=True)


def find_pg_bin() -> Path:
    """The directory holding initdb and pg_ctl, newest version first."""
    if configured := os.environ.get(PG_BIN_ENV):
        candidates = [Path(configured)]
    else:
        candidates = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda path: [int(n) for n in re.findall(r"\d+", path.parent.name)],
            reverse=True,
        )
        if on_path := shutil.which("pg_ctl"):
            candidates.append(Path(on_path).resolve().parent)

    for bin_dir in candidates:
        if all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl")):
            return bin_dir
    where = (
        f"{PG_BIN_ENV}={configured}" if configured else "/usr/lib/postgresql or PATH"
    )
    raise ClusterError(f"no initdb and pg_ctl found in {where}")


def start_cluster(base_dir: Path) -> PgCluster:
    """Initialise and start a cluster in `base_dir`, an empty directory."""
    bin_dir = find_pg_bin()
    _init_cluster(bin_dir, base_dir)
    port = _start_on_free_port(bin_dir, base_dir)

    cluster = PgCluster(bin_dir=bin_dir, base_dir=base_dir, port=port, version="")
    try:
        with cluster.connect_admin() as conn:
            row = conn.execute("SELECT version()").fetchone()
    except psycopg.Error as exc:
        raise ClusterError(f"server started but refuses connections: {exc}") from exc
    return dataclasses.replace(cluster, version=str(row[0]) if row else "")


def stop_cluster_quietly(base_dir: Path) -> None:
    """Stop the cluster of `base_dir` if it runs; warn, never raise."""
    if not (base_dir / "data" / "postmaster.pid").exists():
        return
    try:
        _run_pg(
            find_pg_bin() / "pg_ctl",
            ["-D", str(base_dir / "data"), "-m", "fast"],
            ["-w", "-t", str(STOP_TIMEOUT_S), "stop"],
            timeout=STOP_TIMEOUT_S + 30,
            cwd=base_dir,
        )
    except ClusterError as exc:
        warnings.warn(f"test PostgreSQL cluster did not stop: {exc}", stacklevel=1)


def _init_cluster(bin_dir: Path, base_dir: Path) -> None:
    data_dir = base_dir / "data"
    socket_dir = base_dir / "socket"
    socket_dir.mkdir()
    for path in (base_dir, socket_dir):
        _hand_to_server_user(path)

    _run_pg(
        bin_dir / "initdb",
        ["-D", str(data_dir), "-U", PG_SUPERUSER, "--auth=trust"],
        ["--encoding=UTF8", "--locale=C", "--no-sync"],
        timeout=INITDB_TIMEOUT_S,
        cwd=base_dir,
    )
    (data_dir / "pg_hba.conf").write_text(HBA_RULES)
    with (data_dir / "postgresql.conf").open("a") as conf:
        conf.write(SPEED_SETTINGS)
        conf.write(f"unix_socket_directories = '{socket_dir}'\n")


def _start_on_free_port(bin_dir: Path, base_dir: Path) -> int:
    # A free port can be taken between choosing it and binding it; try anew.
    for attempt in range(1, START_ATTEMPTS + 1):
        port = _free_port()
        try:
            _start_server(bin_dir, base_dir, port)
            return port
        except ClusterError:
            stop_cluster_quietly(base_dir)
            if attempt == START_ATTEMPTS or "could not bind" not in _log_tail(base_dir):
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")


def _start_server(bin_dir: Path, base_dir: Path, port: int) -> None:
    _run_pg(
        bin_dir / "pg_ctl",
        ["-D", str(base_dir / "data"), "-l", str(base_dir / "server.log")],
        ["-o", f"-p {port}", "-w", "-t", str(START_TIMEOUT_S), "start"],
        timeout=START_TIMEOUT_S + 30,
        cwd=base_dir,
    )


def _run_pg(program: Path, *arg_groups: list[str], timeout: float, cwd: Path) -> None:
    command = [str(program), *itertools.chain.from_iterable(arg_groups)]
    # The server's own environment variables would override our flags.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    try:
        subprocess.run(
            command,
            cwd=cwd,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            **_server_user_args(),
        )
    except subprocess.CalledProcessError as exc:
        output = (exc.stdout + exc.stderr).strip()
        raise ClusterError(
            f"{program.name} exited with {exc.returncode}: {output}{_log_tail(cwd)}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(
            f"{program.name} did not finish in {timeout} s{_log_tail(cwd)}"
        ) from exc
    except OSError as exc:
        raise ClusterError(f"cannot run {program}: {exc}") from exc


def _server_user_args() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    entry = _server_user()
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError as exc:
        raise ClusterError(
            f"running as root and there is no user {UNPRIVILEGED_USER!r} "
            "to run PostgreSQL as"
        ) from exc


def _hand_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        entry = _server_user()
        os.chown(path, entry.pw_uid, entry.pw_gid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _log_tail(base_dir: Path, lines: int = 15) -> str:
    log = base_dir / "server.log"
    if not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return "\nserver log:\n" + "\n".join(tail)
