"""Odd inputs, end to end: a scripted platform, the real sync, a real database.

Each case the platform's documentation leaves open (or gets wrong) is served
over loopback and synced into SQLite and PostgreSQL; the test holds the value
the database must end with. A "clear error" is one line naming the account,
the endpoint and the page, and fails that account only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from scripted import (
    TASK_LIST,
    TOKEN,
    Asked,
    Platform,
    Reply,
    envelope,
    meta,
    serve,
    task,
    tasks,
)
from sqlalchemy import Engine, event, select, text
from synced import history

from etl import store
from etl.backfill import run_backfill
from etl.cli import main
from etl.client import Client, RateLimiter
from etl.config import ApiConfig, Config, DatabaseConfig, MainAccount
from etl.errors import StoreError
from etl.faults import Faults
from etl.models import accounts, sync_rejects, sync_runs
from etl.models import tasks as tasks_table
from etl.parse import status_label
from etl.simulator import Simulator
from etl.sync import RunSummary, run_sync

pytestmark = pytest.mark.timeout(60)

MAX_RETRIES = 2


@pytest.fixture
def platform() -> Iterator[Platform]:
    with serve() as platform:
        yield platform


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_config(url: str, user_ids: tuple[str, ...], **api: Any) -> Config:
    settings: dict[str, Any] = {
        "page_size": 15,
        "read_timeout": 2.0,
        "max_retries": MAX_RETRIES,
        "max_pages": 50,
        "requests_per_second": 10_000.0,
        **api,
    }
    return Config(
        database=DatabaseConfig(url="unused://"),
        api=ApiConfig(base_url=url, token=TOKEN, **settings),
        accounts=tuple(MainAccount(user_id=user_id) for user_id in user_ids),
    )


def sync(
    url: str,
    engine: Engine,
    *user_ids: str,
    sleeps: list[float] | None = None,
    **api: Any,
) -> RunSummary:
    """One run over the main accounts `user_ids` (default u1); sleeps are
    recorded instead of slept."""
    config = make_config(url, user_ids or ("u1",), **api)
    recorded = sleeps if sleeps is not None else []
    client = Client(config.api, sleep=recorded.append, limiter=RateLimiter(10_000))
    with client:
        return run_sync(config, engine=engine, client=client)


def stored(engine: Engine) -> dict[str, Any]:
    with engine.connect() as connection:
        return {row.uuid: row for row in connection.execute(select(tasks_table))}


def listed(engine: Engine) -> set[str]:
    """The tasks stored as listed and not flagged as missed by a complete walk.

    A walk that wrongly counted as complete would flag the tasks it missed,
    though it removes none: with the flagged ones left out, tests of such
    walks still tell.
    """
    return {
        uuid
        for uuid, row in stored(engine).items()
        if row.removed_at is None and row.unlisted_after is None
    }


def run_row(engine: Engine, run_id: int) -> Any:
    with engine.connect() as connection:
        return connection.execute(
            select(sync_runs).where(sync_runs.c.id == run_id)
        ).one()


def account_row(engine: Engine, user_id: str) -> Any:
    query = select(accounts).where(accounts.c.user_id == user_id)
    with engine.connect() as connection:
        return connection.execute(query).one()


def uuids(first: int, last: int) -> set[str]:
    return {f"task-{n}" for n in range(first, last + 1)}


def assert_clear_error(message: str | None, user_id: str, page: int) -> None:
    assert message is not None
    assert "\n" not in message, message
    assert f"account {user_id}" in message, message
    assert f"endpoint {TASK_LIST}" in message, message
    assert f"page {page}" in message, message


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# -- pagination --------------------------------------------------------------


def test_meta_on_the_first_page_only_still_reads_every_page(
    platform: Platform, engine: Engine
) -> None:
    platform.serve_pages(
        "u1",
        envelope(tasks(1, 15), meta(40, 3)),
        envelope(tasks(16, 30)),
        envelope(tasks(31, 40)),
    )

    summary = sync(platform.url, engine)

    assert summary.outcome == "succeeded"
    assert listed(engine) == uuids(1, 40)
    assert platform.pages_asked("u1") == [1, 2, 3]


def test_no_totals_reads_to_the_short_page_with_a_warning(
    platform: Platform, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    platform.serve_pages(
        "u1",
        envelope(tasks(1, 15), meta(None, None)),
        envelope(tasks(16, 18), meta(None, None, page=2)),
        envelope([], meta(None, None, page=3)),
    )

    with caplog.at_level(logging.WARNING):
        summary = sync(platform.url, engine)

    assert summary.outcome == "succeeded"
    assert listed(engine) == uuids(1, 18)
    assert any("relies on page lengths" in m for m in warnings_of(caplog))


def test_null_data_on_the_last_page_is_empty_and_earlier_pages_stay(
    platform: Platform, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    platform.serve_pages("u1", envelope(tasks(1, 15) + [task(99)], meta(16, 2)))
    sync(platform.url, engine)
    platform.serve_pages(
        "u1",
        envelope(tasks(1, 15), meta(33, 3)),
        envelope(tasks(16, 30), meta(33, 3, page=2)),
        envelope(None, meta(33, 3, page=3)),
    )

    with caplog.at_level(logging.WARNING):
        summary = sync(platform.url, engine)

    assert summary.outcome == "succeeded"
    assert listed(engine) == uuids(1, 30) | {"task-99"}
    assert summary.counts.removed == 0
    assert any("total 33 but 30 items read" in m for m in warnings_of(caplog))


def test_an_empty_middle_page_stops_the_walk_and_removes_nothing(
    platform: Platform, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    full = [envelope(tasks(n, n + 14), meta(50, 4, page=p)) for p, n in [(1, 1)]]
    full += [envelope(tasks(16, 30)), envelope(tasks(31, 45)), envelope(tasks(46, 50))]
    platform.serve_pages("u1", *full)
    sync(platform.url, engine)
    platform.serve_pages(
        "u1",
        envelope(tasks(1, 15), meta(50, 4)),
        envelope(tasks(16, 30), meta(50, 4, page=2)),
        envelope([], meta(50, 4, page=3)),
        envelope(tasks(46, 50), meta(50, 4, page=4)),
    )

    with caplog.at_level(logging.WARNING):
        summary = sync(platform.url, engine)

    assert platform.pages_asked("u1")[-3:] == [1, 2, 3]
    assert summary.counts.removed == 0
    assert listed(engine) == uuids(1, 50)
    assert any(
        "page 3 of 4 is empty; total 50 but 30 items read" in m
        for m in warnings_of(caplog)
    )


def test_meta_numbers_given_as_strings_are_coerced(
    platform: Platform, engine: Engine
) -> None:
    strings = {
        "has_pages": "true",
        "total": "40",
        "last_page": "3",
        "current_page": "1",
        "per_page": "15",
    }
    platform.serve_pages(
        "u1",
        envelope(tasks(1, 15), strings),
        envelope(tasks(16, 30), {**strings, "current_page": "2"}),
        envelope(tasks(31, 40), {**strings, "current_page": "3"}),
    )

    summary = sync(platform.url, engine)

    assert summary.outcome == "succeeded"
    assert listed(engine) == uuids(1, 40)
    assert platform.pages_asked("u1") == [1, 2, 3]


# -- items -------------------------------------------------------------------


def test_a_repeated_uuid_is_one_task_with_one_history(
    platform: Platform, engine: Engine
) -> None:
    first = tasks(1, 14)
    first.insert(3, task(2))
    platform.serve_pages("u1", envelope(first), envelope([task(2), *tasks(15, 16)]))

    sync(platform.url, engine)
    summary = sync(platform.url, engine)

    assert listed(engine) == uuids(1, 16)
    assert history(engine, "task-2") == [("first_seen", None, 2)]
    assert summary.counts.status_changes == 0


def test_items_without_uuid_are_rejected_and_the_rest_stored(
    platform: Platform, engine: Engine
) -> None:
    no_key = task(8)
    del no_key["uuid"]
    platform.serve_pages(
        "u1", envelope([task(1), task(7, uuid=None), task(2), no_key, task(3)])
    )

    summary = sync(platform.url, engine)

    assert listed(engine) == uuids(1, 3)
    with engine.connect() as connection:
        rejects = connection.execute(select(sync_rejects)).all()
    assert sorted(r.reason for r in rejects) == [
        "uuid is empty or null",
        "uuid is missing",
    ]
    assert {(r.user_id, r.endpoint, r.page) for r in rejects} == {("u1", TASK_LIST, 1)}
    assert all(r.item["name"] in ("任务7", "任务8") for r in rejects)
    assert run_row(engine, summary.run_id).rejected == 2


def test_ids_that_only_a_nul_or_a_lone_surrogate_tells_apart_are_refused(
    platform: Platform, engine: Engine
) -> None:
    # Cleaning dropped the NUL and replaced the surrogate, so "t-1",
    # "t-\0" + "1" and "t-\ud800" + "1" were stored as one task: the
    # others were lost, with no reject and no warning.
    unstorable = ["t-\x001", "t-\ud8001", "t-\udc001", "\x00t-1"]
    items = [task(1, uuid="t-1")] + [task(2, uuid=uuid) for uuid in unstorable]
    # Escaped as JSON writes them, \u0000 and \ud800.
    body = {"code": 200, "status": "success", "data": items}
    platform.serve_pages("u1", json.dumps(body).encode())

    summary = sync(platform.url, engine)

    assert listed(engine) == {"t-1"}
    with engine.connect() as connection:
        rejects = connection.execute(select(sync_rejects)).all()
    assert [r.reason for r in rejects] == [
        "uuid holds a NUL or a lone surrogate, which cannot be stored"
    ] * len(unstorable)
    assert run_row(engine, summary.run_id).rejected == len(unstorable)


@pytest.mark.parametrize("first_sync", [True, False], ids=["first", "re-sync"])
def test_an_item_nested_too_deep_to_clean_is_rejected_and_the_rest_stored(
    platform: Platform, engine: Engine, first_sync: bool
) -> None:
    # Cleaning walks an item by recursion; a NUL deep inside needs it.
    deep: object = "t\x00"
    for _ in range(600):
        deep = [deep]
    if not first_sync:
        platform.serve_pages("u1", envelope([task(1), task(2), task(3)]))
        sync(platform.url, engine)
    platform.serve_pages("u1", envelope([task(1), task(2, tags=deep), task(3)]))

    summary = sync(platform.url, engine)

    assert summary.outcome == "succeeded", summary.errors
    assert listed(engine) == {"task-1", "task-3"}
    with engine.connect() as connection:
        rejects = connection.execute(select(sync_rejects)).all()
    assert [(r.reason, r.item) for r in rejects] == [
        ("item is nested more than 256 levels deep", None)
    ]
    assert run_row(engine, summary.run_id).rejected == 1


def test_zero_and_impossible_dates_are_null_raw_kept_and_counted(
    platform: Platform, engine: Engine
) -> None:
    platform.serve_pages(
        "u1",
        envelope(
            [
                task(1, create_datetime="0000-00-00 00:00:00"),
                task(2, create_datetime="2022-11-00"),
                task(3),
            ]
        ),
    )

    summary = sync(platform.url, engine)

    rows = stored(engine)
    assert rows["task-1"].created_at is None
    assert rows["task-1"].raw["create_datetime"] == "0000-00-00 00:00:00"
    assert rows["task-2"].created_at is None
    assert rows["task-2"].raw["create_datetime"] == "2022-11-00"
    assert rows["task-3"].created_at is not None
    assert run_row(engine, summary.run_id).bad_values == 2


def test_texts_are_stored_whole_and_without_nul(
    platform: Platform, engine: Engine
) -> None:
    long_name = "名" * 300
    long_remark = "备注" * 35_000
    platform.serve_pages(
        "u1",
        envelope(
            [
                task(1, name="before\u0000after", remark="a\u0000b"),
                task(2, name=long_name, remark=long_remark),
            ]
        ),
    )

    summary = sync(platform.url, engine)

    rows = stored(engine)
    assert summary.outcome == "succeeded"
    assert (rows["task-1"].name, rows["task-1"].remark) == ("beforeafter", "ab")
    assert rows["task-1"].raw["name"] == "beforeafter"
    assert (rows["task-2"].name, rows["task-2"].remark) == (long_name, long_remark)
    assert len(rows["task-2"].raw["remark"]) == 70_000


# Field values as the platform may send them, and the column they must give.
LOOSE = {
    "status-string": ({"status": "2"}, "status", 2),
    "status-empty": ({"status": ""}, "status", None),
    "maximumcall-string": ({"maximumcall": "1"}, "maximumcall", 1),
    "maximumcall-word": ({"maximumcall": "many"}, "maximumcall", None),
    "extension-int": ({"destination_extension": 5}, "destination_extension", "5"),
    "extension-string": ({"destination_extension": "5"}, "destination_extension", "5"),
    "group-null": ({"group": None}, "group_id", None),
    "group-empty": ({"group": {}}, "group_id", None),
    "group-missing": ({"group": "missing"}, "group_id", None),
    "group-string-id": ({"group": {"id": "4", "name": "x"}}, "group_id", "4"),
    "enable-int": ({"enable": 1}, "enable", True),
    # Values no typed column can hold on every database: NULL, counted.
    "id-too-long": ({"caller_line_id": "x" * 300}, "caller_line_id", None),
    "group-id-too-long": ({"group": {"id": "g" * 300}}, "group_id", None),
    "int-past-64-bits": ({"maximumcall": 10**20}, "maximumcall", None),
    "status-past-32-bits": ({"status": 2**40}, "status", None),
    "date-before-year-1": (
        {"create_datetime": "0001-01-01 00:00:00"},
        "created_at",
        None,
    ),
    "lone-surrogate": ({"name": "LONE"}, "name", "ab\ufffd"),
    "nan": ({"remark": "NAN"}, "remark", None),
}
BAD_VALUES = 5  # maximumcall-word, id-too-long, the two ints, the date


def test_loosely_typed_fields_are_coerced_or_null_never_a_failed_page(
    platform: Platform, engine: Engine
) -> None:
    items = []
    for number, (fields, _, _) in enumerate(LOOSE.values(), start=1):
        item = task(number, **fields)
        if fields.get("group") == "missing":
            del item["group"]
        items.append(item)
    items.append(task(999, uuid="u" * 300))
    body = envelope(items).replace(b'"LONE"', b'"ab\\ud83d"').replace(b'"NAN"', b"NaN")
    platform.serve_pages("u1", body)

    summary = sync(platform.url, engine)

    assert (summary.outcome, summary.counts.rejected) == ("succeeded", 1)
    rows = stored(engine)
    for number, (case, (_, column, expected)) in enumerate(LOOSE.items(), start=1):
        assert getattr(rows[f"task-{number}"], column) == expected, case
    assert run_row(engine, summary.run_id).bad_values == BAD_VALUES


def test_a_status_outside_the_documented_codes_is_kept_as_unknown(
    platform: Platform, engine: Engine
) -> None:
    platform.serve_pages("u1", envelope([task(1, status=7, status_str="新状态")]))
    sync(platform.url, engine)
    labelled = "SELECT status, status_label, status_str FROM current_tasks"
    with engine.connect() as connection:
        shown = connection.execute(text(labelled)).one()
    platform.serve_pages("u1", envelope([task(1, status=2)]))
    sync(platform.url, engine)

    assert tuple(shown) == (7, "unknown", "新状态")
    assert status_label(7) == "unknown"
    assert stored(engine)["task-1"].status == 2
    assert history(engine, "task-1") == [
        ("first_seen", None, 7),
        ("changed", 7, 2),
    ]


def test_odd_sub_accounts_are_cleaned_or_skipped_never_a_failed_run(
    platform: Platform, engine: Engine
) -> None:
    subs = [
        {"id": "s1", "name": "销售\u0000一部"},
        {"id": "s2", "name": "LONE"},
        {"id": "s" * 300, "name": "id too long"},
        {"id": None, "name": "no id"},
    ]
    body = envelope(subs).replace(b'"LONE"', b'"ab\\ud83d"')
    platform.serve_pages("u1/subset_users", body)
    platform.serve_pages("u1", envelope([], meta(0, 1)))
    config = make_config(platform.url, ())
    config = Config(
        database=config.database,
        api=config.api,
        accounts=(MainAccount(user_id="u1", discover_sub_accounts=True),),
    )

    with Client(config.api) as client:
        summary = run_sync(config, engine=engine, client=client)

    assert summary.outcome == "succeeded"
    with engine.connect() as connection:
        names = dict(
            connection.execute(select(accounts.c.sub_user_id, accounts.c.name)).all()
        )
    assert names == {"": "", "s1": "销售一部", "s2": "ab\ufffd"}


def discovering(platform: Platform, *user_ids: str, **api: Any) -> Config:
    """Main accounts that discover their sub-accounts, none listed."""
    for user_id in user_ids:
        platform.serve_pages(f"{user_id}/subset_users", envelope([]))
        platform.serve_pages(user_id, envelope([], meta(0, 1)))
    config = make_config(platform.url, (), **api)
    mains = [MainAccount(user_id=u, discover_sub_accounts=True) for u in user_ids]
    return Config(database=config.database, api=config.api, accounts=tuple(mains))


# A sub-account list that fails, answered after the run could see a stop.
FAILED_LIST = Reply(404, b'{"code":404,"status":"error"}', delay=0.5)
# A sub-account list that asks to be tried again in 5 s.
THROTTLED_LIST = Reply(429, b'{"code":429}', (("Retry-After", "5"),))


def stopping(stop: threading.Event, reply: Reply) -> Callable[[Asked], Reply]:
    """An answer that sets `stop` as it is asked for, then gives `reply`."""

    def answer(asked: Asked) -> Reply:
        stop.set()
        return reply

    return answer


ONE_PAGE = Reply(body=envelope(tasks(1, 3), meta(3, 1)))
# How long the sub-account lists below take to answer: a walk waiting for
# one would begin that much later. Well under the read timeout of these
# tests (2 s): at 2 s the list raced it, and timed out now and then.
LIST_DELAY = 1.0
# A list that fails once the walks beside it have long ended.
LATE_FAILED_LIST = Reply(404, b'{"code":404,"status":"error"}', delay=LIST_DELAY)


def last_error(engine: Engine, user_id: str, sub_user_id: str = "") -> str | None:
    """The error an account's record shows."""
    query = select(accounts.c.last_error).where(
        accounts.c.user_id == user_id, accounts.c.sub_user_id == sub_user_id
    )
    with engine.connect() as connection:
        error: str | None = connection.execute(query).scalar_one()
    return error


