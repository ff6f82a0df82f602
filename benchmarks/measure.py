"""One measurement, run in a fresh process: `python measure.py SPEC_JSON`.

Prints one JSON line: the wall time of the measured part, the tasks it
handled, the kind of database it wrote to (`dialect`) and the peak resident
memory of the whole process. Each kind imports only what it needs, so the
memory figure is that kind's own:

- `fetch`: the floor of fetching; a plain `requests` loop walking every
  account's pages with the given parallelism and decoding the JSON.
- `write`: the floor of writing; the bare driver (sqlite3, psycopg) writes
  each page's rows with one INSERT ... ON CONFLICT executemany, one
  transaction per page. Pages are fetched one at a time and only the
  writing is timed.
- `sync`: one task-etl run (`etl.sync.run_sync`) into a migrated database.
- `dlt`: dlt loading the same pages with merge on uuid.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

Spec = dict[str, Any]
Account = tuple[str, str]
Items = list[dict[str, Any]]

MAX_PAGES = 100_000
HTTP_TIMEOUT_S = 60
# The consumer of a page queue gives up after this long without a page.
QUEUE_TIMEOUT_S = 600

TASK_COLUMNS = (
    "uuid",
    "user_id",
    "sub_user_id",
    "name",
    "status",
    "status_str",
    "created_at",
    "altered_at",
    "maximumcall",
    "dial_time_id",
    "destination_extension",
    "caller_line_id",
    "bridge_group_id",
    "group_id",
    "enable",
    "remark",
    "raw",
    "content_hash",
    "first_seen_at",
    "last_changed_at",
    "status_seen_at",
    "removed_at",
)


class Clock:
    """Wall and CPU time of the measured parts; CPU of every thread."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    @contextmanager
    def running(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - wall
            self.cpu_seconds += time.process_time() - cpu

    def result(self, **details: Any) -> dict[str, Any]:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds, **details}


def main(argv: list[str]) -> int:
    spec: Spec = json.loads(argv[1])
    kinds: dict[str, Callable[[Spec], dict[str, Any]]] = {
        "fetch": measure_fetch,
        "write": measure_write,
        "sync": measure_sync,
        "dlt": measure_dlt,
    }
    result = kinds[spec["kind"]](spec)
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)
    return 0


# -- the floors ----------------------------------------------------------------


def measure_fetch(spec: Spec) -> dict[str, Any]:
    clock = Clock()
    with clock.running():
        tasks = sum(len(items) for _, items in parallel_pages(spec))
    return clock.result(tasks=tasks)


def measure_write(spec: Spec) -> dict[str, Any]:
    import requests

    writer = _BareWriter(spec["database"])
    clock, tasks = Clock(), 0
    with requests.Session() as session:
        _authorise(session, spec)
        for account in _accounts(spec):
            for items in walk_pages(session, spec, account):
                with clock.running():
                    writer.write(account, items)
                tasks += len(items)
    writer.close()
    return clock.result(tasks=tasks, dialect=writer.dialect)


class _BareWriter:
    """What a minimal hand-written loader does: tuples into executemany."""

    def __init__(self, url: str) -> None:
        self.is_sqlite = url.startswith("sqlite")
        self.dialect = "sqlite" if self.is_sqlite else "postgresql"
        marker = "?" if self.is_sqlite else "%s"
        updates = ", ".join(
            f"{name} = excluded.{name}"
            for name in TASK_COLUMNS
            if name not in ("uuid", "first_seen_at")
        )
        self.statement = (
            f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) "
            f"VALUES ({', '.join([marker] * len(TASK_COLUMNS))}) "
            f"ON CONFLICT (uuid) DO UPDATE SET {updates}"
        )
        if self.is_sqlite:
            import sqlite3

            self.connection: Any = sqlite3.connect(url.split(":///", 1)[1])
            # The same settings task-etl uses on SQLite.
            self.connection.execute("PRAGMA journal_mode = WAL")
            self.connection.execute("PRAGMA synchronous = NORMAL")
            self.connection.execute("PRAGMA wal_autocheckpoint = 10000")
        else:
            import psycopg

            self.connection = psycopg.connect(url.replace("+psycopg", ""))

    def write(self, account: Account, items: Items) -> None:
        now: Any = datetime.now(UTC)
        if self.is_sqlite:
            now = now.isoformat(sep=" ")
        rows = [_bare_row(item, account, now) for item in items]
        # One transaction per page, like task-etl; both drivers open it here.
        self.connection.cursor().executemany(self.statement, rows)
        self.connection.commit()

    def close(self) -> None:
        self.connection.close()


