"""What a benchmark runs against: the simulator in its own process, and
fresh databases on SQLite or on a PostgreSQL server.

The simulator runs in a child process so that the HTTP server and the code
being measured do not take turns on one interpreter lock. The parent drives
it through a pipe: change a share of the task statuses, or hand over the
moments requests arrived (to check the client's rate limit from the server
side).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg import sql

from etl.simulator import Simulator

# The repository's tests hold the code that starts a throwaway cluster.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgcluster import ClusterError, throwaway_cluster  # noqa: E402

TOKEN = "bench-token"
# A command to the simulator process is answered in well under this.
REPLY_TIMEOUT_S = 600
# The simulator process ends on its own if its parent vanished or forgot it.
SIMULATOR_LIFETIME_S = 6 * 3600

_database_numbers = itertools.count(1)


@dataclass(frozen=True)
class World:
    """A data set: main accounts × sub-accounts each × tasks per account."""

    main_accounts: int
    sub_accounts: int
    tasks_per_account: int
    delay: float = 0.0
    seed: int = 1

    @property
    def accounts(self) -> int:
        return self.main_accounts * (1 + self.sub_accounts)

    @property
    def tasks(self) -> int:
        return self.accounts * self.tasks_per_account


@dataclass(frozen=True)
class Served:
    """Where the simulator listens and what it holds."""

    url: str
    token: str
    main_user_ids: tuple[str, ...]
    accounts: tuple[tuple[str, str], ...]


class BenchError(Exception):
    """A measurement or what it runs against failed; the message says why."""


class _RecordingSimulator(Simulator):
    """The simulator, noting when each request is answered.

    The moment is taken after the simulator's own delay, which is the same
    for every request, so the spacing between requests is as they arrived.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._arrivals: list[float] = []
        self._arrivals_lock = threading.Lock()

    def _answer(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        with self._arrivals_lock:
            self._arrivals.append(time.monotonic())
        return super()._answer(*args, **kwargs)

    def take_arrivals(self) -> list[float]:
        with self._arrivals_lock:
            arrivals, self._arrivals = self._arrivals, []
        return arrivals

    def change_statuses(self, share: float, seed: int) -> int:
        """Give `share` of the live tasks another status; return how many."""
        rng = random.Random(seed)
        live = [task for task in self.tasks() if task.removed_at is None]
        chosen = rng.sample(live, round(share * len(live)))
        for task in chosen:
            self.set_task_status(task.uuid, 1 + task.status % 3)
        return len(chosen)


class SimulatorProcess:
    """A simulator serving `world` on 127.0.0.1 from a child process."""

    def __init__(self, world: World) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(world, child_conn), name="bench-simulator"
        )
        self._process.start()
        child_conn.close()
        try:
            self.served: Served = self._reply()
        except BaseException:
            self.close()
            raise

    def change_statuses(self, share: float, seed: int) -> int:
        self._conn.send(("change_statuses", (share, seed)))
        changed: int = self._reply()
        return changed

    def take_arrivals(self) -> list[float]:
        self._conn.send(("take_arrivals", ()))
        arrivals: list[float] = self._reply()
        return arrivals

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop", ()))
            except OSError:
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
        self._conn.close()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _reply(self) -> Any:
        if not self._conn.poll(REPLY_TIMEOUT_S):
            raise BenchError(f"the simulator did not answer in {REPLY_TIMEOUT_S} s")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise BenchError("the simulator process ended unexpectedly") from None
        if kind == "error":
            raise BenchError(f"the simulator failed: {value}")
        return value


def _serve(world: World, conn: Connection) -> None:
    """The simulator process: build the world, serve it, obey the pipe."""
    try:
        simulator = _RecordingSimulator(
            seed=world.seed,
            main_accounts=world.main_accounts,
            sub_accounts=world.sub_accounts,
            tasks_per_account=world.tasks_per_account,
            token=TOKEN,
            delay=world.delay,
        )
        server = simulator.serve()
    except Exception as exc:
        conn.send(("error", repr(exc)))
        return

    accounts = tuple(account.key for account in simulator.accounts())
    mains = tuple(simulator.main_user_ids())
    conn.send(("ok", Served(server.url, TOKEN, mains, accounts)))
    parent = os.getppid()
    deadline = time.monotonic() + SIMULATOR_LIFETIME_S
    with server:
        while time.monotonic() < deadline and os.getppid() == parent:
            if not conn.poll(1.0):
                continue
            try:
                command, args = conn.recv()
            except EOFError:
                return
            if command == "stop":
                return
            conn.send(("ok", getattr(simulator, command)(*args)))


class PgServer(Protocol):
    """Where the PostgreSQL databases of a benchmark are made."""

    def create_database(self, name: str) -> str: ...

    def drop_database(self, name: str) -> None: ...


@dataclass(frozen=True)
class ExistingServer:
    """A PostgreSQL server given by the URL of a superuser's database."""

    url: str

    def create_database(self, name: str) -> str:
        self._run(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        base, _, _ = self.url.rpartition("/")
        return f"{base}/{name}"

    def drop_database(self, name: str) -> None:
        statement = "DROP DATABASE IF EXISTS {} WITH (FORCE)"
        self._run(sql.SQL(statement).format(sql.Identifier(name)))

    def _run(self, statement: sql.Composed) -> None:
        conninfo = self.url.replace("+psycopg", "")
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)


class Databases:
    """Fresh, empty databases of one kind; all deleted on close."""

    def __init__(self, kind: str, cluster: PgServer | None) -> None:
        if kind == "postgresql" and cluster is None:
            raise ValueError("PostgreSQL databases need a server")
        self.kind = kind
        self._cluster = cluster
        self._dir = Path(tempfile.mkdtemp(prefix=f"task-etl-bench-{kind}-"))
        self._names: list[str] = []

    def new(self, label: str) -> str:
        """The SQLAlchemy URL of a new, empty database of this kind."""
        name = f"bench_{next(_database_numbers)}_{label}"
        # By kind, not by whether a server was given: a run of both kinds
        # has one, and its SQLite rows once measured PostgreSQL.
        if self.kind == "sqlite":
            return f"sqlite:///{self._dir / name}.db"
        assert self._cluster is not None, "checked when made"
        self._names.append(name)
        return self._cluster.create_database(name)

    @property
    def scratch(self) -> Path:
        """A directory that lives as long as the databases."""
        return self._dir

    def close(self) -> None:
        if self._cluster is not None:
            for name in self._names:
                self._cluster.drop_database(name)
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def postgresql_server(enabled: bool, url: str | None) -> Iterator[PgServer | None]:
    """The server at `url`, else a throwaway cluster; None if not wanted."""
    if not enabled:
        yield None
    elif url:
        yield ExistingServer(url)
    else:
        try:
            with throwaway_cluster() as cluster:
                yield cluster
        except ClusterError as exc:
            raise BenchError(f"PostgreSQL: {exc}") from exc