def test_a_main_account_is_walked_while_its_sub_accounts_are_listed(
    platform: Platform, engine: Engine
) -> None:
    asked_at: dict[str, float] = {}

    def noting(reply: Reply) -> Callable[[Asked], Reply]:
        def answer(asked: Asked) -> Reply:
            asked_at[asked.script] = time.monotonic()
            return reply

        return answer

    config = discovering(platform, "u1", parallelism=2)
    platform.respond("u1", noting(ONE_PAGE))
    listed = Reply(body=envelope([]), delay=LIST_DELAY)
    platform.respond("u1/subset_users", noting(listed))

    summary = run_sync(config, engine=engine)

    assert (summary.outcome, summary.counts.new) == ("succeeded", 3)
    assert asked_at["u1"] - asked_at["u1/subset_users"] < LIST_DELAY


def test_a_failed_list_shows_on_the_main_account_walked_before_it_failed(
    platform: Platform, engine: Engine
) -> None:
    config = discovering(platform, "u1", parallelism=2)
    platform.script("u1", ONE_PAGE)
    platform.script("u1/subset_users", LATE_FAILED_LIST)

    summary = run_sync(config, engine=engine)

    assert (summary.outcome, summary.counts.new) == ("partial", 3)
    (error,) = summary.errors
    assert error.startswith("sub-account discovery failed: account u1, endpoint ")
    assert last_error(engine, "u1") == error