def _bare_row(item: dict[str, Any], account: Account, now: Any) -> tuple[Any, ...]:
    group = item.get("group") or {}
    return (
        _text(item.get("uuid")),
        account[0],
        account[1],
        item.get("name"),
        _number(item.get("status")),
        item.get("status_str"),
        item.get("create_datetime") or None,
        item.get("alter_datetime") or None,
        _number(item.get("maximumcall")),
        _text(item.get("dial_time_id")),
        _text(item.get("destination_extension")),
        _text(item.get("caller_line_id")),
        _text(item.get("bridge_group_id")),
        _text(group.get("id")),
        None if item.get("enable") is None else bool(item.get("enable")),
        item.get("remark"),
        json.dumps(item, ensure_ascii=False),
        "",
        now,
        now,
        now,
        None,
    )


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _number(value: Any) -> int | None:
    return None if value is None or value == "" else int(value)


# -- what is compared with the floors -------------------------------------------


def measure_sync(spec: Spec) -> dict[str, Any]:
    from etl import store
    from etl.config import ApiConfig, Config, DatabaseConfig, MainAccount
    from etl.sync import run_sync

    config = Config(
        database=DatabaseConfig(url=spec["database"]),
        api=ApiConfig(
            base_url=spec["url"],
            token=spec["token"],
            page_size=spec["page_size"],
            parallelism=spec["parallelism"],
            requests_per_second=spec["rate"],
            max_pages=MAX_PAGES,
        ),
        accounts=tuple(
            MainAccount(user_id=user_id, discover_sub_accounts=True)
            for user_id in spec["main_user_ids"]
        ),
    )
    engine = store.connect(config.database)
    clock = Clock()
    with clock.running():
        summary = run_sync(config, engine=engine)
    engine.dispose()
    counts = summary.counts
    return clock.result(
        dialect=engine.dialect.name,
        tasks=counts.seen,
        outcome=summary.outcome,
        new=counts.new,
        changed=counts.changed,
        status_changes=counts.status_changes,
        removed=counts.removed,
    )


def measure_dlt(spec: Spec) -> dict[str, Any]:
    # dlt reports usage over the network unless told not to.
    os.environ["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    import dlt

    url: str = spec["database"]
    dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
    if dialect == "sqlite":
        destination = dlt.destinations.sqlalchemy(credentials=url)
    else:
        # dlt insists on a password; the throwaway cluster trusts loopback and
        # ignores it.
        plain = url.replace(
            "postgresql+psycopg://postgres@", "postgresql://postgres:x@"
        )
        destination = dlt.destinations.postgres(credentials=plain)

    @dlt.resource(name="tasks", write_disposition="merge", primary_key="uuid")
    def tasks() -> Iterator[Items]:
        for _, items in parallel_pages(spec):
            yield items

    pipeline = dlt.pipeline(
        pipeline_name="bench",
        pipelines_dir=spec["workdir"],
        destination=destination,
        dataset_name="bench",
    )
    clock = Clock()
    with clock.running():
        pipeline.run(tasks())
    with pipeline.sql_client() as client:
        rows = client.execute_sql(
            f"SELECT count(*) FROM {client.make_qualified_table_name('tasks')}"
        )
    return clock.result(tasks=int(rows[0][0]) if rows else 0, dialect=dialect)


# -- fetching pages ---------------------------------------------------------------


def walk_pages(session: Any, spec: Spec, account: Account) -> Iterator[Items]:
    """The `data` of each page of one account's task list, in order."""
    user_id, sub_user_id = account
    url = f"{spec['url']}/agent-api/user/{user_id}/task"
    for number in range(1, MAX_PAGES + 1):
        params: dict[str, Any] = {"page": number, "per_page": spec["page_size"]}
        if sub_user_id:
            params["sub_user_id"] = sub_user_id
        response = session.get(url, params=params, timeout=HTTP_TIMEOUT_S)
        response.raise_for_status()
        body = response.json()
        yield body["data"]
        if number >= body["meta"]["last_page"]:
            return
    raise RuntimeError(f"account {account}: more than {MAX_PAGES} pages")


def parallel_pages(spec: Spec) -> Iterator[tuple[Account, Items]]:
    """Every account's pages, walked by `parallelism` threads at once."""
    import requests

    pages: queue.Queue[tuple[Account, Items] | None] = queue.Queue(
        maxsize=2 * spec["parallelism"]
    )
    local = threading.local()

    def walk(account: Account) -> None:
        try:
            if not hasattr(local, "session"):
                local.session = requests.Session()
                _authorise(local.session, spec)
            for items in walk_pages(local.session, spec, account):
                pages.put((account, items), timeout=QUEUE_TIMEOUT_S)
        finally:
            pages.put(None, timeout=QUEUE_TIMEOUT_S)

    accounts = _accounts(spec)
    with ThreadPoolExecutor(spec["parallelism"]) as pool:
        futures = [pool.submit(walk, account) for account in accounts]
        walking = len(accounts)
        while walking:
            page = pages.get(timeout=QUEUE_TIMEOUT_S)
            if page is None:
                walking -= 1
            else:
                yield page
        for future in futures:
            future.result()


def _authorise(session: Any, spec: Spec) -> None:
    session.headers["Authorization"] = f"Bearer {spec['token']}"


def _accounts(spec: Spec) -> list[Account]:
    return [(user_id, sub_user_id) for user_id, sub_user_id in spec["accounts"]]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