def test_a_failed_list_shows_on_the_sub_accounts_walked_before_it_failed(
    platform: Platform, engine: Engine
) -> None:
    # Without a walk of its own, the main account's failed list shows on the
    # sub-accounts that earlier runs found: here one configured since, whose
    # walk ends first.
    base = make_config(platform.url, (), parallelism=2)
    main = MainAccount(user_id="u1", sync_own_tasks=False, discover_sub_accounts=True)
    platform.script("u1", ONE_PAGE)
    platform.script("u1/subset_users", Reply(body=envelope([{"id": "s1"}])))
    run_sync(Config(base.database, base.api, (main,)), engine=engine)
    platform.script("u1/subset_users", LATE_FAILED_LIST)
    main = dataclasses.replace(main, sub_accounts=("s1",))

    summary = run_sync(Config(base.database, base.api, (main,)), engine=engine)

    (error,) = summary.errors
    assert error.startswith("sub-account discovery failed: account u1, endpoint ")
    assert last_error(engine, "u1", "s1") == error


def test_a_main_account_named_twice_is_listed_once(
    platform: Platform, engine: Engine
) -> None:
    # The configuration file refuses it; a Config built in code may not.
    config = discovering(platform, "u1", "u1", parallelism=2)

    summary = run_sync(config, engine=engine)

    assert (summary.outcome, summary.accounts) == ("succeeded", 1)
    scripts = [asked.script for asked in platform.asked]
    assert sorted(scripts) == ["u1", "u1/subset_users"]


def test_a_stop_during_discovery_lists_no_further_main_account(
    platform: Platform, engine: Engine
) -> None:
    stop = threading.Event()
    # One walker asks for every list, one after the other, before any walk.
    config = discovering(platform, "u1", "u2", "u3", parallelism=1)
    platform.respond("u1/subset_users", stopping(stop, FAILED_LIST))

    with Client(config.api) as client:
        summary = run_sync(config, engine=engine, client=client, stop=stop)

    # The three main accounts were the run's; none was walked.
    assert (summary.outcome, summary.accounts) == ("stopped", 3)
    assert [asked.script for asked in platform.asked] == ["u1/subset_users"]
    # Its answer, which came after the stop, was not waited for.
    assert summary.errors == ()


def test_a_stop_in_a_wait_during_discovery_keeps_what_went_wrong_before(
    platform: Platform, engine: Engine
) -> None:
    stop = threading.Event()
    config = discovering(platform, "u1", "u2", "u3", parallelism=1)
    platform.respond("u1/subset_users", stopping(threading.Event(), FAILED_LIST))
    platform.respond("u2/subset_users", stopping(stop, THROTTLED_LIST))

    # The run's own client, whose waits a stop cuts short.
    summary = run_sync(config, engine=engine, stop=stop)

    assert (summary.outcome, summary.accounts) == ("stopped", 3)
    scripts = [asked.script for asked in platform.asked]
    assert scripts == ["u1/subset_users", "u2/subset_users"]
    (error,) = summary.errors
    assert error.startswith("sub-account discovery failed: account u1, endpoint ")


def test_a_stop_in_a_wait_of_a_backfills_check_ends_it(
    platform: Platform, engine: Engine
) -> None:
    stop = threading.Event()
    config = discovering(platform, "u1", "u2", "u3")
    platform.respond("u1/subset_users", stopping(stop, THROTTLED_LIST))

    summary = run_backfill(config, selectors=["u3"], engine=engine, stop=stop)

    assert (summary.outcome, summary.accounts) == ("stopped", 0)
    assert [asked.script for asked in platform.asked] == ["u1/subset_users"]


def test_a_stop_while_a_backfill_checks_its_accounts_lists_nothing_more(
    platform: Platform, engine: Engine
) -> None:
    stop = threading.Event()
    config = discovering(platform, "u1", "u2", "u3")
    platform.respond("u1/subset_users", stopping(stop, FAILED_LIST))

    with Client(config.api) as client:
        summary = run_backfill(
            config, selectors=["u3"], engine=engine, client=client, stop=stop
        )

    assert (summary.outcome, summary.accounts) == ("stopped", 0)
    assert [asked.script for asked in platform.asked] == ["u1/subset_users"]


# -- the platform failing ----------------------------------------------------


def test_throttled_twice_waits_as_told_then_succeeds(
    platform: Platform, engine: Engine, sleeps: list[float]
) -> None:
    throttled = Reply(429, b'{"code":429}', (("Retry-After", "2"),))
    platform.script("u1", throttled, throttled, Reply(body=envelope(tasks(1, 3))))

    summary = sync(platform.url, engine, sleeps=sleeps)

    assert summary.outcome == "succeeded"
    assert sleeps == [2.0, 2.0]
    assert listed(engine) == uuids(1, 3)


def fails_u1_only(
    platform: Platform, engine: Engine, *replies: Reply, **api: Any
) -> RunSummary:
    """Sync u1, which gets `replies`, and u2, which is fine; u1 must fail."""
    platform.script("u1", *replies)
    platform.serve_pages("u2", envelope(tasks(101, 103)))

    summary = sync(platform.url, engine, "u1", "u2", **api)

    assert (summary.outcome, summary.exit_code) == ("partial", 3)
    assert summary.accounts_failed == 1
    assert listed(engine) == uuids(101, 103)
    (error,) = summary.errors
    assert_clear_error(error, "u1", 1)
    assert account_row(engine, "u1").last_outcome == "failed"
    assert_clear_error(account_row(engine, "u1").last_error, "u1", 1)
    assert account_row(engine, "u2").last_outcome == "succeeded"
    assert run_row(engine, summary.run_id).error == error
    return summary


HTML = b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"


def test_a_502_html_page_fails_one_account_after_the_retries(
    platform: Platform, engine: Engine
) -> None:
    summary = fails_u1_only(
        platform, engine, Reply(502, HTML, (("Content-Type", "text/html"),))
    )

    assert platform.pages_asked("u1") == [1] * (MAX_RETRIES + 1)
    assert "HTTP 502" in summary.errors[0]
    assert "nginx" not in summary.errors[0]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<html>maintenance</html>", id="not-json"),
        pytest.param(envelope(tasks(1, 5))[:-40], id="cut-short"),
        pytest.param(b"", id="empty"),
    ],
)
def test_a_bad_200_body_is_retried_then_a_clear_error(
    platform: Platform, engine: Engine, body: bytes
) -> None:
    summary = fails_u1_only(platform, engine, Reply(200, body))

    assert platform.pages_asked("u1") == [1] * (MAX_RETRIES + 1)
    assert "not JSON or is cut short" in summary.errors[0]


def test_a_number_too_long_to_read_fails_at_once(
    platform: Platform, engine: Engine
) -> None:
    # Python refuses integers of more than 4,300 digits; the body was retried
    # as if cut short, though every answer would be the same.
    body = envelope(tasks(1, 2)).replace(b'"status": 2', b'"status": ' + b"7" * 5000)
    assert b"7" * 5000 in body

    summary = fails_u1_only(platform, engine, Reply(200, body))

    assert platform.pages_asked("u1") == [1]
    assert "the body holds a value Python cannot read" in summary.errors[0]


def test_a_body_far_larger_than_a_page_fails_at_once_unread(
    platform: Platform, engine: Engine
) -> None:
    # Read whole, an endless body took a run's memory to hundreds of MB.
    # Page size 15: the floor of 16 MB applies.
    huge = envelope(tasks(1, 2)).replace(
        b'"status": 2', b'"status": "' + b"x" * 2**24 + b'"', 1
    )

    summary = fails_u1_only(platform, engine, Reply(200, huge))

    assert platform.pages_asked("u1") == [1]
    assert (
        "the body passed 16 MB, far more than a page of 15 items" in summary.errors[0]
    )


def test_a_body_nested_too_deep_to_read_fails_at_once(
    platform: Platform, engine: Engine
) -> None:
    # It was retried as if cut short, and said so, though every answer
    # would be the same.
    deep = b"[" * 3000 + b"]" * 3000
    body = envelope(tasks(1, 2)).replace(b'"status": 2', b'"status": ' + deep, 1)
    assert deep in body

    summary = fails_u1_only(platform, engine, Reply(200, body))

    assert platform.pages_asked("u1") == [1]
    assert "the body nests deeper than Python can read" in summary.errors[0]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"code": 401, "status": "error"}, id="code-401"),
        pytest.param({"code": 200, "status": "error"}, id="status-error"),
        pytest.param({"code": 10001, "status": "error"}, id="business-code"),
        pytest.param({"code": "403"}, id="code-string"),
    ],
)
def test_a_refused_envelope_is_a_clear_error_and_never_data(
    platform: Platform, engine: Engine, fields: dict[str, Any]
) -> None:
    summary = fails_u1_only(
        platform, engine, Reply(body=envelope(tasks(1, 5), meta(5, 1), **fields))
    )

    assert platform.pages_asked("u1") == [1]
    assert "the envelope says code" in summary.errors[0]
    assert not uuids(1, 5) & stored(engine).keys()


def test_a_stalled_read_times_out_and_is_retried_a_bounded_number_of_times(
    platform: Platform, engine: Engine
) -> None:
    summary = fails_u1_only(
        platform, engine, Reply(body=envelope(tasks(1, 3)), delay=1.0), read_timeout=0.2
    )

    assert platform.pages_asked("u1") == [1] * (MAX_RETRIES + 1)
    assert "no answer in time" in summary.errors[0]


def test_a_body_dripping_in_slower_than_its_bound_is_cut_and_retried(
    platform: Platform, engine: Engine
) -> None:
    # Each byte comes within the read timeout; the whole would take 30 s.
    dripping = Reply(body=envelope(tasks(1, 3)), drip=0.05)

    summary = fails_u1_only(
        platform, engine, dripping, read_timeout=0.3, connect_timeout=0.5
    )

    assert platform.pages_asked("u1") == [1] * (MAX_RETRIES + 1)
    assert "the answer did not arrive whole in 1.1 s" in summary.errors[0]


def test_headers_dripping_in_slower_than_the_bound_are_cut_and_retried(
    platform: Platform, engine: Engine
) -> None:
    # The bound was checked only as the body came: headers sent a byte at a
    # time, each within the read timeout, held the walk until the run's
    # deadline (here each answer's headers would take 10 s).
    dripping = Reply(body=envelope(tasks(1, 3)), drip_head=0.01)
    began = time.monotonic()

    summary = fails_u1_only(
        platform, engine, dripping, read_timeout=0.3, connect_timeout=0.5
    )

    assert platform.pages_asked("u1") == [1] * (MAX_RETRIES + 1)
    assert "the answer did not arrive whole in 1.1 s" in summary.errors[0]
    assert time.monotonic() - began < 10


def test_a_stall_then_an_answer_succeeds(platform: Platform, engine: Engine) -> None:
    platform.script(
        "u1",
        Reply(body=envelope(tasks(1, 3)), delay=1.0),
        Reply(body=envelope(tasks(1, 3))),
    )

    summary = sync(platform.url, engine, read_timeout=0.2)

    assert summary.outcome == "succeeded"
    assert listed(engine) == uuids(1, 3)


@pytest.mark.parametrize(
    ("kind", "tries"),
    [
        pytest.param("reset", MAX_RETRIES + 1, id="reset-mid-body"),
        pytest.param("stall", MAX_RETRIES + 1, id="stall"),
        pytest.param("truncated", MAX_RETRIES + 1, id="truncated-json"),
        pytest.param("server_error", MAX_RETRIES + 1, id="5xx"),
        pytest.param("throttle", MAX_RETRIES + 1, id="429"),
        pytest.param("unauthorized", 1, id="401"),
    ],
)
def test_a_fault_that_never_stops_fails_the_account_clearly(
    engine: Engine, kind: str, tries: int
) -> None:
    faults = Faults(**{kind: 1.0}, stall_seconds=0.6, retry_after=0)
    simulator = Simulator(
        seed=4, main_accounts=1, sub_accounts=0, token=TOKEN, faults=faults
    )
    (user_id,) = simulator.main_user_ids()

    with simulator.serve() as server:
        summary = sync(server.url, engine, user_id, read_timeout=0.2)

    assert (summary.outcome, summary.accounts_failed) == ("failed", 1)
    (error,) = summary.errors
    assert_clear_error(error, user_id, 1)
    assert simulator.fault_counts() == {kind: tries}
    assert stored(engine) == {}


# -- the database ------------------------------------------------------------


def test_a_sqlite_file_held_by_another_writer_is_waited_for(
    platform: Platform, sqlite_url: str
) -> None:
    engine = store.connect(DatabaseConfig(url=sqlite_url, busy_timeout=30))
    store.migrate(engine)
    platform.serve_pages("u1", envelope(tasks(1, 3)))
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
        other.isolation_level = None
        other.execute("BEGIN IMMEDIATE")
        holding.set()
        release.wait(10)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    timer = threading.Timer(2.0, release.set)
    timer.start()
    try:
        summary = sync(platform.url, engine)
    finally:
        release.set()
        holder.join(10)
        timer.cancel()

    assert summary.outcome == "succeeded"
    assert listed(engine) == uuids(1, 3)
    engine.dispose()


def test_a_sqlite_file_locked_past_the_busy_timeout_is_one_clear_error(
    platform: Platform, sqlite_url: str, tmp_path: Any
) -> None:
    engine = store.connect(DatabaseConfig(url=sqlite_url, busy_timeout=0.2))
    store.migrate(engine)
    platform.serve_pages("u1", envelope(tasks(1, 3)))
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    other.isolation_level = None
    other.execute("BEGIN IMMEDIATE")
    config = tmp_path / "task-etl.toml"
    config.write_text(
        f'[database]\nurl = "{sqlite_url}"\nbusy_timeout = 0.2\n'
        f'[api]\nbase_url = "{platform.url}"\ntoken = "{TOKEN}"\n'
        '[[accounts]]\nuser_id = "u1"\n',
        encoding="utf-8",
    )
    try:
        with pytest.raises(StoreError, match="database is locked"):
            sync(platform.url, engine)
        result = CliRunner().invoke(main, ["--config", str(config), "sync"])
    finally:
        other.execute("ROLLBACK")
        other.close()
        engine.dispose()

    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        "Error: the run had not begun after 0.2 s (database.busy_timeout), waiting"
        " for another writer of the database: database is locked"
    )


def sync_with_writer_held(platform: Platform, engine: Engine) -> RunSummary:
    """A run of u1 then u2, whose writer waits after the first page it writes
    until page 4 is asked for: pages 2 and 3 are then queued behind it, and
    written together."""
    config = make_config(platform.url, ("u1", "u2"), page_size=3, parallelism=1)
    client = Client(config.api, sleep=lambda _: None, limiter=RateLimiter(10_000))
    held = []

    def hold_the_writer(progress: Any) -> None:
        deadline = time.monotonic() + 10
        while len(platform.asked) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        held.append(len(platform.asked) >= 4)

    with client:
        summary = run_sync(
            config, engine=engine, client=client, progress=hold_the_writer
        )
    assert held[0], "the walk never asked for page 4"
    return summary


def page_commits(engine: Engine) -> list[int]:
    """Filled with one entry per committed transaction that wrote tasks."""
    commits: list[int] = []

    @event.listens_for(engine, "before_cursor_execute")
    def note(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO tasks"):
            connection.info["writes_tasks"] = True

    @event.listens_for(engine, "commit")
    def count(connection: Any) -> None:
        if connection.info.pop("writes_tasks", False):
            commits.append(1)

    return commits


def test_pages_queued_behind_the_writer_are_written_together(
    platform: Platform, engine: Engine
) -> None:
    platform.serve_pages("u1", *pages_of(tasks(1, 12), total=12))
    platform.serve_pages("u2", *pages_of(tasks(101, 112), total=12))
    commits = page_commits(engine)

    summary = sync_with_writer_held(platform, engine)

    assert (summary.outcome, summary.pages, summary.counts.new) == ("succeeded", 8, 24)
    assert listed(engine) == uuids(1, 12) | uuids(101, 112)
    # Page 1 alone; pages 2 and 3 (at least) together.
    assert 1 < len(commits) < 8


def test_a_page_that_cannot_be_written_with_others_fails_its_account_only(
    platform: Platform, engine: Engine
) -> None:
    platform.serve_pages("u1", *pages_of(tasks(1, 12), total=12))
    platform.serve_pages("u2", *pages_of(tasks(101, 112), total=12))
    with engine.begin() as connection:
        for statement in REFUSE_TASK_7[engine.dialect.name]:
            connection.execute(text(statement))

    summary = sync_with_writer_held(platform, engine)

    assert (summary.outcome, summary.accounts_failed) == ("partial", 1)
    (error,) = summary.errors
    assert_clear_error(error, "u1", 3)
    assert "the page was not written" in error and "disk full" in error
    # The pages before it are stored, the walk stopped there, and u2 is whole.
    assert listed(engine) == uuids(1, 6) | uuids(101, 112)
    assert last_error(engine, "u1") == error
    assert account_row(engine, "u2").last_outcome == "succeeded"


def test_pages_that_share_a_task_are_written_one_after_the_other(
    platform: Platform, engine: Engine
) -> None:
    # The list shifted between pages 2 and 3, and task 6 was paused meanwhile.
    paused = task(6, status=1, status_str="暂停中")
    pages = [tasks(1, 3), tasks(4, 6), [paused, task(7), task(8)], tasks(9, 11)]
    platform.serve_pages(
        "u1", *(envelope(page, meta(12, 4, "3", n)) for n, page in enumerate(pages, 1))
    )
    platform.serve_pages("u2", envelope(tasks(101, 103)))

    sync_with_writer_held(platform, engine)

    assert history(engine, "task-6") == [("first_seen", None, 2), ("changed", 2, 1)]
    assert stored(engine)["task-6"].status == 1
    assert listed(engine) == uuids(1, 11) | uuids(101, 103)


# A store failure that only task-7, on u1's third page of three tasks, meets.
REFUSE_TASK_7 = {
    "sqlite": [
        "CREATE TRIGGER refuse_task_7 BEFORE INSERT ON tasks "
        "WHEN NEW.uuid = 'task-7' BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_task_7() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
        "CREATE TRIGGER refuse_task_7 BEFORE INSERT ON tasks FOR EACH ROW "
        "WHEN (NEW.uuid = 'task-7') EXECUTE FUNCTION refuse_task_7()",
    ],
}


def test_a_list_that_shifts_during_a_walk_has_no_live_task_removed(
    platform: Platform, engine: Engine
) -> None:
    stable = tasks(1, 9)
    platform.serve_pages("u1", *pages_of(stable, total=9))
    sync(platform.url, engine, page_size=3)
    # Sorted oldest first, three a page. Once page 1 is read, task 2 is
    # deleted and task 10 created: task 4 moves onto page 1, already read,
    # and the walk misses it, though its pages and total all agree.
    shifted = [item for item in tasks(1, 10) if item["uuid"] != "task-2"]
    platform.respond(
        "u1",
        lambda asked: Reply(
            body=pages_of(stable if asked.page == 1 else shifted, total=9)[
                asked.page - 1
            ]
        ),
    )

    missed = sync(platform.url, engine, page_size=3)
    platform.serve_pages("u1", *pages_of(shifted, total=9))
    listed_again = sync(platform.url, engine, page_size=3)
    confirmed = sync(platform.url, engine, page_size=3)

    removed = [run.counts.removed for run in (missed, listed_again, confirmed)]
    assert removed == [0, 0, 1]
    assert listed(engine) == uuids(1, 10) - {"task-2"}
    assert history(engine, "task-4") == [("first_seen", None, 2)]
    assert history(engine, "task-2") == [("first_seen", None, 2), ("removed", 2, None)]


@pytest.mark.parametrize("place", ["same-page", "later-page"])
def test_a_walk_that_lists_a_task_twice_marks_no_removal(
    platform: Platform, engine: Engine, place: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A list sorted on a key with ties can show one task twice and hide
    # another, every page full and the total adding up: listed so twice in
    # a row, the hidden task was marked removed, with no warning.
    platform.serve_pages("u1", *pages_of(tasks(1, 9), total=9))
    sync(platform.url, engine, page_size=3)
    repeated = {
        "same-page": [1, 2, 1, 4, 5, 6, 7, 8, 9],
        "later-page": [1, 2, 3, 4, 5, 6, 7, 8, 2],
    }[place]
    platform.serve_pages("u1", *pages_of([task(n) for n in repeated], total=9))

    with caplog.at_level(logging.WARNING, logger="etl.sync"):
        runs = [sync(platform.url, engine, page_size=3) for _ in range(2)]

    assert [run.counts.removed for run in runs] == [0, 0]
    assert listed(engine) == uuids(1, 9)
    warnings = [
        r.getMessage() for r in caplog.records if "listed already" in r.getMessage()
    ]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"account u1, endpoint {TASK_LIST}: ")
    assert all(account_row(engine, "u1").last_outcome == "succeeded" for _ in runs)


def pages_of(items: list[dict[str, Any]], total: int, size: int = 3) -> list[bytes]:
    last = -(-total // size)
    return [
        envelope(items[start : start + size], meta(total, last, str(size), number))
        for number, start in enumerate(range(0, len(items), size), start=1)
    ]


# A store failure that only removals meet: the page writes go through.
REFUSE_REMOVAL = {
    "sqlite": [
        "CREATE TRIGGER refuse_removal BEFORE UPDATE OF removed_at ON tasks "
        "WHEN NEW.removed_at IS NOT NULL AND NEW.user_id = 'u1' "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_removal() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'disk full'; END $$",
        "CREATE TRIGGER refuse_removal BEFORE UPDATE OF removed_at ON tasks "
        "FOR EACH ROW WHEN (NEW.removed_at IS NOT NULL AND NEW.user_id = 'u1') "
        "EXECUTE FUNCTION refuse_removal()",
    ],
}


def test_removals_that_cannot_be_written_fail_one_account_only(
    platform: Platform, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    platform.serve_pages("u1", envelope(tasks(1, 3)))
    platform.serve_pages("u2", envelope(tasks(101, 103)))
    sync(platform.url, engine, "u1", "u2")
    platform.serve_pages("u1", envelope(tasks(1, 2)))
    platform.serve_pages("u2", envelope(tasks(101, 102)))
    # The first walk to miss a task only flags it; the second removes it.
    assert sync(platform.url, engine, "u1", "u2").outcome == "succeeded"
    with engine.begin() as connection:
        for statement in REFUSE_REMOVAL[engine.dialect.name]:
            connection.execute(text(statement))

    with caplog.at_level(logging.ERROR, logger="etl.sync"):
        summary = sync(platform.url, engine, "u1", "u2")

    assert (summary.outcome, summary.accounts_failed) == ("partial", 1)
    (error,) = summary.errors
    assert error.startswith("account u1: removals were not marked: ")
    # The log line is the error itself, naming the account once.
    lines = [r.getMessage() for r in caplog.records if "removals" in r.getMessage()]
    assert lines == [error]
    assert "disk full" in error and "\n" not in error
    not_removed = {u for u, row in stored(engine).items() if row.removed_at is None}
    assert not_removed == uuids(1, 3) | uuids(101, 102)
    assert account_row(engine, "u2").last_outcome == "succeeded"
    on_table = " ON tasks" if engine.dialect.name == "postgresql" else ""
    with engine.begin() as connection:
        connection.execute(text(f"DROP TRIGGER refuse_removal{on_table}"))
    assert sync(platform.url, engine, "u1", "u2").outcome == "succeeded"
    assert listed(engine) == uuids(1, 2) | uuids(101, 102)
